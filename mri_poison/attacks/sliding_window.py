"""Differentiable sliding-window inference, so an attack goes through the model as it is deployed.

On BraTS-sized volumes (240 x 240 x 155) a 3D model is run on overlapping windows whose logits are blended
with a Gaussian weight (`train.evaluate.sliding_window_predict`). `sliding_window_logits` computes the same
blended logits with the same windows and weights, for a batch of volumes, as a function JAX can
differentiate; `windowed_apply` wraps a model's `apply_fn` so that any `DenseLoss` and attack of
`mri_poison.attacks` runs through it unchanged and nothing is cropped away from the reference labels.

Memory is bounded by one window batch: one `lax.scan` over window batches accumulates the weighted logits
into the output, and with `remat` each window batch is a `jax.checkpoint`, so the backward pass keeps only
the window corners per step and recomputes one window batch's activations at a time.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mri_poison.train.evaluate import gaussian_importance, window_starts

Array = jax.Array


def _window_plan(spatial, window, overlap, batch, sigma_scale):
  """Host-side plan for padded spatial dims: corners (steps, batch, nd), valid (steps, batch), weight, norm.

  The corner list is padded to a multiple of `batch` with invalid (weight 0) windows at the origin, and the
  normaliser sum_w weight is accumulated in float32 in the order `sliding_window_predict` adds it.
  """
  starts = window_starts(spatial, window, overlap)
  batch = max(1, min(int(batch), len(starts)))
  n_pad = -len(starts) % batch
  valid = np.concatenate([np.ones(len(starts), np.float32), np.zeros(n_pad, np.float32)])
  starts = np.concatenate([starts, np.zeros((n_pad, len(window)), np.int32)])
  weight = gaussian_importance(window, sigma_scale)
  norm = np.zeros(spatial, np.float32)
  for corner, v in zip(starts, valid):
    norm[tuple(slice(c, c + w) for c, w in zip(corner, window))] += weight * v
  return (starts.reshape(-1, batch, len(window)), valid.reshape(-1, batch), weight, norm[..., None])


def sliding_window_logits(apply_fn: Callable, params, image, *, window: Sequence[int], overlap: float = 0.5,
                          batch: int = 1, sigma_scale: float = 0.125, remat: bool = True) -> Array:
  """Gaussian-blended sliding-window logits (B, *S, K) of volumes `image` (B, *S, C); differentiable.

  apply_fn(params, x) -> logits (n, *window, K) for windows x (n, *window, C), e.g.
  `train.state.make_apply_fn(model)`. Windows, overlap, weights and padding are those of
  `train.evaluate.sliding_window_predict` (axes shorter than the window are zero-padded, centred, and
  cropped back), so `sliding_window_logits(f, p, v[None], ...)[0]` equals `sliding_window_predict(f, p, v,
  ...)` up to float rounding. `batch` windows go through the model at once (each for every volume:
  B * batch windows per call). One window covering the (padded) volume is the whole-volume model exactly (the
  blend w * z / w would only add rounding). `remat` recomputes each window batch in the backward pass
  (memory of one window batch instead of all of them).
  """
  image = jnp.asarray(image)
  spatial = tuple(image.shape[1:-1])
  window = tuple(int(w) for w in window)
  if image.ndim < 3 or len(window) != len(spatial):
    raise ValueError(f"sliding_window_logits: window {window} does not match image {image.shape} "
                     "((B, *spatial, C) with one window size per spatial axis expected)")
  if min(window) < 1:
    raise ValueError(f"sliding_window_logits: window sizes must be >= 1, got {window}")
  pad = [max(w - s, 0) for w, s in zip(window, spatial)]
  if any(pad):
    image = jnp.pad(image, [(0, 0)] + [(p // 2, p - p // 2) for p in pad] + [(0, 0)])
  padded = tuple(image.shape[1:-1])
  starts, valid, weight, norm = _window_plan(padded, window, overlap, batch, sigma_scale)
  if starts.size // len(window) == 1 and padded == window:
    out = jnp.asarray(apply_fn(params, image), jnp.float32)
  else:
    out = _blend(apply_fn, params, image, starts, valid, weight, norm, remat=bool(remat))
  if any(pad):
    out = out[(slice(None),) + tuple(slice(p // 2, p // 2 + s) for p, s in zip(pad, spatial))]
  return out


def _blend(apply_fn, params, image, starts, valid, weight, norm, *, remat):
  """sum_w weight * logits_w / norm over the window batches `starts` (steps, batch, nd), one scan step each."""
  b, channels = image.shape[0], image.shape[-1]
  steps, batch, nd = starts.shape
  window = weight.shape

  def window_logits(params, image, corners):
    # (batch, nd) corners -> (batch, B, *window, K) logits; the crops are made inside, so with remat the
    # residual kept per step is the corner array, not the crops.
    crop = lambda c: jax.lax.dynamic_slice(image, (0, *(c[d] for d in range(nd)), 0), (b, *window, channels))
    crops = jax.vmap(crop)(corners)  # (batch, B, *window, C)
    logits = apply_fn(params, crops.reshape((batch * b, *window, channels)))
    logits = jnp.asarray(logits, jnp.float32)
    return logits.reshape((batch, b, *window, logits.shape[-1]))

  if remat:
    window_logits = jax.checkpoint(window_logits)
  k = jax.eval_shape(window_logits, params, image, jnp.zeros((batch, nd), jnp.int32)).shape[-1]
  w = jnp.asarray(weight)[..., None]

  def body(acc, xs):
    corners, v = xs
    logits = window_logits(params, image, corners)

    def add(i, acc):
      corner = (0, *(corners[i, d] for d in range(nd)), 0)
      update = jax.lax.dynamic_slice(acc, corner, (b, *window, k)) + (w * v[i]) * logits[i]
      return jax.lax.dynamic_update_slice(acc, update, corner)
    return jax.lax.fori_loop(0, batch, add, acc), None

  acc = jnp.zeros((b, *image.shape[1:-1], k), jnp.float32)
  acc, _ = jax.lax.scan(body, acc, (jnp.asarray(starts), jnp.asarray(valid)))
  return acc / jnp.asarray(norm)


@dataclasses.dataclass(frozen=True)
class WindowedApply:
  """`apply_fn'(params, x) = sliding_window_logits(apply_fn, params, x, ...)`; hashable by value, so a
  `DenseLoss` built on it (apply_fn is a static field) compiles once per model and window setting."""
  apply_fn: Callable
  window: tuple
  overlap: float = 0.5
  batch: int = 1
  sigma_scale: float = 0.125
  remat: bool = True

  def __call__(self, params, x) -> Array:
    return sliding_window_logits(self.apply_fn, params, x, window=self.window, overlap=self.overlap,
                                 batch=self.batch, sigma_scale=self.sigma_scale, remat=self.remat)


def windowed_apply(apply_fn: Callable, *, window: Sequence[int], overlap: float = 0.5, batch: int = 1,
                   sigma_scale: float = 0.125, remat: bool = True) -> WindowedApply:
  """`apply_fn` run through deployed (sliding-window) inference: any DenseLoss / attack then sees it.

  Example: `losses.cross_entropy(windowed_apply(apply_fn, window=(128,) * 3), params, labels, brain)` gives
  an attack loss on whole 240 x 240 x 155 volumes scored as deployed.
  """
  window = tuple(int(w) for w in window)
  if not 0.0 <= float(overlap) < 1.0:
    raise ValueError(f"windowed_apply: overlap must be in [0, 1), got {overlap}")
  if int(batch) < 1 or min(window, default=0) < 1:
    raise ValueError(f"windowed_apply: batch ({batch}) and window sizes ({window}) must be >= 1")
  return WindowedApply(apply_fn, window, float(overlap), int(batch), float(sigma_scale), bool(remat))
