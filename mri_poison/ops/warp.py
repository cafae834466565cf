"""Warping and Jacobian helpers: pure jnp functions for 2D and 3D, channel-last, batched.

Conventions (every function here):
- A displacement field `disp` is (B, *S, D) float32 in voxel units, D = len(S), component d along spatial
  axis d. Warping pulls back: the warped volume at voxel p is the source read at p + disp(p)
  (`warp(x, disp)(p) = x(p + u(p))`), so the same field warps an image and its label map consistently.
- Control points are (B, *G, K) on a regular grid spanning the volume corner to corner (control point i of an
  axis of length n sits at i (n - 1) / (G - 1)). `upsample` maps them to (B, *S, K) with separable linear or
  cubic B-spline weights renormalised to sum to 1 at every voxel: each dense value is a convex combination of
  control points, so a bound on the control points (a norm ball for displacements, an interval for log-bias)
  holds for the dense field exactly. That is how the attack's budgets are enforced.
- Out-of-grid samples read `cval` (0: the data contract's background) for images and labels, and the
  nearest border value for displacement fields being composed.
"""
from __future__ import annotations

import functools
import itertools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

INTERPOLATIONS = ("linear", "bspline")


# ------------------------------------------------------------------------------------------- control points


def _cubic_bspline(t: np.ndarray) -> np.ndarray:
  """The centred cubic B-spline kernel beta3(t) (support |t| < 2, integral 1)."""
  a = np.abs(t)
  return np.where(a < 1, 2.0 / 3.0 - a ** 2 + a ** 3 / 2.0, np.where(a < 2, (2.0 - a) ** 3 / 6.0, 0.0))


@functools.lru_cache(maxsize=64)
def interpolation_matrix(n_out: int, n_ctrl: int, method: str = "bspline") -> np.ndarray:
  """(n_out, n_ctrl) float32 weights, rows summing to 1, from `n_ctrl` control points to `n_out` voxels."""
  if method not in INTERPOLATIONS:
    raise ValueError(f"interpolation {method!r}: expected one of {INTERPOLATIONS}")
  n_out, n_ctrl = int(n_out), int(n_ctrl)
  if n_ctrl < 1 or n_out < 1:
    raise ValueError(f"interpolation_matrix needs n_out, n_ctrl >= 1, got {n_out}, {n_ctrl}")
  if n_ctrl == 1:
    return np.ones((n_out, 1), np.float32)
  # Voxel positions in control-point units (0 .. n_ctrl - 1).
  t = np.arange(n_out, dtype=np.float64) * (n_ctrl - 1) / max(n_out - 1, 1)
  d = t[:, None] - np.arange(n_ctrl, dtype=np.float64)[None, :]
  w = np.maximum(0.0, 1.0 - np.abs(d)) if method == "linear" else _cubic_bspline(d)
  # Near the border a B-spline lacks the control points outside the grid: renormalising keeps every row a
  # convex combination (budgets exact) at the cost of a slightly less smooth border.
  return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def upsample(control: Array, spatial: Sequence[int], method: str = "bspline") -> Array:
  """Control points (B, *G, K) -> dense field (B, *S, K), separably along each spatial axis."""
  control = jnp.asarray(control, jnp.float32)
  spatial = tuple(int(s) for s in spatial)
  if control.ndim != len(spatial) + 2:
    raise ValueError(f"control points {control.shape} must be (B, *G, K) with {len(spatial)} spatial axes")
  out = control
  for axis, n in enumerate(spatial, start=1):
    m = jnp.asarray(interpolation_matrix(n, control.shape[axis], method))
    out = jnp.moveaxis(jnp.tensordot(m, jnp.moveaxis(out, axis, 0), axes=1), 0, axis)
  return out


def project_ball(control: Array, radius) -> Array:
  """Each control-point vector (last axis) scaled onto the ball of `radius` if outside it (exact projection)."""
  norm = jnp.sqrt(jnp.sum(jnp.square(control), axis=-1, keepdims=True))
  return control * jnp.minimum(1.0, radius / jnp.maximum(norm, 1e-12))


