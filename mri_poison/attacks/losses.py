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
"""
from __future__ import annotations

import dataclasses
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


def targeted_cross_entropy(apply_fn, params, target, mask=None) -> DenseLoss:
  """Mean CE to a target map (decrease it: attack with targeted=True)."""
  return DenseLoss(params, _as_labels(target), _as_mask(mask), _ce, apply_fn)


def targeted_dice(apply_fn, params, target, mask=None) -> DenseLoss:
  """Soft Dice loss to a target map (decrease it)."""
  return DenseLoss(params, _as_labels(target), _as_mask(mask), _dice, apply_fn)


def targeted_cospgd(apply_fn, params, target, mask=None) -> DenseLoss:
  """Targeted CosPGD: CE to the target x stop_gradient(1 - cos(softmax, onehot(target))) (decrease it)."""
  return DenseLoss(params, _as_labels(target), _as_mask(mask), _cospgd_targeted, apply_fn)


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
