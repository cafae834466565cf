"""Study 2: attacking and scoring whole validation volumes; sanity rows; Wilcoxon and robust-fraction tables."""
from __future__ import annotations

import datetime
import functools
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from mri_poison import metrics
from mri_poison.attacks import gradient
from mri_poison.attacks import losses as attack_losses
from mri_poison.attacks import sanity
from mri_poison.attacks.eps_sweep import sweep
from mri_poison.data.case import REGIONS
from mri_poison.report import tables


ATTACKS = ("fgsm", "ifgsm", "ifgsm_targeted", "pgd", "segpgd", "cospgd")
NOISE = "random_sign"  # same-eps random sign noise: the baseline every attack must beat
TARGETS = ("erase_tumour", "et_to_oedema", "least_likely")
DICE_COLUMNS = tuple(f"dice_{r}" for r in REGIONS) + ("dice_mean",)
ATTACK_TEXT = {
    "fgsm": "FGSM: x + eps sign(grad CE) (one step)",
    "ifgsm": "i-FGSM / BIM: N sign steps of alpha, projected on the eps-ball",
    "ifgsm_targeted": "targeted i-FGSM: N sign steps decreasing CE to the target map",
    "pgd": "PGD: i-FGSM from a uniform random start in the eps-ball",
    "segpgd": "SegPGD: PGD on CE re-weighted from correct to wrong voxels, lambda_t = (t-1)/(2N)",
    "cospgd": "CosPGD: PGD on CE weighted by stop-grad cos(softmax, one-hot label)",
    NOISE: "random sign noise: x + eps * random signs (baseline)",
}



# ------------------------------------------------------------------------------------------------ attacks


def make_target(kind: str, apply_fn, params, x, labels):
  if kind == "erase_tumour":
    return attack_losses.target_erase_tumour(labels)
  if kind == "et_to_oedema":
    return attack_losses.target_et_to_oedema(labels)
  if kind == "least_likely":
    return attack_losses.target_least_likely(apply_fn, params, x)
  raise ValueError(f"config attack.target={kind!r}: expected one of {TARGETS}")


def attack_volumes(name: str, apply_fn, params, x, labels, brain, eps, attack_cfg, key, target=None):
  """x_adv (E, B, *S, C) for every eps of `eps` (E,) in one compiled call, and the loop's loss history or None.

  Untargeted attacks increase CE to `labels` over brain voxels; "ifgsm_targeted" decreases CE to `target`.
  """
  steps, frac = int(attack_cfg.steps), float(attack_cfg.step_frac)
  chunk = int(attack_cfg.get("eps_chunk", 0)) or None
  eps = jnp.asarray(eps, jnp.float32)
  common = dict(eps=eps, mask=brain, chunk_size=chunk)
  ce = attack_losses.cross_entropy(apply_fn, params, labels, brain)
  if name == "fgsm":
    return sweep(gradient.fgsm, ce, x, **common), None
  if name == NOISE:
    return _noise_sweep(x, eps, key, brain), None
  if name in ("ifgsm", "ifgsm_targeted"):
    targeted = name == "ifgsm_targeted"
    loss = attack_losses.targeted_cross_entropy(apply_fn, params, target, brain) if targeted else ce
    return sweep(gradient.ifgsm, loss, x, step_size_frac=frac, steps=steps, targeted=targeted,
                 return_history=True, **common)
  if name in ("pgd", "segpgd", "cospgd"):
    loss = {"pgd": lambda: ce, "segpgd": lambda: attack_losses.segpgd(apply_fn, params, labels, steps, brain),
            "cospgd": lambda: attack_losses.cospgd(apply_fn, params, labels, brain)}[name]()
    return sweep(gradient.pgd, loss, x, step_size_frac=frac, steps=steps, key=key,
                 restarts=int(attack_cfg.restarts), return_history=True, **common)
  raise ValueError(f"unknown attack {name!r}: expected one of {ATTACKS + (NOISE,)}")


@jax.jit
def _noise_sweep(x, eps, key, brain):
  return jax.vmap(lambda e: sanity.random_sign_noise(x, eps=e, key=key, mask=brain))(eps)


def attack_cost(name: str, attack_cfg) -> int:
  """Gradient evaluations per eps and volume batch (for the progress line)."""
  if name in ("fgsm", NOISE):
    return 1
  restarts = int(attack_cfg.restarts) if name in ("pgd", "segpgd", "cospgd") else 1
  return int(attack_cfg.steps) * restarts


