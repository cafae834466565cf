"""APGD with the segmentation losses of SEA (Croce, Singh & Hein, "Towards reliable evaluation and fast training
of robust semantic segmentation models", ECCV 2024).

SEA's point: one loss does not find the worst case of a segmentation model, because pixels already wrong keep
pulling the gradient (their CE is unbounded) while the pixels still right are the ones to flip. Its losses,
per voxel of the brain, averaged per case:

- `apgd_ce`: plain CE (APGD's schedule alone, the baseline of the others);
- `apgd_js`: Jensen-Shannon divergence between softmax(z) and one-hot(y): bounded (at most log 2), so wrong
  voxels stop dominating;
- `apgd_mce`: masked CE, CE on the voxels still classified correctly only (the mask is not differentiated);
- `apgd_bmce`: balanced masked CE, the masked CE with each voxel weighted by 1 - the share of its true class
  in the case's brain, so the few tumour voxels are not drowned by the background.

Each runs APGD (`attacks.apgd`); the adaptive threat (per case, the worst over every attack run) then plays
SEA's ensemble. Each returns the iterate of the lowest mean Dice (see `WithDice`); the recorded history is the
deployed model's plain CE, as for every iterative attack.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mri_poison import losses as seg_losses
from mri_poison import metrics
from mri_poison.attacks import apgd
from mri_poison.attacks import losses as attack_losses
from mri_poison.attacks.eps_sweep import sweep
from mri_poison.attacks.zoo import Inputs, Threat, register

Array = jax.Array


def voxel_js(logits, labels) -> Array:
  """JS(softmax(z) || one-hot(y)) per voxel, in [0, log 2]: (B, *S, K), (B, *S) -> (B, *S).

  With p = p_y, m = (softmax + one-hot) / 2 is p_k / 2 off the label and (p + 1) / 2 on it, so
  JS = ((1 - p) log 2 + p log(2p / (p + 1)) - log((p + 1) / 2)) / 2: a function of p_y alone.
  """
  log_p = jnp.take_along_axis(jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1),
                              jnp.asarray(labels, jnp.int32)[..., None], axis=-1)[..., 0]
  p = jnp.exp(log_p)
  log2 = jnp.log(2.0)
  return 0.5 * ((1.0 - p) * log2 + p * (log2 + log_p - jnp.log1p(p)) - (jnp.log1p(p) - log2))


def _correct(logits, labels) -> Array:
  return jax.lax.stop_gradient((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))


def class_balance(labels, mask, classes: int) -> Array:
  """Per voxel, 1 - the share of its label among the case's (masked) voxels: (B, *S)."""
  w = jnp.ones(labels.shape, jnp.float32) if mask is None else jnp.broadcast_to(jnp.asarray(mask, jnp.float32),
                                                                               labels.shape)
  axes = tuple(range(1, labels.ndim))
  onehot = jax.nn.one_hot(labels, classes, dtype=jnp.float32) * w[..., None]
  share = jnp.sum(onehot, axis=axes) / jnp.maximum(jnp.sum(w, axis=axes), 1.0)[:, None]  # (B, K)
  return 1.0 - jnp.take_along_axis(share[:, None, :], labels.reshape(labels.shape[0], -1, 1), axis=-1).reshape(
      labels.shape)


def _js(logits, labels, mask, step, steps):
  del step, steps
  return seg_losses.masked_mean(voxel_js(logits, labels), mask)


def _masked_ce(logits, labels, mask, step, steps):
  del step, steps
  return seg_losses.masked_mean(_correct(logits, labels) * seg_losses.voxel_cross_entropy(logits, labels), mask)


def _balanced_masked_ce(logits, labels, mask, step, steps):
  del step, steps
  weight = _correct(logits, labels) * class_balance(labels, mask, logits.shape[-1])
  return seg_losses.masked_mean(weight * seg_losses.voxel_cross_entropy(logits, labels), mask)


def _cross_entropy(logits, labels, mask, step, steps):
  del step, steps
  return seg_losses.cross_entropy(logits, labels, mask)


REDUCERS = {"ce": _cross_entropy, "js": _js, "mce": _masked_ce, "bmce": _balanced_masked_ce}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class WithDice:
  """loss_fn(x, step) -> (the attack loss (B,), {"ce": plain CE to the labels, "dice": mean hard Dice of
  WT / TC / ET}) from one forward pass of the deployed model (neither is differentiated).

  APGD steers by the loss values and returns the iterate of the lowest Dice (the study's measure), as SEA
  returns the point of the lowest accuracy; the CE is the history every iterative attack records."""
  loss: attack_losses.DenseLoss

  def __call__(self, x, step=0):
    inner = self.loss
    logits = jnp.asarray(inner.apply_fn(inner.params, x), jnp.float32)
    value = inner.reduce(logits, inner.labels, inner.mask, step, inner.steps)
    dice = metrics.dice_from_counts(metrics.region_counts(jnp.argmax(logits, axis=-1), inner.labels))
    aux = {"ce": seg_losses.cross_entropy(logits, inner.labels, inner.mask), "dice": jnp.mean(dice, axis=-1)}
    return value, jax.lax.stop_gradient(aux)


def steps(cfg) -> int:
  """APGD's iterations: attack.apgd_steps, or attack.steps when that is 0 or absent (its schedule needs more
  steps than a sign attack: its checkpoints fall at 22 %, 41 %, 57 %, ... of them)."""
  return int(cfg.get("apgd_steps", 0)) or int(cfg.steps)


def _run(reducer):
  def run(a: Inputs):
    loss = attack_losses.DenseLoss(a.params, jnp.asarray(a.labels, jnp.int32), a.brain, reducer, a.apply_fn)
    return sweep(apgd.apgd, WithDice(loss), a.x, eps=a.eps, mask=a.brain, chunk_size=a.chunk, steps=steps(a.cfg),
                 key=a.key, restarts=int(a.cfg.restarts), score=_lowest_dice, record=_ce)
  return run


def _lowest_dice(aux):
  return -aux["dice"]


def _ce(aux):
  return aux["ce"]


_TEXT = {"ce": "CE", "js": "Jensen-Shannon divergence to the one-hot labels",
         "mce": "masked CE (voxels still correct only)",
         "bmce": "balanced masked CE (voxels still correct, weighted by 1 - their class's share)"}

for _stream, _name in enumerate(("ce", "js", "mce", "bmce"), start=11):
  register(Threat(f"apgd_{_name}", _stream, f"APGD (momentum, halving step size, best point) on {_TEXT[_name]}: "
                  "one of SEA's losses", _run(REDUCERS[_name]), iterative=True, random=True, restarts=True,
                  settings=lambda cfg, t: {"steps": steps(cfg), "rho": apgd.RHO, "momentum": apgd.MOMENTUM},
                  cost=lambda cfg: steps(cfg) * int(cfg.restarts)))
