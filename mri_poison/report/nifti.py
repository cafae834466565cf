"""NIfTI export with the source case's affine (atomic writes)."""
from __future__ import annotations

import os

import nibabel as nib
import numpy as np

from mri_poison import io_utils


def save_volume(path: str | os.PathLike, array, affine, *, dtype=None, description: str = "") -> str:
  """Writes a 3D (X, Y, Z) or 4D (X, Y, Z, C) array as NIfTI-1 with `affine` (4, 4); returns the path.

  Integer label maps are written as int16 unless `dtype` says otherwise; images as float32. `description`
  (e.g. the channel order of a 4D image) goes in the header's 80-character `descrip` field.
  """
  path = os.fspath(path)
  if not (path.endswith(".nii") or path.endswith(".nii.gz")):
    raise ValueError(f"NIfTI path must end in .nii or .nii.gz, got {path}")
  array = np.asarray(array)
  if array.ndim not in (3, 4):
    raise ValueError(f"{path}: expected a 3D or 4D volume, got shape {array.shape}")
  affine = np.asarray(affine, np.float64)
  if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
    raise ValueError(f"{path}: affine must be a finite (4, 4) matrix, got shape {affine.shape}")
  if dtype is None:
    dtype = np.int16 if np.issubdtype(array.dtype, np.integer) or array.dtype == bool else np.float32
  img = nib.Nifti1Image(np.ascontiguousarray(array.astype(dtype)), affine)
  img.header.set_xyzt_units("mm")
  if description:
    if len(description) > 79:
      raise ValueError(f"{path}: NIfTI description longer than 79 characters: {description!r}")
    img.header["descrip"] = description.encode()
  with io_utils.atomic_path(path) as tmp:
    nib.save(img, tmp)
  return path