@functools.lru_cache(maxsize=8)
def make_scorer(apply_fn):
  """Jitted `score(params, xs (E, B, *S, C), labels, brain, target) -> dice (E, B, 3), ce (E, B), ce_target (E, B)`.

  Cached per apply_fn, so the three models (same architecture, params as arguments) share one compilation.
  """

  def one(params, x, labels, brain, target):
    logits = apply_fn(params, x)
    pred = jnp.argmax(logits, axis=-1)
    dice = metrics.dice_from_counts(metrics.region_counts(pred, labels))
    ce = attack_losses.cross_entropy(apply_fn, params, labels, brain).reduce(logits, labels, brain, 0, 1)
    ce_t = attack_losses.cross_entropy(apply_fn, params, target, brain).reduce(logits, target, brain, 0, 1)
    return dice, ce, ce_t

  @jax.jit
  def score(params, xs, labels, brain, target):
    return jax.lax.map(lambda x: one(params, x, labels, brain, target), xs)

  @jax.jit
  def predict(params, x):
    return jnp.argmax(apply_fn(params, x), axis=-1)

  return score, predict


class Progress:
  """Work units done / total with rate and ETA, logged after each unit of work."""

  def __init__(self, total: float, what: str):
    self.total, self.done, self.what = float(total), 0.0, what
    self.t0 = time.perf_counter()

  def update(self, amount: float, label: str) -> None:
    self.done += amount
    elapsed = time.perf_counter() - self.t0
    rate = self.done / max(elapsed, 1e-9)
    eta = (self.total - self.done) / rate if rate > 0 else float("inf")
    eta_text = str(datetime.timedelta(seconds=int(eta))) if np.isfinite(eta) else "?"
    logging.info("robustify eval %s: %.0f%% (%.1f %s/s, ETA %s)", label, 100 * self.done / max(self.total, 1),
                 rate, self.what, eta_text)


def evaluate_model(name: str, apply_fn, params, data: dict, config, key, progress: Progress | None = None):
  """Per-case rows (clean, every attack and the noise baseline at every eps) and sanity rows of one model."""
  score, _ = make_scorer(apply_fn)
  acfg = config.attack
  eps = [float(e) for e in acfg.eps]  # rows keep the config's values (a float32 copy goes to the attacks)
  attacks = tuple(acfg.attacks) + (NOISE,)
  n, bs = data["image"].shape[0], int(acfg.batch)
  rows, stats = [], {a: {"loss_adv": [], "loss_noise": [], "gain": [], "increased": [], "monotone": []}
                     for a in attacks}
  zero_grad = []
  for start in range(0, n, bs):
    sl = slice(start, min(start + bs, n))
    x, y = jnp.asarray(data["image"][sl]), jnp.asarray(data["label"][sl])
    brain = jnp.asarray(data["brain"][sl])
    ids = data["case_id"][sl]
    target = make_target(str(acfg.target), apply_fn, params, x, y)
    d0, ce0, cet0 = (np.asarray(v)[0] for v in score(params, x[None], y, brain, target))
    for i, cid in enumerate(ids):
      rows.append(_row(name, "clean", 0.0, cid, d0[i], ce0[i], cet0[i]))
    ce_loss = attack_losses.cross_entropy(apply_fn, params, y, brain)
    zero_grad.extend(np.asarray(sanity.gradient_sanity(ce_loss, x, mask=brain)["zero_grad_fraction"]).tolist())
    batch_key = jax.random.fold_in(key, start)
    losses_here = {}
    for a_index, attack in enumerate(attacks):
      x_adv, hist = attack_volumes(attack, apply_fn, params, x, y, brain, np.asarray(eps, np.float32), acfg,
                                   jax.random.fold_in(batch_key, a_index), target)
      d, ce, cet = (np.asarray(v) for v in score(params, x_adv, y, brain, target))
      for e_i, e in enumerate(eps):
        for i, cid in enumerate(ids):
          rows.append(_row(name, attack, float(e), cid, d[e_i, i], ce[e_i, i], cet[e_i, i]))
      targeted = attack == "ifgsm_targeted"
      losses_here[attack] = (ce, cet)
      if hist is not None:
        inc = sanity.loss_increase(hist, targeted=targeted)
        gain = np.asarray(inc["gain"]).reshape(len(eps), -1, len(ids)).mean(axis=1)
        mono = np.asarray(inc["monotone_fraction"]).reshape(len(eps), -1, len(ids)).mean(axis=1)
        stats[attack]["gain"].append(gain)
        stats[attack]["increased"].append(gain > 0)
        stats[attack]["monotone"].append(mono)
      if progress is not None:
        progress.update(attack_cost(attack, acfg) * len(eps) * len(ids), f"{name}/{attack} "
                        f"volumes {sl.stop}/{n}")
    for attack in attacks:
      # Each attack is compared with the noise baseline on its own loss (target CE for the targeted one).
      which = 1 if attack == "ifgsm_targeted" else 0
      stats[attack]["loss_adv"].append(losses_here[attack][which])
      stats[attack]["loss_noise"].append(losses_here[NOISE][which])
  sanity_rows = _sanity_rows(name, attacks, eps, stats, rows, zero_grad)
  return rows, sanity_rows


def _row(model, attack, eps, case, dice, ce, ce_target) -> dict:
  dice = np.asarray(dice, np.float64)
  row = {"model": model, "attack": attack, "eps": float(eps), "case": str(case)}
  row.update({f"dice_{r}": float(dice[i]) for i, r in enumerate(REGIONS)})
  row["dice_mean"] = float(np.mean(dice))
  row["ce"] = float(ce)
  row["ce_target"] = float(ce_target)
  return row


