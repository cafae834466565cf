"""Segmenting a new scan with a trained model: labels written back on the scan's own grid and affine.

The scan goes through the preprocessing the model was trained with (brain mask, z-score inside it, crop to
the brain, resampling to the model's `data.spacing` when it has one), is segmented whole (sliding windows in
3D, slice by slice in 2D), and the labels are mapped back: resampled to the cropped grid (nearest neighbour)
and pasted at the crop's place in a volume of the scan's shape, so they overlay the input in any viewer.
Labels are written in the convention of the input's folder: 4 = enhancing tumour for BraTS 2018-21 names,
3 for BraTS 2023+ names, MSD Task01's values for an MSD image.
"""
from __future__ import annotations

import os

import nibabel as nib
import numpy as np
from scipy import ndimage

from mri_poison.data import loaders
from mri_poison.data import preprocess
from mri_poison.data.case import DataError
from mri_poison.train import evaluate


def segment_case(apply_fn, params, config, ref: str) -> tuple[np.ndarray, np.ndarray]:
  """(contract labels on the scan's own grid, the scan's affine) for the case at `ref` (see module doc).

  `config` is the model's (from `loop.load_model`): its data.modalities, data.mode, data.spacing and
  data.patch_shape (the sliding window) are the ones it was trained with.
  """
  data = config.data
  case = loaders.load_case(ref, tuple(data.modalities))
  mask = preprocess.brain_mask(case.image)
  if not mask.any():
    raise DataError(f"{ref}: the image is all zero; nothing to segment")
  cropped = preprocess.crop_to_brain(case.replace(image=preprocess.zscore(case.image, mask), label=None), mask=mask)
  spacing = tuple(data.get("spacing", ()) or ())
  prepared = preprocess.resample(cropped, spacing) if spacing else cropped
  logits = evaluate.predict_case(apply_fn, params, prepared, config)
  labels = np.asarray(np.argmax(np.asarray(logits), axis=-1), np.int32)
  if labels.shape != cropped.shape:  # back to the cropped grid: the same voxel edges, nearest neighbour
    zoom = np.asarray(cropped.shape) / np.asarray(labels.shape)
    labels = ndimage.zoom(labels, zoom, order=0, mode="nearest", grid_mode=True)
    labels = preprocess.pad_or_crop(cropped.replace(image=labels[..., None].astype(np.float32),
                                                    modalities=("label",)), cropped.shape).image[..., 0]
  # The crop's corner in the scan's voxels, from the two affines (crop_to_brain shifts the origin only).
  corner = np.rint(np.linalg.solve(case.affine, cropped.affine[:, 3])[:3]).astype(int)
  full = np.zeros(case.shape, np.int32)
  full[tuple(slice(c, c + n) for c, n in zip(corner, cropped.shape))] = labels
  return full, case.affine


def write_segmentation(apply_fn, params, config, ref: str, output: str) -> dict:
  """Segments the case at `ref` and writes the labels to `output` (.nii.gz) on the scan's grid, in its
  folder's label convention; returns a summary {"output", "shape", "convention", "voxels": {label: count}}."""
  from mri_poison import io_utils  # pylint: disable=import-outside-toplevel
  if not str(output).endswith((".nii", ".nii.gz")):
    raise ValueError(f"output {output}: expected a .nii.gz (or .nii) file name")
  labels, affine = segment_case(apply_fn, params, config, os.fspath(ref))
  convention = loaders.label_convention(os.fspath(ref))
  values = loaders.to_convention(labels, convention)
  image = nib.Nifti1Image(values, affine)
  image.header.set_data_dtype(np.uint8)
  with io_utils.atomic_path(output) as tmp:  # keeps the extension, which tells nibabel to compress
    nib.save(image, tmp)
  counts = {int(v): int(n) for v, n in zip(*np.unique(values, return_counts=True)) if v}
  return {"output": output, "shape": list(values.shape), "convention": convention, "voxels": counts}
