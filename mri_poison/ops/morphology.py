"""Binary morphology on masks (2D or 3D, with or without a batch axis): dilate, erode, contour band, interior.

Masks are boolean arrays whose last `ndim` axes are spatial (ndim = 2 or 3; leading axes are batch axes).
The structuring element is a `width`^ndim box (cv2/scipy's square kernel of side `width`): dilation is a max
filter, erosion a min filter over that box, outside the grid counted as background for dilation and as
foreground for erosion (a mask touching the border is not eroded from outside the image).

UMed's regions (methods.md, study 4): contour band C = dilate(M) - erode(M), interior I = M - C. With width 3,
C is the mask's boundary voxels plus the background voxels touching them (one voxel each side). C and I are
disjoint, C | I = dilate(M) (the support of the protection), and I | (C & M) = M.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _check(mask, width: int, ndim: int):
  width, ndim = int(width), int(ndim)
  if width < 1:
    raise ValueError(f"morphology: width must be >= 1 voxel, got {width}")
  if ndim not in (2, 3) or jnp.ndim(mask) < ndim:
    raise ValueError(f"morphology: expected a mask with >= {ndim} axes and ndim in (2, 3), got shape "
                     f"{jnp.shape(mask)}, ndim={ndim}")
  return width, ndim


def _box_filter(mask, width: int, ndim: int, init, op):
  mask = jnp.asarray(mask)
  lead = mask.ndim - ndim
  window = (1,) * lead + (width,) * ndim
  # Odd widths are centred; an even width reaches one voxel further forward than back.
  pad = ((0, 0),) * lead + (((width - 1) // 2, width // 2),) * ndim
  x = mask.astype(jnp.float32)
  out = jax.lax.reduce_window(x, init, op, window, (1,) * mask.ndim, pad)
  return out > 0.5


def dilate(mask, width: int = 3, ndim: int = 2):
  """bool: voxels within the `width`-box of a mask voxel (max filter)."""
  width, ndim = _check(mask, width, ndim)
  return _box_filter(mask, width, ndim, 0.0, jax.lax.max)


def erode(mask, width: int = 3, ndim: int = 2):
  """bool: voxels whose whole `width`-box is in the mask (min filter; outside the grid counts as mask)."""
  width, ndim = _check(mask, width, ndim)
  return _box_filter(mask, width, ndim, 1.0, jax.lax.min)


def contour_band(mask, width: int = 3, ndim: int = 2):
  """bool C = dilate(M) - erode(M): the band of about (width - 1) / 2 voxels on each side of the boundary."""
  return dilate(mask, width, ndim) & ~erode(mask, width, ndim)


def interior(mask, width: int = 3, ndim: int = 2):
  """bool I = M - C = erode(M): the mask's voxels away from its boundary."""
  return jnp.asarray(mask, bool) & ~contour_band(mask, width, ndim)
