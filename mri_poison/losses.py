"""Segmentation losses on logits (B, *S, K) and int labels (B, *S); every loss returns per-example values (B,).

`mask` (optional, broadcastable to (B, *S), bool or 0/1 weights) removes voxels: they add nothing to any sum
and do not count in any mean. An example whose mask is empty gets loss 0 (CE) / 0 (Dice: every class is
"both empty", Dice 1). Everything is computed in float32 whatever the logits' dtype.
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from mri_poison.data.case import brats_regions


def _prepare(logits, labels, mask):
  logits = jnp.asarray(logits, jnp.float32)
  labels = jnp.asarray(labels)
  if logits.shape[:-1] != labels.shape:
    raise ValueError(f"logits {logits.shape} must be labels {labels.shape} + (K,)")
  if mask is None:
    mask = jnp.ones(labels.shape, jnp.float32)
  else:
    mask = jnp.broadcast_to(jnp.asarray(mask, jnp.float32), labels.shape)
  return logits, labels, mask


def _spatial_axes(x, keep_last=False):
  """Axes 1..end (excluding the class axis when keep_last)."""
  return tuple(range(1, x.ndim - 1 if keep_last else x.ndim))


def _masked_mean(values, mask):
  axes = _spatial_axes(values)
  return jnp.sum(values * mask, axis=axes) / jnp.maximum(jnp.sum(mask, axis=axes), 1e-12)


def cross_entropy(logits, labels, mask=None):
  """Softmax cross-entropy, mean over the (masked) voxels of each example -> (B,)."""
  logits, labels, mask = _prepare(logits, labels, mask)
  log_p = jax.nn.log_softmax(logits, axis=-1)
  ce = -jnp.take_along_axis(log_p, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return _masked_mean(ce, mask)


def _soft_dice_loss(probs, targets, mask, smooth):
  """1 - mean over channels of (2 sum p t + smooth) / (sum p + sum t + smooth); sums over masked voxels."""
  m = mask[..., None]
  axes = _spatial_axes(probs, keep_last=True)
  inter = jnp.sum(probs * targets * m, axis=axes)
  denom = jnp.sum(probs * m, axis=axes) + jnp.sum(targets * m, axis=axes)
  dice = (2.0 * inter + smooth) / (denom + smooth)
  return 1.0 - jnp.mean(dice, axis=-1)


def soft_dice(logits, labels, mask=None, smooth=1e-5, include_background=False):
  """1 - mean soft Dice over classes (softmax probabilities vs one-hot labels) -> (B,).

  A class absent from both prediction and labels scores Dice 1 (the `smooth` terms), as in MONAI's DiceLoss
  with smooth_nr = smooth_dr = smooth. Class 0 is dropped unless `include_background`.
  """
  logits, labels, mask = _prepare(logits, labels, mask)
  k = logits.shape[-1]
  probs = jax.nn.softmax(logits, axis=-1)
  targets = jax.nn.one_hot(labels, k, dtype=jnp.float32)
  if not include_background:
    if k < 2:
      raise ValueError("soft_dice without background needs at least 2 classes")
    probs, targets = probs[..., 1:], targets[..., 1:]
  return _soft_dice_loss(probs, targets, mask, smooth)


def ce_dice(logits, labels, mask=None, ce_weight=1.0, dice_weight=1.0, smooth=1e-5, include_background=False):
  """ce_weight * cross_entropy + dice_weight * soft_dice -> (B,)."""
  return (ce_weight * cross_entropy(logits, labels, mask)
          + dice_weight * soft_dice(logits, labels, mask, smooth=smooth, include_background=include_background))


def region_bce_dice(logits, labels, mask=None, smooth=1e-5):
  """BraTS region loss: sigmoid on 3 channels (WT, TC, ET) -> BCE (mean over voxels and regions) + soft Dice.

  logits (B, *S, 3); labels are contract labels {0..3}, turned into region targets by `brats_regions`.
  """
  logits = jnp.asarray(logits, jnp.float32)
  if logits.shape[-1] != 3:
    raise ValueError(f"region_bce_dice needs 3 region logits (WT, TC, ET) in the last axis, got {logits.shape}")
  _, labels, mask = _prepare(logits, labels, mask)
  targets = brats_regions(jnp.asarray(labels)).astype(jnp.float32)
  # Stable BCE with logits: softplus(x) - x t = -[t log s(x) + (1 - t) log(1 - s(x))].
  bce = jnp.mean(jax.nn.softplus(logits) - logits * targets, axis=-1)
  return _masked_mean(bce, mask) + _soft_dice_loss(jax.nn.sigmoid(logits), targets, mask, smooth)


def distillation(logits, soft_targets, temperature, mask=None):
  """T^2 * CE(soft_targets, softmax(logits / T)), mean over masked voxels -> (B,) (Hinton et al. 2015).

  soft_targets (B, *S, K) are probabilities (the teacher's softmax at temperature T). The T^2 factor keeps
  gradient magnitudes comparable across temperatures. `temperature` may be a traced array.
  """
  logits = jnp.asarray(logits, jnp.float32)
  soft_targets = jnp.asarray(soft_targets, jnp.float32)
  if soft_targets.shape != logits.shape:
    raise ValueError(f"soft_targets {soft_targets.shape} must match logits {logits.shape}")
  _, _, mask = _prepare(logits, jnp.zeros(logits.shape[:-1], jnp.int32), mask)
  t = jnp.asarray(temperature, jnp.float32)
  ce = -jnp.sum(soft_targets * jax.nn.log_softmax(logits / t, axis=-1), axis=-1)
  return t**2 * _masked_mean(ce, mask)


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
