"""Acquisition effects of the v2 phantom: thick slices resampled to isotropic voxels, residual misregistration,
coil bias, Rician noise, and CT's correlated noise and beam-hardening shading."""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from mri_poison.data.phantom_v1 import smooth_noise


def _interp_axis(a: np.ndarray, positions: np.ndarray, axis: int) -> np.ndarray:
  """`a` read linearly at fractional indices `positions` along `axis` (clamped to the ends)."""
  n = a.shape[axis]
  pos = np.clip(positions, 0.0, n - 1.0)
  lo = np.floor(pos).astype(int)
  hi = np.minimum(lo + 1, n - 1)
  w = (pos - lo).astype(np.float32)
  shape = [1] * a.ndim
  shape[axis] = -1
  return np.take(a, lo, axis=axis) * (1 - w).reshape(shape) + np.take(a, hi, axis=axis) * w.reshape(shape)


def thick_slices(img: np.ndarray, thickness_mm: float, spacing: float, offset: float, axis: int = 2) -> np.ndarray:
  """A 2D acquisition of `thickness_mm` slices along `axis`, linearly resampled back to the case grid.

  Each slice integrates a Gaussian slice profile of FWHM = thickness; slice centres sit `thickness` apart
  starting `offset` (a fraction of the thickness) into the volume. No-op when the slices are not thicker than
  a voxel.
  """
  step = thickness_mm / spacing
  if step <= 1.0:
    return img
  blurred = ndimage.gaussian_filter1d(img, sigma=step / 2.3548, axis=axis, mode="nearest")
  n = img.shape[axis]
  centres = np.arange(offset * step, n - 1 + step, step)
  slices = _interp_axis(blurred, centres, axis)
  # Back to the grid: grid index j sits between slices (j - offset step) / step.
  return _interp_axis(slices, (np.arange(n) - offset * step) / step, axis)


def misregister(img: np.ndarray, rng: np.random.Generator, spacing: float, deg: float, mm: float) -> np.ndarray:
  """`img` moved by a small random rigid transform (rotation sd `deg` per axis, shift sd `mm` per axis)."""
  if deg <= 0 and mm <= 0:
    return img
  a, b, c = np.deg2rad(rng.normal(0.0, deg, 3))
  rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
  ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
  rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
  rot = rz @ ry @ rx
  centre = (np.asarray(img.shape, np.float64) - 1) / 2.0
  shift = rng.normal(0.0, mm, 3) / spacing
  offset = centre - rot @ centre + shift
  return ndimage.affine_transform(img, rot, offset=offset, order=1, mode="constant", cval=0.0)


def bias_field(rng: np.random.Generator, shape, strength: float, shared: np.ndarray) -> np.ndarray:
  """exp(strength (shared + own)): a smooth multiplicative coil sensitivity, partly common to all sequences."""
  own = smooth_noise(rng, shape, 1, cells=3)[0]
  return np.exp(strength * (shared + rng.uniform(0.2, 0.5) * own)).astype(np.float32)


def rician(img: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
  """Magnitude of the complex signal plus Gaussian noise of `sigma` in both channels."""
  n1 = rng.standard_normal(img.shape, dtype=np.float32)
  n2 = rng.standard_normal(img.shape, dtype=np.float32)
  return np.sqrt((img + sigma * n1) ** 2 + (sigma * n2) ** 2)


def ct_noise_and_shading(hu: np.ndarray, icv_sd: np.ndarray, z_mm: np.ndarray, spacing: float,
                         rng: np.random.Generator) -> np.ndarray:
  """Correlated quantum noise (a few HU, blurred over ~1 mm) and beam-hardening-like shading: brain next to
  the inner table reads a few HU high (cupping, not fully corrected) and the posterior fossa carries the
  darker band between the petrous bones."""
  sigma = rng.uniform(3.0, 7.0)
  noise = ndimage.gaussian_filter(rng.standard_normal(hu.shape).astype(np.float32), 0.8 / spacing + 0.3)
  noise *= sigma / max(float(noise.std()), 1e-6)
  cupping = rng.uniform(3.0, 9.0) * np.exp(-np.clip(icv_sd, 0.0, None) / 8.0)
  z_base = float(np.quantile(z_mm[icv_sd > 0], 0.08)) if (icv_sd > 0).any() else 0.0
  fossa = -rng.uniform(2.0, 8.0) * np.exp(-0.5 * ((z_mm - z_base - 10.0) / 8.0) ** 2)
  return hu + noise + cupping + fossa