# ------------------------------------------------------------------------------------------- sampling


def identity_grid(spatial: Sequence[int]) -> Array:
  """(*S, D) float32 voxel coordinates."""
  axes = [jnp.arange(int(s), dtype=jnp.float32) for s in spatial]
  return jnp.stack(jnp.meshgrid(*axes, indexing="ij"), axis=-1)


def _gather(volume: Array, index: list[Array]) -> Array:
  """volume (B, *S, C) at integer voxel indices (each (B, *S)) -> (B, *S, C)."""
  b = jnp.arange(volume.shape[0]).reshape((-1,) + (1,) * (index[0].ndim - 1))
  return volume[(b, *index)]


def sample(volume: Array, coords: Array, *, order: int = 1, mode: str = "constant", cval: float = 0.0) -> Array:
  """volume (B, *S, C) read at voxel coordinates (B, *S', D) -> (B, *S', C).

  order 1: multilinear (differentiable in `coords` and `volume`); order 0: nearest voxel (ties round half
  to even). mode "constant": positions outside [0, n - 1] read `cval` (per corner, so the border blends
  towards cval); "nearest": coordinates are clamped to the grid.
  """
  spatial = volume.shape[1:-1]
  d = len(spatial)
  if coords.shape[-1] != d or coords.shape[0] != volume.shape[0]:
    raise ValueError(f"coords {coords.shape} must be (B={volume.shape[0]}, *S', {d}) for volume {volume.shape}")
  if mode not in ("constant", "nearest"):
    raise ValueError(f"mode {mode!r}: expected 'constant' or 'nearest'")
  coords = coords.astype(jnp.float32)
  hi = jnp.asarray([n - 1 for n in spatial], jnp.float32)
  if mode == "nearest":
    coords = jnp.clip(coords, 0.0, hi)
  if order == 0:
    idx = jnp.round(coords).astype(jnp.int32)
    inside = jnp.all((idx >= 0) & (idx <= hi.astype(jnp.int32)), axis=-1)
    idx = jnp.clip(idx, 0, hi.astype(jnp.int32))
    out = _gather(volume, [idx[..., k] for k in range(d)])
    return jnp.where(inside[..., None], out, jnp.asarray(cval, volume.dtype))
  if order != 1:
    raise ValueError(f"order {order}: expected 0 (nearest) or 1 (linear)")
  lower = jnp.floor(coords)
  frac = coords - lower
  lower = lower.astype(jnp.int32)
  out = jnp.zeros(coords.shape[:-1] + volume.shape[-1:], jnp.float32)
  for corner in itertools.product((0, 1), repeat=d):
    idx = [lower[..., k] + corner[k] for k in range(d)]
    w = jnp.ones(coords.shape[:-1], jnp.float32)
    inside = jnp.ones(coords.shape[:-1], bool)
    for k in range(d):
      w = w * (frac[..., k] if corner[k] else 1.0 - frac[..., k])
      inside = inside & (idx[k] >= 0) & (idx[k] <= spatial[k] - 1)
    vals = _gather(volume, [jnp.clip(i, 0, n - 1) for i, n in zip(idx, spatial)]).astype(jnp.float32)
    vals = jnp.where(inside[..., None], vals, jnp.float32(cval))
    out = out + w[..., None] * vals
  return out


def _check_field(x: Array, disp: Array, what: str):
  if disp.shape[:-1] != x.shape[:disp.ndim - 1] or disp.shape[-1] != disp.ndim - 2:
    raise ValueError(f"{what}: displacement {disp.shape} must be (B, *S, D=len(S)) for {x.shape}")


def warp(image: Array, disp: Array, *, order: int = 1, cval: float = 0.0) -> Array:
  """image (B, *S, C) warped by disp (B, *S, D): out(p) = image(p + disp(p)), linear by default."""
  _check_field(image, disp, "warp")
  return sample(image, identity_grid(image.shape[1:-1]) + disp, order=order, mode="constant", cval=cval)


