"""FGSM, i-FGSM, PGD and the PGD variants that only change the loss (SegPGD, CosPGD, margin, temperature), the
targeted i-FGSM attacks, transfer from the undefended model, and the random-sign noise baseline."""
from __future__ import annotations

import jax

from mri_poison.attacks import gradient
from mri_poison.attacks import losses as attack_losses
from mri_poison.attacks import sanity
from mri_poison.attacks.eps_sweep import sweep
from mri_poison.attacks.zoo import Inputs, Threat, register


def _steps(cfg, temperature=1.0) -> dict:
  del temperature
  return {"steps": int(cfg.steps), "step_frac": float(cfg.step_frac)}


def _kappa(cfg) -> float:
  return float(cfg.get("margin_kappa", 0.0))


def _ifgsm(make_loss, targeted: bool):
  def run(a: Inputs):
    return sweep(gradient.ifgsm, a.tracked(make_loss(a)), a.x, eps=a.eps, mask=a.brain, chunk_size=a.chunk,
                 step_size_frac=float(a.cfg.step_frac), steps=a.steps, targeted=targeted, return_history=True)
  return run


def _pgd(make_loss, temperature=lambda a: 1.0):
  def run(a: Inputs):
    return sweep(gradient.pgd, a.tracked(make_loss(a), temperature(a)), a.x, eps=a.eps, mask=a.brain,
                 chunk_size=a.chunk, step_size_frac=float(a.cfg.step_frac), steps=a.steps, key=a.key,
                 restarts=int(a.cfg.restarts), return_history=True)
  return run


def _fgsm(a: Inputs):
  return sweep(gradient.fgsm, a.ce, a.x, eps=a.eps, mask=a.brain, chunk_size=a.chunk), None


@jax.jit
def _noise_sweep(x, eps, key, brain):
  return jax.vmap(lambda e: sanity.random_sign_noise(x, eps=e, key=key, mask=brain))(eps)


def _noise(a: Inputs):
  return _noise_sweep(a.x, jax.numpy.asarray(a.eps), a.key, a.brain), None


_PGD_FAMILY = dict(iterative=True, random=True, restarts=True)

register(Threat("fgsm", 0, "FGSM: x + eps sign(grad CE) (one step)", _fgsm, deployed_ce=True))
register(Threat("ifgsm", 1, "i-FGSM / BIM: N sign steps of alpha, projected on the eps-ball",
                _ifgsm(lambda a: a.ce, False), iterative=True, deployed_ce=True, settings=_steps))
register(Threat("ifgsm_targeted", 2, "targeted i-FGSM: N sign steps decreasing CE to the target map over the brain",
                _ifgsm(lambda a: attack_losses.targeted_cross_entropy(a.apply_fn, a.params, a.target, a.brain), True),
                iterative=True, targeted=True, settings=_steps))
register(Threat("pgd", 3, "PGD: i-FGSM from a uniform random start in the eps-ball", _pgd(lambda a: a.ce),
                deployed_ce=True, settings=_steps, **_PGD_FAMILY))
register(Threat("segpgd", 4, "SegPGD: PGD on CE re-weighted from correct to wrong voxels, lambda_t = (t-1)/(2N)",
                _pgd(lambda a: attack_losses.segpgd(a.apply_fn, a.params, a.labels, a.steps, a.brain)),
                deployed_ce=True, settings=_steps, **_PGD_FAMILY))
register(Threat("cospgd", 5, "CosPGD: PGD on CE weighted by stop-grad cos(softmax, one-hot label)",
                _pgd(lambda a: attack_losses.cospgd(a.apply_fn, a.params, a.labels, a.brain)),
                deployed_ce=True, settings=_steps, **_PGD_FAMILY))
register(Threat("random_sign", 6, "random sign noise: x + eps * random signs (baseline)", _noise, random=True))
register(Threat("margin", 7, "margin PGD (CW-style): PGD increasing min(max_{k!=y} z_k - z_y, kappa) on the logits",
                _pgd(lambda a: attack_losses.margin(a.apply_fn, a.params, a.labels, a.brain, kappa=_kappa(a.cfg))),
                settings=lambda cfg, t: dict(_steps(cfg), kappa=_kappa(cfg)), **_PGD_FAMILY))
register(Threat("pgd_temp", 8, "PGD on CE of logits / T at the model's training temperature T (distilled model only)",
                _pgd(lambda a: attack_losses.cross_entropy(attack_losses.scaled_apply(a.apply_fn, a.temperature),
                                                           a.params, a.labels, a.brain),
                     temperature=lambda a: float(a.temperature)),
                settings=lambda cfg, t: dict(_steps(cfg), temperature=float(t)),
                # logits / 1 is the deployed model: the same attack as "pgd"
                applies=lambda victim, t, source: float(t) != 1.0, **_PGD_FAMILY))
register(Threat("transfer", 9, "transfer: the undefended model's own PGD examples, replayed on this model",
                replays="pgd", random=True, restarts=True, settings=_steps,
                # its own PGD examples: the same attack as "pgd"
                applies=lambda victim, t, source: victim != source))
register(Threat("targeted_margin", 10, "targeted margin: N sign steps decreasing the target-class margin over the "
                "voxels that must change only (target != label)",
                _ifgsm(lambda a: attack_losses.targeted_margin(a.apply_fn, a.params, a.target, a.labels, a.brain,
                                                               kappa=_kappa(a.cfg)), True),
                iterative=True, targeted=True, settings=lambda cfg, t: dict(_steps(cfg), kappa=_kappa(cfg))))
register(Threat("transfer_model", 15, "transfer from another trained model (attack.transfer_model, any "
                "architecture): its own PGD examples, replayed on this model",
                replays="pgd", source="external", random=True, restarts=True, settings=_steps))