def _sanity_rows(model, attacks, eps, stats, rows, zero_grad) -> list[dict]:
  out = []
  dice = {(r["attack"], r["eps"]): [] for r in rows}
  for r in rows:
    dice[(r["attack"], r["eps"])].append(r["dice_mean"])
  for attack in attacks:
    s = stats[attack]
    adv = np.concatenate(s["loss_adv"], axis=1)  # (E, N)
    noise = np.concatenate(s["loss_noise"], axis=1)
    targeted = attack == "ifgsm_targeted"
    beats = adv < noise if targeted else adv > noise
    for e_i, e in enumerate(eps):
      row = {"model": model, "attack": attack, "eps": float(e), "loss": "target CE" if targeted else "CE",
             "zero_grad_fraction": float(np.mean(zero_grad)),
             "loss_adv": float(np.mean(adv[e_i])), "loss_noise": float(np.mean(noise[e_i])),
             "beats_noise_fraction": float(np.mean(beats[e_i])) if attack != NOISE else float("nan"),
             "dice_adv": float(np.mean(dice[(attack, float(e))])),
             "dice_noise": float(np.mean(dice[(NOISE, float(e))]))}
      if s["gain"]:
        row["loss_gain"] = float(np.mean(np.concatenate(s["gain"], axis=1)[e_i]))
        row["loss_increased_fraction"] = float(np.mean(np.concatenate(s["increased"], axis=1)[e_i]))
        row["monotone_fraction"] = float(np.mean(np.concatenate(s["monotone"], axis=1)[e_i]))
      else:
        row.update(loss_gain=float("nan"), loss_increased_fraction=float("nan"), monotone_fraction=float("nan"))
      out.append(row)
  return out



# ------------------------------------------------------------------------------------------------ statistics


def wilcoxon_rows(per_case: list[dict], models: Sequence[str], attacks: Sequence[str], eps) -> list[dict]:
  """Paired (by case) Wilcoxon signed-rank tests, per region and on the mean Dice.

  "clean vs attack": a = clean Dice, b = attacked Dice of the same model (median_diff > 0: the attack hurts).
  "<defence> vs undefended": a = defence's Dice, b = undefended model's Dice under the same attack and eps
  (median_diff > 0: the defence helps); eps 0 = no attack. "distilled vs adversarial" likewise.
  """
  out = []
  for model in models:
    for attack in attacks:
      for e in eps:
        for col in DICE_COLUMNS:
          out.append(tables.paired_test(
              per_case, {"model": model, "attack": "clean"}, {"model": model, "attack": attack, "eps": e}, col,
              comparison="clean vs attack", model_a=model, model_b=model, attack=attack, eps=e,
              region=col[5:]))
  pairs = [(m, "undefended") for m in models if m != "undefended"]
  if "distilled" in models and "adversarial" in models:
    pairs.append(("distilled", "adversarial"))
  for a, b in pairs:
    for attack, e in [("clean", 0.0)] + [(x, e) for x in attacks for e in eps]:
      for col in DICE_COLUMNS:
        out.append(tables.paired_test(
            per_case, {"model": a, "attack": attack, "eps": e}, {"model": b, "attack": attack, "eps": e}, col,
            comparison=f"{a} vs {b}", model_a=a, model_b=b, attack=attack, eps=e, region=col[5:]))
  return out


def robust_fraction_rows(per_case: list[dict], models, attacks, eps, factor: float) -> list[dict]:
  """3D AutoAttack-style: a volume is broken when its mean Dice < factor x the model's clean mean Dice."""
  out = []
  for model in models:
    clean = tables.paired_values(per_case, {"model": model, "attack": "clean"}, "dice_mean")
    cases = list(clean)
    dice_clean = np.asarray([clean[c] for c in cases])
    for e in eps:
      by_attack = {a: tables.paired_values(per_case, {"model": model, "attack": a, "eps": e}, "dice_mean")
                   for a in attacks}
      fns = [(a, (lambda idx, d=by_attack[a]: np.asarray([d[cases[i]] for i in idx]))) for a in attacks]
      res = sanity.sequential_robustness(fns, dice_clean, factor=factor)
      out.append({"model": model, "eps": float(e), "attack": "clean", "threshold": res["threshold"],
                  "robust_alone": float(np.mean(dice_clean >= res["threshold"])),
                  "robust_sequential": float(np.mean(dice_clean >= res["threshold"]))})
      for a in attacks:
        alone = np.asarray([by_attack[a][c] for c in cases])
        out.append({"model": model, "eps": float(e), "attack": a, "threshold": res["threshold"],
                    "robust_alone": float(np.mean((alone >= res["threshold"]) & (dice_clean >= res["threshold"]))),
                    "robust_sequential": res["robust_after"][a]})
  return out