def warp_labels(labels: Array, disp: Array) -> Array:
  """int label map (B, *S) warped by disp with nearest-neighbour reads (values stay in the input's set)."""
  _check_field(labels, disp, "warp_labels")
  out = sample(labels[..., None], identity_grid(labels.shape[1:]) + jax.lax.stop_gradient(disp), order=0)
  return out[..., 0].astype(labels.dtype)


def compose(u: Array, v: Array) -> Array:
  """The displacement of (Id + u) o (Id + v): v(p) + u(p + v(p)); border values extend outside the grid."""
  return v + sample(u, identity_grid(u.shape[1:-1]) + v, order=1, mode="nearest")


def integrate_velocity(velocity: Array, steps: int = 6) -> Array:
  """Displacement of exp(velocity) by scaling and squaring: u = v / 2^steps, then `steps` times u <- u o u.

  Each squaring reads u by linear interpolation (a convex combination), so max |u| at most doubles per step:
  max |exp(v) - Id| <= max |v| (the displacement budget holds), and for smooth v the map is diffeomorphic
  (no folding) up to discretisation.
  """
  u = velocity / (2.0 ** int(steps))
  return jax.lax.fori_loop(0, int(steps), lambda _, w: compose(w, w), u)


# ------------------------------------------------------------------------------------------- Jacobians


def displacement_gradient(disp: Array) -> Array:
  """(B, *S, D, D) du_i / dx_j by central differences (one-sided at the border; exact for affine fields)."""
  d = disp.shape[-1]
  if d not in (2, 3):
    raise ValueError(f"displacement {disp.shape}: expected a 2D or 3D field (last axis 2 or 3)")
  grads = [jnp.gradient(disp[..., i], axis=tuple(range(1, d + 1))) for i in range(d)]
  return jnp.stack([jnp.stack(g, axis=-1) for g in grads], axis=-2)


def jacobian_determinant(disp: Array) -> Array:
  """(B, *S) det(I + grad u) of the map p -> p + u(p); <= 0 where the map folds."""
  j = displacement_gradient(disp) + jnp.eye(disp.shape[-1], dtype=disp.dtype)
  if disp.shape[-1] == 2:
    return j[..., 0, 0] * j[..., 1, 1] - j[..., 0, 1] * j[..., 1, 0]
  if disp.shape[-1] == 3:
    return (j[..., 0, 0] * (j[..., 1, 1] * j[..., 2, 2] - j[..., 1, 2] * j[..., 2, 1])
            - j[..., 0, 1] * (j[..., 1, 0] * j[..., 2, 2] - j[..., 1, 2] * j[..., 2, 0])
            + j[..., 0, 2] * (j[..., 1, 0] * j[..., 2, 1] - j[..., 1, 1] * j[..., 2, 0]))


def _mean_spatial(v: Array) -> Array:
  return jnp.mean(v, axis=tuple(range(1, v.ndim)))


def folded_fraction(disp: Array) -> Array:
  """(B,) fraction of voxels with det J <= 0."""
  return _mean_spatial((jacobian_determinant(disp) <= 0).astype(jnp.float32))


def folding_penalty(disp: Array, margin: float = 0.1) -> Array:
  """(B,) mean of relu(margin - det J)^2: zero while every voxel's det J >= margin."""
  return _mean_spatial(jnp.square(jax.nn.relu(margin - jacobian_determinant(disp))))


def smoothness(disp: Array) -> Array:
  """(B,) mean over voxels of |grad u|^2 (forward differences, summed over components and axes)."""
  d = disp.shape[-1]
  total = jnp.zeros(disp.shape[:1], jnp.float32)
  for axis in range(1, d + 1):
    total = total + _mean_spatial(jnp.sum(jnp.square(jnp.diff(disp, axis=axis)), axis=-1))
  return total


def max_displacement(disp: Array) -> Array:
  """(B,) the largest Euclidean displacement (voxels)."""
  return jnp.max(jnp.sqrt(jnp.sum(jnp.square(disp), axis=-1)), axis=tuple(range(1, disp.ndim - 1)))
