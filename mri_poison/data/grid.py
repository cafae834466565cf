"""Cases fitted to a study's grid: scans read from disk (`fit_to_grid`: brain crop, resampling to data.spacing,
a pad/crop that may not cut the brain or the tumour) and phantom heads (`phantom_cases`). The data sources
(`datasets`, the TFDS builders) all go through here."""
from __future__ import annotations

import logging

import numpy as np

from mri_poison.data.case import MODALITIES, Case, DataError


# Real-data fields read with these defaults when a config does not set them (so that the configs of existing
# workdirs keep their digest): see `fit_to_grid` and the checks in `load_splits`.
FOLDER_DEFAULTS = dict(
    allow_fewer_cases=False,  # brats/tfds: fewer cases than n_cases is an error (True: a warning, use them all)
    spacing=(),  # brats: after the crop to the brain, resample to this voxel size (mm; () keeps each scan's own)
    max_cropped_brain=0.02,  # brats: share of the brain's voxels the final pad/crop to `shape` may drop
    max_cropped_tumour=0.0,  # ... and of the tumour's
    on_crop_loss="error",  # "error" | "warn" when a crop drops more than that
)


def folder_setting(data_cfg, key: str):
  """data_cfg.<key>, or its FOLDER_DEFAULTS value when the config does not set it."""
  return data_cfg.get(key, FOLDER_DEFAULTS[key])


def phantom_seed(seed: int, index: int) -> int:
  """Seed of the `index`-th phantom case; the same as `phantom.write_brats_dir` and the TFDS builder use."""
  return int(seed) + int(index)


def phantom_cases(n_cases: int, *, seed: int, phantom_shape, shape, modalities=MODALITIES, version: str = "v2",
                  options=None) -> list[Case]:
  """`n_cases` phantom heads (seeds `phantom_seed(seed, i)`) preprocessed to the grid `shape`."""
  from mri_poison.data.phantom import VERSIONS, make_case
  from mri_poison.data.preprocess import preprocess_case
  phantom_shape = shape_of(phantom_shape, "data_cfg.phantom_shape")
  if version not in VERSIONS:
    raise DataError(f"data_cfg.phantom_version: expected one of {VERSIONS}, got {version!r}")
  try:
    return [preprocess_case(make_case(phantom_seed(seed, i), shape=phantom_shape, modalities=tuple(modalities),
                                      version=version, options=options), shape=tuple(shape))
            for i in range(n_cases)]
  except ValueError as e:
    raise DataError(f"data_cfg.phantom: {e}") from e


def fit_to_grid(case: Case, shape, data_cfg) -> Case:
  """`preprocess_case` to the grid `shape` at data.spacing, checking what the final pad/crop drops.

  Raises a DataError naming the case and the config keys that fix it when more than data.max_cropped_brain of
  the brain's voxels or data.max_cropped_tumour of the tumour's fall outside the grid (data.on_crop_loss="warn":
  a warning instead).
  """
  from mri_poison.data.preprocess import preprocess_case
  spacing = tuple(float(s) for s in (folder_setting(data_cfg, "spacing") or ()))
  if spacing and len(spacing) != 3:
    raise DataError(f"data.spacing: expected () or three voxel sizes in mm, got {spacing}")
  fitted = preprocess_case(case, spacing=spacing or None)  # brain crop (+ resample), no pad/crop yet
  extent = np.asarray(fitted.shape) * np.asarray(fitted.spacing)  # mm the brain spans
  fits = float(np.max(extent / np.asarray(shape)))
  final, lost = pad_or_crop_checked(fitted, shape, data_cfg, fix=f"Resample with data.spacing=({fits:.2f}, "
                                     f"{fits:.2f}, {fits:.2f}) or coarser, or enlarge data.shape")
  return final.replace(preprocessing=_preprocessing_record(case, fitted, final, lost))


def pad_or_crop_checked(case: Case, shape, data_cfg, fix: str) -> tuple[Case, dict]:
  """`pad_or_crop` to `shape`, and the share of brain and tumour voxels it dropped; more than
  data.max_cropped_* is an error (a warning with data.on_crop_loss="warn") naming the case and `fix`."""
  from mri_poison.data.preprocess import brain_mask, pad_or_crop
  final = pad_or_crop(case, shape)
  lost = {}
  for what, before, after in (("brain", brain_mask(case.image), brain_mask(final.image)),
                              ("tumour", case.label > 0, final.label > 0)):
    if before.sum():
      lost[what] = 1.0 - after.sum() / before.sum()
  limits = {k: float(folder_setting(data_cfg, f"max_cropped_{k}")) for k in ("brain", "tumour")}
  over = {k: v for k, v in lost.items() if v > limits[k] + 1e-9}
  if over:
    message = (f"case {case.case_id}: its brain ({'x'.join(map(str, case.shape))} voxels of "
               f"{'x'.join(f'{s:g}' for s in case.spacing)} mm) does not fit data.shape={tuple(shape)}: the crop "
               f"drops " + " and ".join(f"{v:.1%} of the {k} voxels (data.max_cropped_{k}={limits[k]:g})"
                                        for k, v in over.items()) + f". {fix}")
    if str(folder_setting(data_cfg, "on_crop_loss")) != "warn":
      raise DataError(message + ", or set data.on_crop_loss='warn'")
    logging.warning("%s (data.on_crop_loss='warn': going on)", message)
  return final, lost


def _preprocessing_record(scan: Case, fitted: Case, final: Case, lost: dict) -> dict:
  """What `fit_to_grid` did to one scan, for data.json: the scan's own grid, the brain crop, the resampling
  (old voxels per new voxel), the final grid, and the brain and tumour kept (tumour volume in mL before and
  after, so a reader sees what resampling itself changed)."""
  ml = lambda c: float((c.label > 0).sum() * np.prod(c.spacing) / 1000.0)
  rounded = lambda v: [round(float(x), 4) for x in v]
  return {"scan_shape": list(scan.shape), "scan_spacing_mm": rounded(scan.spacing),
          "brain_box_mm": rounded(np.asarray(fitted.shape) * np.asarray(fitted.spacing)),
          "spacing_mm": rounded(fitted.spacing),
          "resample_step": rounded(np.asarray(fitted.spacing) / np.asarray(scan.spacing)),
          "grid": list(final.shape),
          "brain_kept": round(float(1.0 - lost.get("brain", 0.0)), 6),
          "tumour_kept": round(float(1.0 - lost.get("tumour", 0.0)), 6),
          "tumour_ml_scan": round(ml(scan), 3), "tumour_ml_grid": round(ml(final), 3)}


def shape_of(value, key):
  shape = tuple(int(s) for s in value)
  if len(shape) != 3 or min(shape) < 1:
    raise DataError(f"{key}: expected 3 positive sizes, got {tuple(value)}")
  return shape
