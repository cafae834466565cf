"""Segmentation losses: the ONE implementation for training and attacks (`attacks.losses` wraps these).

Per-voxel primitives (`voxel_cross_entropy`, `voxel_region_bce`), the masked spatial mean (`masked_mean`) and
soft Dice on probabilities (`soft_dice_loss`) build every loss: the training losses here (`cross_entropy`,
`soft_dice`, `ce_dice`, `region_bce`, `region_dice`, `region_bce_dice`, `distillation`) and the attack
reducers in `mri_poison.attacks.losses` (CE, SegPGD, CosPGD, Dice, region losses).

Conventions (documented here once; they hold for every loss in the project):

- Shapes: logits (B, *S, K), int labels (B, *S) with the contract's values {0..3}. Every loss returns
  per-example values (B,): examples never mix, so the gradient of sum(loss) is every example's own gradient.
- dtype: everything is computed in float32 whatever the logits' dtype (bfloat16 logits are upcast first).
- mask: optional, broadcastable to (B, *S); bool or float weights w >= 0 (None = all ones). Every voxel sum is
  weighted by w. With a 0/1 mask, masked-out voxels add nothing to any sum and do not count in any mean.
- Means: `masked_mean` = sum(w v) / max(sum(w), 1e-12) over an example's voxels, i.e. the w-weighted mean.
  The floor is tiny (not 1), so soft weights whose sum is below 1 still give a true weighted mean.
- Empty mask (all weights 0): a mean is 0 (0 / 1e-12); soft Dice gives every channel (2*0 + s) / (0 + s) = 1,
  so the Dice loss is 0. An empty example therefore contributes 0 and a zero gradient, never NaN.
- Smoothing: soft Dice per channel c = (2 sum w p t + s) / (sum w p + sum w t + s) with s = `SMOOTH` = 1e-5 in
  numerator and denominator (MONAI's DiceLoss with smooth_nr = smooth_dr = s): a channel absent from both the
  prediction and the target scores 1. The loss is 1 - mean over channels. p are probabilities (softmax over
  classes, or sigmoid per region), t one-hot / region targets.
- Background: `soft_dice` drops class 0 by default (training); the attacks' Dice keeps it
  (`soft_dice(..., include_background=True)`). Region losses have no background channel.
- Regions: region (sigmoid) models output 3 logits in (WT, TC, ET) order; targets come from
  `data.case.brats_regions` (WT = {1,2,3}, TC = {1,3}, ET = {3}). Region BCE is the numerically stable
  softplus(z) - z t, averaged over the 3 regions per voxel.
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from mri_poison.data.case import brats_regions

Array = jax.Array

SMOOTH = 1e-5  # soft Dice smoothing in numerator and denominator
_MEAN_FLOOR = 1e-12  # masked_mean denominator floor: an empty mask gives 0, not NaN

# The names in this module that are training losses `fn(logits, labels, mask=None) -> (B,)` (config
# `train.loss`); the rest are primitives or have other signatures.
TRAINING_LOSSES = ("cross_entropy", "soft_dice", "ce_dice", "region_bce", "region_dice", "region_bce_dice")


# ------------------------------------------------------------------------------------------- primitives


def _check_shapes(logits, labels):
  if logits.shape[:-1] != labels.shape:
    raise ValueError(f"logits {logits.shape} must be labels {labels.shape} + (K,)")


def _weights(mask, shape) -> Array:
  """The mask as float32 weights of `shape` (all ones when None)."""
  if mask is None:
    return jnp.ones(shape, jnp.float32)
  return jnp.broadcast_to(jnp.asarray(mask, jnp.float32), shape)


def _spatial_axes(x, keep_last=False):
  """Axes 1..end (excluding the channel axis when keep_last)."""
  return tuple(range(1, x.ndim - 1 if keep_last else x.ndim))


def masked_mean(values, mask=None) -> Array:
  """Weighted mean over the spatial axes: values (B, *S), mask broadcastable to it -> (B,) (0 if empty)."""
  values = jnp.asarray(values, jnp.float32)
  w = _weights(mask, values.shape)
  axes = _spatial_axes(values)
  return jnp.sum(values * w, axis=axes) / jnp.maximum(jnp.sum(w, axis=axes), _MEAN_FLOOR)


def voxel_cross_entropy(logits, labels) -> Array:
  """Per-voxel softmax cross-entropy -log softmax(logits)[label]: (B, *S, K), (B, *S) -> (B, *S) float32."""
  logits = jnp.asarray(logits, jnp.float32)
  labels = jnp.asarray(labels)
  _check_shapes(logits, labels)
  log_p = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.take_along_axis(log_p, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]


def soft_dice_loss(probs, targets, mask=None, smooth=SMOOTH) -> Array:
  """1 - mean over channels of soft Dice: probs, targets (B, *S, C) in [0, 1], mask ~ (B, *S) -> (B,).

  Per channel (2 sum w p t + smooth) / (sum w p + sum w t + smooth), sums over the example's voxels.
  """
  probs = jnp.asarray(probs, jnp.float32)
  targets = jnp.asarray(targets, jnp.float32)
  m = _weights(mask, probs.shape[:-1])[..., None]
  axes = _spatial_axes(probs, keep_last=True)
  inter = jnp.sum(probs * targets * m, axis=axes)
  denom = jnp.sum(probs * m, axis=axes) + jnp.sum(targets * m, axis=axes)
  dice = (2.0 * inter + smooth) / (denom + smooth)
  return 1.0 - jnp.mean(dice, axis=-1)


def _region_inputs(logits, labels, name):
  logits = jnp.asarray(logits, jnp.float32)
  labels = jnp.asarray(labels)
  if logits.shape[-1] != 3:
    raise ValueError(f"{name} needs 3 region logits (WT, TC, ET) in the last axis, got {logits.shape}")
  _check_shapes(logits, labels)
  return logits, brats_regions(labels).astype(jnp.float32)


def voxel_region_bce(logits, labels) -> Array:
  """Per-voxel sigmoid BCE to the (WT, TC, ET) regions, mean over the 3 regions: (B, *S, 3) -> (B, *S)."""
  logits, targets = _region_inputs(logits, labels, "voxel_region_bce")
  # Stable BCE with logits: softplus(z) - z t = -[t log s(z) + (1 - t) log(1 - s(z))].
  return jnp.mean(jax.nn.softplus(logits) - logits * targets, axis=-1)


# ------------------------------------------------------------------------------------------- losses (B,)


def cross_entropy(logits, labels, mask=None) -> Array:
  """Softmax cross-entropy, mean over the (masked) voxels of each example -> (B,)."""
  return masked_mean(voxel_cross_entropy(logits, labels), mask)


def soft_dice(logits, labels, mask=None, smooth=SMOOTH, include_background=False) -> Array:
  """1 - mean soft Dice over classes (softmax probabilities vs one-hot labels) -> (B,).

  A class absent from both prediction and labels scores Dice 1 (the `smooth` terms), as in MONAI's DiceLoss
  with smooth_nr = smooth_dr = smooth. Class 0 is dropped unless `include_background`.
  """
  logits = jnp.asarray(logits, jnp.float32)
  labels = jnp.asarray(labels)
  _check_shapes(logits, labels)
  k = logits.shape[-1]
  probs = jax.nn.softmax(logits, axis=-1)
  targets = jax.nn.one_hot(labels, k, dtype=jnp.float32)
  if not include_background:
    if k < 2:
      raise ValueError("soft_dice without background needs at least 2 classes")
    probs, targets = probs[..., 1:], targets[..., 1:]
  return soft_dice_loss(probs, targets, mask, smooth)


def ce_dice(logits, labels, mask=None, ce_weight=1.0, dice_weight=1.0, smooth=SMOOTH, include_background=False):
  """ce_weight * cross_entropy + dice_weight * soft_dice -> (B,)."""
  return (ce_weight * cross_entropy(logits, labels, mask)
          + dice_weight * soft_dice(logits, labels, mask, smooth=smooth, include_background=include_background))


def region_bce(logits, labels, mask=None) -> Array:
  """Region (sigmoid) BCE to (WT, TC, ET), mean over regions and (masked) voxels -> (B,). logits (B, *S, 3)."""
  return masked_mean(voxel_region_bce(logits, labels), mask)


def region_dice(logits, labels, mask=None, smooth=SMOOTH) -> Array:
  """Region soft Dice loss: sigmoid(logits) vs the (WT, TC, ET) targets, 1 - mean over regions -> (B,)."""
  logits, targets = _region_inputs(logits, labels, "region_dice")
  return soft_dice_loss(jax.nn.sigmoid(logits), targets, mask, smooth)


def region_bce_dice(logits, labels, mask=None, smooth=SMOOTH) -> Array:
  """BraTS region loss: `region_bce` + `region_dice` -> (B,).

  logits (B, *S, 3); labels are contract labels {0..3}, turned into region targets by `brats_regions`.
  """
  logits, _ = _region_inputs(logits, labels, "region_bce_dice")
  return region_bce(logits, labels, mask) + region_dice(logits, labels, mask, smooth)


def distillation(logits, soft_targets, temperature, mask=None):
  """T^2 * CE(soft_targets, softmax(logits / T)), mean over masked voxels -> (B,) (Hinton et al. 2015).

  soft_targets (B, *S, K) are probabilities (the teacher's softmax at temperature T). The T^2 factor keeps
  gradient magnitudes comparable across temperatures. `temperature` may be a traced array.
  """
  logits = jnp.asarray(logits, jnp.float32)
  soft_targets = jnp.asarray(soft_targets, jnp.float32)
  if soft_targets.shape != logits.shape:
    raise ValueError(f"soft_targets {soft_targets.shape} must match logits {logits.shape}")
  t = jnp.asarray(temperature, jnp.float32)
  ce = -jnp.sum(soft_targets * jax.nn.log_softmax(logits / t, axis=-1), axis=-1)
  return t**2 * masked_mean(ce, mask)


def downsample_labels(labels, factor: int):
  """Nearest-neighbour (strided) down-sampling of (B, *S) labels or masks by an integer factor per axis."""
  if factor == 1:
    return labels
  return labels[(slice(None),) + (slice(None, None, factor),) * (labels.ndim - 1)]


def deep_supervision_loss(loss_fn: Callable, outputs: Sequence, labels, mask=None, weights=None):
  """Weighted sum of `loss_fn(logits_k, labels_k, mask_k)` over a UNet deep-supervision output tuple -> (B,).

  outputs[k] is at 1/2^k resolution; labels (and mask) are down-sampled by striding (nearest neighbour, as
  nnU-Net). Default weights 1/2^k normalised to sum 1.
  """
  if weights is None:
    weights = [0.5**k for k in range(len(outputs))]
  if len(weights) != len(outputs):
    raise ValueError(f"{len(weights)} weights for {len(outputs)} outputs")
  total = sum(weights)
  loss = 0.0
  for k, (out, w) in enumerate(zip(outputs, weights)):
    factor = labels.shape[1] // out.shape[1]
    m = None
    if mask is not None:
      m = downsample_labels(jnp.broadcast_to(jnp.asarray(mask), labels.shape), factor)
    loss = loss + (w / total) * loss_fn(out, downsample_labels(labels, factor), m)
  return loss
