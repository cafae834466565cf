"""Dense (per-voxel) attack losses and target maps for segmentation models.

Every builder returns a `DenseLoss`: a callable `loss_fn(x, step=0) -> (B,)` that is also a pytree whose
leaves are the params, labels/targets and mask, so the attack loop receives them as jit arguments (compile
once for a new batch or a new checkpoint). `apply_fn(params, x) -> logits (B, *S, K)` float32. Labels are
int (B, *S): 0 background, 1 necrotic core, 2 oedema, 3 enhancing tumour. `mask` (broadcastable to (B, *S))
restricts which voxels count (e.g. the brain). Untargeted losses are to be increased; targeted ones measure
distance to a target map and are decreased (call the attack with `targeted=True`).

The reducers are thin per-example wrappers over the primitives of `mri_poison.losses` (the one loss
implementation); mask semantics, empty masks, smoothing, background and dtype are documented there once.
The attacks' Dice includes the background class (`soft_dice(..., include_background=True)`).

Margin losses (`margin`, `targeted_margin`; Carlini & Wagner 2017) work on the logits, not the softmax: a
saturated softmax (float32 max prob exactly 1, as a distilled model's at T = 1) turns the cross-entropy
gradient into 0 (eagerly) or rounding noise (compiled, where fused ops round differently; its sign means
nothing), but not the margin's; and the margin's sign (the decision it measures) does not change when the
logits are divided by a temperature. `scaled_apply` attacks a model at its training temperature instead.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from mri_poison import losses as seg_losses

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DenseLoss:
  """loss_fn(x, step=0) = reduce(apply_fn(params, x), labels, mask, step); arrays are pytree leaves."""
  params: Any
  labels: Array
  mask: Array | None
  reduce: Callable = dataclasses.field(metadata=dict(static=True))
  apply_fn: Callable = dataclasses.field(metadata=dict(static=True))
  steps: int = dataclasses.field(default=1, metadata=dict(static=True))

  def __call__(self, x, step=0):
    logits = jnp.asarray(self.apply_fn(self.params, x), jnp.float32)
    return self.reduce(logits, self.labels, self.mask, step, self.steps)


# ------------------------------------------------------------------------------------------- helpers


voxel_cross_entropy = seg_losses.voxel_cross_entropy  # (B, *S, K), (B, *S) -> (B, *S); re-exported for SegPGD users


def cosine_to_onehot(logits, labels) -> Array:
  """cos(softmax(logits), onehot(labels)) per voxel = p_y / ||p||_2, in [0, 1]."""
  p = jax.nn.softmax(logits, axis=-1)
  p_y = jnp.take_along_axis(p, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return p_y / jnp.maximum(jnp.linalg.norm(p, axis=-1), 1e-12)


def segpgd_weight(step, steps) -> Array:
  """SegPGD's lambda_t = (t - 1) / (2T) with t = step + 1 (step is the loop's 0-based index)."""
  return jnp.asarray(step, jnp.float32) / (2.0 * steps)


# ------------------------------------------------------------------------------------------- reducers
# reduce(logits, labels, mask, step, steps) -> (B,); `step`/`steps` matter only to SegPGD's schedule.


def _ce(logits, labels, mask, step, steps):
  del step, steps
  return seg_losses.cross_entropy(logits, labels, mask)


def _segpgd(logits, labels, mask, step, steps):
  ce = voxel_cross_entropy(logits, labels)
  correct = jax.lax.stop_gradient((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))
  lam = segpgd_weight(step, steps)
  weighted = (1.0 - lam) * correct * ce + lam * (1.0 - correct) * ce
  return seg_losses.masked_mean(weighted, mask)  # (1/N) sums over the N (masked) voxels


def _cospgd(logits, labels, mask, step, steps):
  del step, steps
  cos = jax.lax.stop_gradient(cosine_to_onehot(logits, labels))
  return seg_losses.masked_mean(cos * voxel_cross_entropy(logits, labels), mask)


def _cospgd_targeted(logits, target, mask, step, steps):
  del step, steps
  weight = jax.lax.stop_gradient(1.0 - cosine_to_onehot(logits, target))
  return seg_losses.masked_mean(weight * voxel_cross_entropy(logits, target), mask)


def _dice(logits, labels, mask, step, steps):
  del step, steps
  return seg_losses.soft_dice(logits, labels, mask, include_background=True)


def _region_bce(logits, labels, mask, step, steps):
  del step, steps
  return seg_losses.region_bce(logits, labels, mask)


def _region_dice(logits, labels, mask, step, steps):
  del step, steps
  return seg_losses.region_dice(logits, labels, mask)


def voxel_margin(logits, labels) -> Array:
  """max_{k != y} z_k - z_y per voxel: (B, *S, K), (B, *S) -> (B, *S) float32; > 0 where y is not predicted."""
  logits = jnp.asarray(logits, jnp.float32)
  labels = jnp.asarray(labels, jnp.int32)
  z_y = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
  others = jnp.where(jax.nn.one_hot(labels, logits.shape[-1], dtype=bool), -jnp.inf, logits)
  return jnp.max(others, axis=-1) - z_y


@dataclasses.dataclass(frozen=True)
class _Margin:
  """Reducer of `margin`: masked mean of min(voxel_margin, kappa). Hashable by value (compiles once per kappa)."""
  kappa: float

  def __call__(self, logits, labels, mask, step, steps):
    del step, steps
    return seg_losses.masked_mean(jnp.minimum(voxel_margin(logits, labels), self.kappa), mask)


@dataclasses.dataclass(frozen=True)
class _TargetedMargin:
  """Reducer of `targeted_margin`: masked mean of max(voxel_margin(target), -kappa); the must-change voxels
  are already folded into `mask`."""
  kappa: float

  def __call__(self, logits, target, mask, step, steps):
    del step, steps
    return seg_losses.masked_mean(jnp.maximum(voxel_margin(logits, target), -self.kappa), mask)


def _as_labels(labels):
  return jnp.asarray(labels, jnp.int32)


def _as_mask(mask):
  return None if mask is None else jnp.asarray(mask)


# ------------------------------------------------------------------------------------------- builders


def cross_entropy(apply_fn, params, labels, mask=None) -> DenseLoss:
  """Mean per-voxel cross-entropy to the true labels (increase it)."""
  return DenseLoss(params, _as_labels(labels), _as_mask(mask), _ce, apply_fn)


def segpgd(apply_fn, params, labels, steps, mask=None) -> DenseLoss:
  """SegPGD (Gu et al., ECCV 2022): ((1-l_t)/N) sum_correct CE + (l_t/N) sum_wrong CE, l_t = (t-1)/(2T).

  `steps` is the attack's T; the loop passes the 0-based step, so t = step + 1. (A widely copied
  implementation swaps the two weights; this follows the paper's equation.)
  """
  return DenseLoss(params, _as_labels(labels), _as_mask(mask), _segpgd, apply_fn, int(steps))


def cospgd(apply_fn, params, labels, mask=None) -> DenseLoss:
  """CosPGD (Agnihotri et al., ICML 2024): per-voxel CE x stop_gradient(cos(softmax, onehot(labels)))."""
  return DenseLoss(params, _as_labels(labels), _as_mask(mask), _cospgd, apply_fn)


def dice(apply_fn, params, labels, mask=None) -> DenseLoss:
  """Soft Dice loss over the K softmax classes, background included (1 - mean Dice; increase it)."""
  return DenseLoss(params, _as_labels(labels), _as_mask(mask), _dice, apply_fn)


def region_bce(apply_fn, params, labels, mask=None) -> DenseLoss:
  """For region (sigmoid) models with logits (B, *S, 3) in (WT, TC, ET) order: mean BCE to the regions."""
  return DenseLoss(params, _as_labels(labels), _as_mask(mask), _region_bce, apply_fn)


def region_dice(apply_fn, params, labels, mask=None) -> DenseLoss:
  """Region (sigmoid) soft Dice loss over (WT, TC, ET)."""
  return DenseLoss(params, _as_labels(labels), _as_mask(mask), _region_dice, apply_fn)


def margin(apply_fn, params, labels, mask=None, kappa=float("inf")) -> DenseLoss:
  """CW-style logit margin to the true labels (increase it): masked mean of min(max_{k!=y} z_k - z_y, kappa).

  A voxel is misclassified exactly where its margin is > 0. The default kappa = inf never clips; a finite
  kappa stops rewarding a voxel once it is wrong by kappa logits, so the budget goes to the voxels still right.
  """
  kappa = float(kappa)
  if math.isnan(kappa):
    raise ValueError("margin: kappa must be a number (inf = no clipping), got nan")
  return DenseLoss(params, _as_labels(labels), _as_mask(mask), _Margin(kappa), apply_fn)


def targeted_margin(apply_fn, params, target, labels, mask=None, kappa=0.0) -> DenseLoss:
  """Margin of the target class over the voxels that must change only (decrease it: targeted=True).

  Per voxel m = max_{k!=t} z_k - z_t (< 0 where the target t is predicted), clipped below at -kappa, averaged
  over the must-change voxels (target != labels, weighted by `mask`) of each example; 0 when there are none.
  Voxels the target leaves unchanged do not count, so a small tumour is not drowned by the brain around it.
  kappa >= 0 is the confidence asked beyond the decision boundary: with the default 0 a voxel that already
  shows the target contributes 0 and no gradient, and the attack spends its budget on the others.
  """
  kappa = float(kappa)
  if not kappa >= 0:
    raise ValueError(f"targeted_margin: kappa must be >= 0, got {kappa}")
  target, labels = _as_labels(target), _as_labels(labels)
  if target.shape != labels.shape:
    raise ValueError(f"targeted_margin: target {target.shape} and labels {labels.shape} shapes differ")
  must_change = (target != labels).astype(jnp.float32)
  if mask is not None:
    must_change = must_change * jnp.broadcast_to(jnp.asarray(mask, jnp.float32), must_change.shape)
  return DenseLoss(params, target, must_change, _TargetedMargin(kappa), apply_fn)


def targeted_cross_entropy(apply_fn, params, target, mask=None) -> DenseLoss:
  """Mean CE to a target map (decrease it: attack with targeted=True)."""
  return DenseLoss(params, _as_labels(target), _as_mask(mask), _ce, apply_fn)


def targeted_dice(apply_fn, params, target, mask=None) -> DenseLoss:
  """Soft Dice loss to a target map (decrease it)."""
  return DenseLoss(params, _as_labels(target), _as_mask(mask), _dice, apply_fn)


def targeted_cospgd(apply_fn, params, target, mask=None) -> DenseLoss:
  """Targeted CosPGD: CE to the target x stop_gradient(1 - cos(softmax, onehot(target))) (decrease it)."""
  return DenseLoss(params, _as_labels(target), _as_mask(mask), _cospgd_targeted, apply_fn)


# ------------------------------------------------------------------------------------------- model wrappers


@dataclasses.dataclass(frozen=True)
class ScaledApply:
  """`apply_fn(params, x) / temperature`; equal (hence one compile) for an equal apply_fn and temperature."""
  apply_fn: Callable
  temperature: float

  def __call__(self, params, x):
    return jnp.asarray(self.apply_fn(params, x), jnp.float32) / self.temperature


def scaled_apply(apply_fn, temperature) -> ScaledApply:
  """apply_fn' = apply_fn(params, x) / T: attack a distilled model at its training temperature.

  A model distilled at T and deployed at T = 1 has logits about T times larger than its softmax was trained
  on; at T = 1 its softmax saturates and cross-entropy gradients vanish (gradient masking). Dividing by T
  restores the gradients without changing the prediction (argmax is scale-invariant).
  """
  temperature = float(temperature)
  if not temperature > 0:
    raise ValueError(f"scaled_apply: temperature must be > 0, got {temperature}")
  return ScaledApply(apply_fn, temperature)


# ------------------------------------------------------------------------------------------- targets


def target_erase_tumour(labels) -> Array:
  """Every voxel -> background (0)."""
  return jnp.zeros_like(_as_labels(labels))


def target_et_to_oedema(labels) -> Array:
  """Enhancing tumour (3) -> oedema (2); everything else unchanged."""
  labels = _as_labels(labels)
  return jnp.where(labels == 3, 2, labels)


def target_least_likely(apply_fn, params, x) -> Array:
  """Per-voxel least-likely class of the model on the clean input (Kurakin et al.'s targeted variant)."""
  return jnp.argmin(apply_fn(params, x), axis=-1).astype(jnp.int32)
