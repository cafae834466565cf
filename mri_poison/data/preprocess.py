"""Preprocessing of `Case` records (numpy, pure functions): brain mask, z-score, crop, pad, resample, 2D slices.

Every geometric step updates the affine so that a voxel keeps its world coordinate: for a new grid whose voxel 0
sits at old voxel index `offset` (scaled by `step` per axis), `new_affine = affine @ [diag(step) offset; 0 1]`.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

from mri_poison.data.case import Case, DataError


def brain_mask(image: np.ndarray) -> np.ndarray:
  """bool (X, Y, Z): voxels nonzero in any modality of a `(X, Y, Z, C)` image."""
  return np.any(image != 0, axis=-1)


def zscore(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """Per-modality (x - mean) / std over the voxels in `mask`; voxels outside the mask are 0. float32."""
  out = np.zeros(image.shape, np.float32)
  if not mask.any():
    return out
  for c in range(image.shape[-1]):
    values = image[..., c][mask].astype(np.float64)
    mean, std = values.mean(), values.std()
    # A constant modality (std 0) maps to 0 inside the mask rather than to inf/NaN.
    out[..., c][mask] = ((values - mean) / (std if std > 0 else 1.0)).astype(np.float32)
  return out


def crop_to_brain(case: Case, margin: int = 4, mask: np.ndarray | None = None) -> Case:
  """Crops to the bounding box of the brain mask (default `brain_mask(case.image)`) plus `margin` voxels."""
  if mask is None:
    mask = brain_mask(case.image)
  if not mask.any():
    raise DataError(f"case {case.case_id}: the brain mask is empty (image all zero); nothing to crop to")
  lo, hi = [], []
  for axis in range(3):
    present = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
    lo.append(max(int(present[0]) - margin, 0))
    hi.append(min(int(present[-1]) + 1 + margin, mask.shape[axis]))
  box = tuple(slice(a, b) for a, b in zip(lo, hi))
  return case.replace(image=np.ascontiguousarray(case.image[box]),
                      label=None if case.label is None else np.ascontiguousarray(case.label[box]),
                      affine=_shift_affine(case.affine, lo))


def pad_or_crop(case: Case, shape: Sequence[int]) -> Case:
  """Centred zero-pad / crop of each axis to `shape` (X, Y, Z); odd remainders go to the high end."""
  shape = tuple(int(s) for s in shape)
  if len(shape) != 3 or min(shape) < 1:
    raise ValueError(f"shape: expected 3 positive sizes, got {shape}")
  src, dst, offset = [], [], []
  for n_old, n_new in zip(case.shape, shape):
    if n_new >= n_old:  # pad
      before = (n_new - n_old) // 2
      src.append(slice(0, n_old))
      dst.append(slice(before, before + n_old))
      offset.append(-before)
    else:  # crop
      start = (n_old - n_new) // 2
      src.append(slice(start, start + n_new))
      dst.append(slice(0, n_new))
      offset.append(start)
  src, dst = tuple(src), tuple(dst)
  image = np.zeros(shape + case.image.shape[3:], case.image.dtype)
  image[dst] = case.image[src]
  label = None
  if case.label is not None:
    label = np.zeros(shape, case.label.dtype)
    label[dst] = case.label[src]
  return case.replace(image=image, label=label, affine=_shift_affine(case.affine, offset))


def resample(case: Case, spacing: float | Sequence[float]) -> Case:
  """Resamples to voxel size `spacing` (mm): linear for the image, nearest for the label.

  The new grid covers the same field of view (voxel edges aligned, `grid_mode=True`) with
  `round(n * old_spacing / spacing)` voxels per axis, so the spacing actually reached (in `case.spacing` and the
  affine) is `old_spacing * n_old / n_new`: the requested one up to the rounding of the voxel count.
  """
  target = np.broadcast_to(np.asarray(spacing, np.float64), (3,))
  if not np.all(target > 0):
    raise ValueError(f"spacing: expected positive voxel sizes, got {tuple(target)}")
  old_shape = np.asarray(case.shape)
  new_shape = np.maximum(np.rint(old_shape * np.asarray(case.spacing) / target), 1).astype(int)
  if np.array_equal(new_shape, old_shape):
    return case
  zoom = new_shape / old_shape
  step = old_shape / new_shape  # old voxels per new voxel
  image = np.stack([ndimage.zoom(case.image[..., c], zoom, order=1, mode="nearest", grid_mode=True)
                    for c in range(case.image.shape[-1])], axis=-1).astype(np.float32)
  label = None
  if case.label is not None:
    label = ndimage.zoom(case.label, zoom, order=0, mode="nearest", grid_mode=True).astype(np.int32)
  # With aligned edges, new voxel j has its centre at old index (j + 0.5) * step - 0.5.
  affine = _shift_affine(case.affine, 0.5 * step - 0.5, step)
  return case.replace(image=image, label=label, affine=affine,
                      spacing=tuple(float(s) for s in np.asarray(case.spacing) * step))


def preprocess_case(case: Case, *, shape: Sequence[int] | None = None, margin: int = 4,
                    spacing: float | Sequence[float] | None = None) -> Case:
  """brain mask -> z-score inside it -> crop to it (+margin) -> optional resample -> optional pad/crop to `shape`."""
  mask = brain_mask(case.image)
  if not mask.any():
    raise DataError(f"case {case.case_id}: image is all zero; expected nonzero brain voxels in some modality")
  case = case.replace(image=zscore(case.image, mask))
  case = crop_to_brain(case, margin, mask=mask)
  if spacing is not None:
    case = resample(case, spacing)
  if shape is not None:
    case = pad_or_crop(case, shape)
  return case


def slice_indices(label: np.ndarray, *, axis: int = 2, tumour_fraction: float = 0.5, n: int | None = None,
                  seed: int = 0) -> np.ndarray:
  """Sorted slice indices along `axis` of which a `tumour_fraction` contain tumour (label > 0).

  n=None: every tumour slice plus enough tumour-free slices (drawn at random) to reach the fraction, or all
  tumour-free slices when there are too few. n given: round(n * tumour_fraction) tumour slices and the rest
  tumour-free, drawn without replacement; a ValueError when the case has too few of either kind.
  """
  if not 0.0 <= tumour_fraction <= 1.0:
    raise ValueError(f"tumour_fraction: expected a value in [0, 1], got {tumour_fraction}")
  other_axes = tuple(a for a in range(label.ndim) if a != axis % label.ndim)
  has_tumour = np.any(label > 0, axis=other_axes)
  tumour, free = np.flatnonzero(has_tumour), np.flatnonzero(~has_tumour)
  rng = np.random.default_rng(seed)
  if n is None:
    if tumour_fraction == 0.0:
      n_tumour, n_free = 0, free.size
    else:
      n_tumour = tumour.size
      n_free = min(free.size, int(round(tumour.size * (1.0 - tumour_fraction) / tumour_fraction)))
  else:
    n_tumour = int(round(n * tumour_fraction))
    n_free = int(n) - n_tumour
    if n_tumour > tumour.size or n_free > free.size:
      raise ValueError(f"asked for {n} slices, {n_tumour} with tumour and {n_free} without, along axis {axis}; "
                       f"the case has {tumour.size} tumour and {free.size} tumour-free slices")
  chosen = np.concatenate([rng.choice(tumour, n_tumour, replace=False), rng.choice(free, n_free, replace=False)])
  return np.sort(chosen).astype(np.int64)


def extract_slices(case: Case, *, axis: int = 2, tumour_fraction: float = 0.5, n: int | None = None,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """2D slices along `axis`: images (N, A, B, C) float32 and labels (N, A, B) int32 (A, B the other two axes).

  Which slices: `slice_indices` (the requested tumour fraction, deterministic in `seed`), in index order.
  """
  if case.label is None:
    raise DataError(f"case {case.case_id}: extract_slices needs a label to tell tumour slices apart")
  axis = axis % 3
  index = slice_indices(case.label, axis=axis, tumour_fraction=tumour_fraction, n=n, seed=seed)
  images = np.ascontiguousarray(np.moveaxis(np.take(case.image, index, axis=axis), axis, 0), np.float32)
  labels = np.ascontiguousarray(np.moveaxis(np.take(case.label, index, axis=axis), axis, 0), np.int32)
  return images, labels


def _shift_affine(affine: np.ndarray, offset, step=None) -> np.ndarray:
  """Affine of a grid whose voxel j sits at old voxel index offset + step * j."""
  transform = np.eye(4)
  transform[:3, :3] = np.diag(np.ones(3) if step is None else np.asarray(step, np.float64))
  transform[:3, 3] = np.asarray(offset, np.float64)
  return np.asarray(affine, np.float64) @ transform
