"""Loading BraTS-format and MSD Task01 NIfTI cases into `Case` records with labels on the contract.

Recognised without being told (see ../../shared/docs/architecture.md):
  BraTS 2018-2021: `<id>/<id>_{t1,t1ce,t2,flair,seg}.nii[.gz]`, labels {0,1,2,4} (4 = ET -> 3).
  BraTS 2023+:     `<id>/<id>-{t1n,t1c,t2w,t2f,seg}.nii[.gz]`, labels {0,1,2,3}.
  MSD Task01:      `imagesTr/BRATS_xxx.nii.gz` 4D (FLAIR, T1w, T1gd, T2w), `labelsTr/BRATS_xxx.nii.gz` labels
                   1 oedema, 2 non-enhancing, 3 enhancing (-> 2, 1, 3).
Voxel order is the file's own (no reorientation); the affine is the file's and the spacing the affine's (norms of
its 3x3 columns), which must agree with the header's voxel sizes. Every bad input raises one `DataError` naming
the offending file and what was expected; among them:
  - a BraTS file whose name does not carry its folder's case id (`BraTS2021_00001_t2.nii.gz` in `BraTS2021_00000/`);
  - header voxel sizes that disagree with the affine, or spacings that differ between the files of a case
    (relative tolerance `SPACING_RTOL`), shapes or affines that differ (absolute tolerance `AFFINE_TOL`);
  - an all-zero modality (unless `allow_empty_modality=True`, which logs a warning instead);
  - a dangling symlink or a symlink loop (named as such), a missing, truncated or corrupt file.
"""
from __future__ import annotations

import dataclasses
import errno
import os
from typing import Sequence

from absl import logging
import nibabel as nib
import numpy as np

from mri_poison.data.case import MODALITIES, Case, DataError

NIFTI_EXTS = (".nii.gz", ".nii")
# Largest absolute difference (mm, or unitless for the rotation/zoom part) tolerated between the affines of the
# files of one case: headers written by different tools differ in float rounding, not in geometry.
AFFINE_TOL = 1e-3
# Largest relative difference tolerated between a file's header voxel sizes and its affine's, and between the
# spacings of the files of one case: float32 rounding is ~1e-7; a wrong header (1 mm on a 6.25 mm grid) is not.
SPACING_RTOL = 1e-3

# Per BraTS naming: separator between case id and suffix, and the suffix of each modality (and "seg").
# Modalities not in the table (e.g. the phantom's "ct") use their own name as suffix.
_NAMINGS = {
    "2021": ("_", {"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair", "seg": "seg"}),
    "2023": ("-", {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f", "seg": "seg"}),
}
# Source label value -> contract label (0 bg, 1 necrotic/non-enhancing core, 2 oedema, 3 enhancing tumour).
_LABEL_MAPS = {
    "2021": {0: 0, 1: 1, 2: 2, 4: 3},
    "2023": {0: 0, 1: 1, 2: 2, 3: 3},
    "msd": {0: 0, 1: 2, 2: 1, 3: 3},
}
# Channel order of the MSD Task01 4D images.
MSD_CHANNELS = ("flair", "t1", "t1ce", "t2")


def load_brats_case(path: str | os.PathLike, modalities: Sequence[str] = MODALITIES, *,
                    affine_tol: float = AFFINE_TOL, allow_empty_modality: bool = False) -> Case:
  """A BraTS case folder (2018-2021 or 2023+ naming, detected) as a Case; label None when there is no seg file.

  Every file name must be `<folder name><suffix>.nii[.gz]`. `allow_empty_modality=True` accepts an all-zero
  modality with a logged warning instead of raising.
  """
  path = os.fspath(path)
  if not os.path.isdir(path):
    _check_not_broken_link(path, "a BraTS case folder")
    raise DataError(f"{path}: expected a BraTS case folder, but it is not a directory")
  case_id = os.path.basename(os.path.normpath(path))
  naming = _detect_naming(path)
  if naming is None:
    raise DataError(f"{path}: no BraTS files found; expected {case_id}_t1.nii.gz, _t1ce, _t2, _flair[, _seg] "
                    f"(BraTS 2018-2021) or {case_id}-t1n.nii.gz, -t1c, -t2w, -t2f[, -seg] (BraTS 2023+)")
  modalities = tuple(modalities)
  if not modalities:
    raise DataError(f"{path}: modalities must name at least one modality")
  # Find every file before reading any, so a missing modality is reported at once.
  files = {m: _find_file(path, case_id, naming, m, required=True) for m in modalities}
  seg_file = _find_file(path, case_id, naming, "seg", required=False)

  ref = None
  channels = []
  for m in modalities:
    data, img = _read_volume(files[m], ndim=3)
    grid = _Grid(files[m], data.shape, np.asarray(img.affine, np.float64), _spacing(img, files[m]))
    ref = grid if ref is None else ref  # every other volume must share the first one's grid
    _check_same_grid(grid, ref, affine_tol)
    _check_not_empty(data, files[m], allow_empty_modality)
    channels.append(data.astype(np.float32, copy=False))
  image = np.stack(channels, axis=-1)
  label = None
  if seg_file is not None:
    seg, img = _read_volume(seg_file, ndim=3, is_label=True)
    _check_same_grid(_Grid(seg_file, seg.shape, np.asarray(img.affine, np.float64), _spacing(img, seg_file)), ref,
                     affine_tol)
    label = remap_labels(seg, naming, seg_file)
  return Case(image=image, modalities=modalities, label=label, affine=ref.affine, spacing=ref.spacing,
              case_id=case_id)


def load_msd_case(image_path: str | os.PathLike, label_path: str | os.PathLike | None = None,
                  modalities: Sequence[str] = MODALITIES, *, affine_tol: float = AFFINE_TOL,
                  allow_empty_modality: bool = False) -> Case:
  """An MSD Task01 4D image (channels FLAIR, T1w, T1gd, T2w), reordered to `modalities`; label from `label_path`.

  `label_path=None` loads no label (use `load_case`, or `msd_label_path`, to find the matching labelsTr file).
  `allow_empty_modality=True` accepts an all-zero channel with a logged warning instead of raising.
  """
  image_path = os.fspath(image_path)
  modalities = tuple(modalities)
  unknown = [m for m in modalities if m not in MSD_CHANNELS]
  if unknown or not modalities:
    raise DataError(f"{image_path}: MSD Task01 images hold {MSD_CHANNELS}; cannot provide modalities {unknown or '()'}")
  data, img = _read_volume(image_path, ndim=4)
  if data.shape[-1] != len(MSD_CHANNELS):
    raise DataError(f"{image_path}: expected an MSD Task01 4D image with {len(MSD_CHANNELS)} channels "
                    f"{MSD_CHANNELS}, got shape {data.shape}")
  grid = _Grid(image_path, data.shape[:3], np.asarray(img.affine, np.float64), _spacing(img, image_path))
  for m in modalities:
    _check_not_empty(data[..., MSD_CHANNELS.index(m)], image_path, allow_empty_modality, f"channel {m!r}: ")
  image = np.ascontiguousarray(data[..., [MSD_CHANNELS.index(m) for m in modalities]], dtype=np.float32)
  label = None
  if label_path is not None:
    label_path = os.fspath(label_path)
    seg, seg_img = _read_volume(label_path, ndim=3, is_label=True)
    _check_same_grid(_Grid(label_path, seg.shape, np.asarray(seg_img.affine, np.float64),
                           _spacing(seg_img, label_path)), grid, affine_tol)
    label = remap_labels(seg, "msd", label_path)
  return Case(image=image, modalities=modalities, label=label, affine=grid.affine, spacing=grid.spacing,
              case_id=_strip_ext(os.path.basename(image_path)))


def msd_label_path(image_path: str | os.PathLike) -> str | None:
  """`<root>/labelsTr/<name>` for an MSD image `<root>/imagesTr/<name>`, or None when there is none."""
  image_path = os.path.abspath(os.fspath(image_path))
  root = os.path.dirname(os.path.dirname(image_path))
  candidate = os.path.join(root, "labelsTr", os.path.basename(image_path))
  # lexists, not isfile: a broken label link is reported by the loader, not taken for "no label".
  return candidate if os.path.lexists(candidate) else None


def list_cases(root: str | os.PathLike) -> list[str]:
  """Sorted case references under `root`: BraTS case folders (at any depth) and MSD `imagesTr/*.nii[.gz]` files."""
  root = os.fspath(root)
  if not os.path.exists(root):
    raise DataError(f"dataset root {root} does not exist; expected a folder of BraTS case folders or an MSD "
                    "Task01 root (imagesTr/, labelsTr/)")
  if not os.path.isdir(root):
    raise DataError(f"dataset root {root} is not a directory; expected a folder of BraTS case folders or an "
                    "MSD Task01 root (imagesTr/, labelsTr/)")
  refs = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    if "imagesTr" in dirnames:  # MSD root: its images are the cases
      images_dir = os.path.join(dirpath, "imagesTr")
      refs.extend(os.path.join(images_dir, f) for f in os.listdir(images_dir)
                  if f.endswith(NIFTI_EXTS) and not f.startswith("."))  # skips macOS "._BRATS_001.nii.gz"
      dirnames[:] = []
    elif _detect_naming(dirpath, filenames) is not None:
      refs.append(dirpath)
      dirnames[:] = []  # a case folder holds no further cases
  if not refs:
    raise DataError(f"dataset root {root}: no cases found; expected BraTS case folders (<id>/<id>_t1.nii.gz ... "
                    "or <id>/<id>-t1n.nii.gz ...) or an MSD Task01 root with imagesTr/*.nii.gz")
  return sorted(refs)


def case_files(ref: str | os.PathLike) -> tuple[str, list[str]]:
  """(case id, the input files it is read from) of a `list_cases` reference, as `load_case` names and reads it."""
  ref = os.fspath(ref)
  if os.path.isdir(ref):
    files = sorted(os.path.join(ref, f) for f in os.listdir(ref) if f.endswith(NIFTI_EXTS) and not f.startswith("."))
    return os.path.basename(os.path.normpath(ref)), files
  label = msd_label_path(ref)
  return _strip_ext(os.path.basename(ref)), [ref] + ([label] if label else [])


def label_path(ref: str | os.PathLike) -> str | None:
  """The segmentation file of a `list_cases` reference, or None when it has none (nothing is read)."""
  ref = os.fspath(ref)
  if not os.path.isdir(ref):
    return msd_label_path(ref)
  naming = _detect_naming(ref)
  return _find_file(ref, os.path.basename(os.path.normpath(ref)), naming, "seg", required=False) if naming else None


def load_case(ref: str | os.PathLike, modalities: Sequence[str] = MODALITIES, *,
              allow_empty_modality: bool = False) -> Case:
  """Loads a `list_cases` reference: a BraTS case folder, or an MSD image file (with its labelsTr label if any)."""
  ref = os.fspath(ref)
  if os.path.isdir(ref):
    return load_brats_case(ref, modalities, allow_empty_modality=allow_empty_modality)
  if os.path.isfile(ref) and ref.endswith(NIFTI_EXTS):
    return load_msd_case(ref, msd_label_path(ref), modalities, allow_empty_modality=allow_empty_modality)
  _check_not_broken_link(ref, "a BraTS case folder or an MSD Task01 image file")
  raise DataError(f"{ref}: expected a BraTS case folder or an MSD Task01 image file (*.nii.gz), "
                  f"but it {'is not a NIfTI file' if os.path.exists(ref) else 'does not exist'}")


def label_convention(ref: str) -> str:
  """"2021", "2023" or "msd": how the labels of the case at `ref` (a BraTS folder or MSD image) are numbered."""
  if os.path.isdir(ref):
    naming = _detect_naming(ref)
    if naming is None:
      raise DataError(f"{ref}: no BraTS files found (expected <id>_t1.nii.gz ... or <id>-t1n.nii.gz ...)")
    return naming
  return "msd"


def to_convention(labels: np.ndarray, convention: str) -> np.ndarray:
  """Contract labels {0, 1, 2, 3} -> the values of `convention` (the inverse of `remap_labels`)."""
  table = _LABEL_MAPS[convention]  # source -> contract
  out = np.zeros(labels.shape, np.uint8)
  for source, contract in table.items():
    out[labels == contract] = source
  return out


def remap_labels(seg: np.ndarray, convention: str, path: str = "<label>") -> np.ndarray:
  """Source label map (convention "2021", "2023" or "msd") -> int32 contract labels {0,1,2,3}."""
  mapping = _LABEL_MAPS[convention]
  values = np.unique(seg)
  bad = [v for v in values.tolist() if v not in mapping]
  if bad:
    raise DataError(f"{path}: label values {bad} are outside the {_convention_name(convention)} convention; "
                    f"expected values in {sorted(mapping)}")
  lut = np.zeros(max(mapping) + 1, np.int32)
  for src, dst in mapping.items():
    lut[src] = dst
  return lut[seg.astype(np.intp)]


# ---------------------------------------------------------------------------------------------------------------
# Helpers.


def _convention_name(convention):
  return {"2021": "BraTS 2018-2021", "2023": "BraTS 2023+", "msd": "MSD Task01"}[convention]


def _strip_ext(name):
  for ext in NIFTI_EXTS:
    if name.endswith(ext):
      return name[:-len(ext)]
  return name


def _suffix(naming, key):
  sep, table = _NAMINGS[naming]
  return sep + table.get(key, key)


def _detect_naming(path, filenames=None) -> str | None:
  """The BraTS naming whose modality files are in `path` (the one with more matches), or None."""
  if filenames is None:
    filenames = os.listdir(path)
  stems = [_strip_ext(f) for f in filenames if f.endswith(NIFTI_EXTS) and not f.startswith(".")]
  counts = {}
  for naming, (_, table) in _NAMINGS.items():
    suffixes = tuple(_suffix(naming, k) for k in table)
    counts[naming] = sum(s.endswith(suffixes) for s in stems)
  best = max(counts, key=counts.get)
  return best if counts[best] else None


def _find_file(path, case_id, naming, key, *, required):
  suffix = _suffix(naming, key)
  matches = sorted(f for f in os.listdir(path)
                   if not f.startswith(".") and f.endswith(NIFTI_EXTS) and _strip_ext(f).endswith(suffix))
  # A file of another case copied into this folder has the right suffix; only the case id tells it apart.
  foreign = [f for f in matches if _strip_ext(f) != case_id + suffix]
  if foreign:
    other = _strip_ext(foreign[0])[:-len(suffix)]
    raise DataError(f"{os.path.join(path, foreign[0])}: named for case {other!r} but it lies in the folder of case "
                    f"{case_id!r}; expected {case_id}{suffix}.nii.gz (or .nii): BraTS file names carry their "
                    "folder's case id")
  if len(matches) > 1:
    raise DataError(f"{path}: several files for {key!r}: {matches}; expected exactly one {case_id}{suffix}.nii.gz "
                    "(or .nii)")
  if not matches:
    if required:
      raise DataError(f"{path}: missing modality {key!r}: expected a file {case_id}{suffix}.nii.gz (or .nii) "
                      f"({_convention_name(naming)} naming)")
    return None
  return os.path.join(path, matches[0])


def _read_volume(path, *, ndim, is_label=False):
  """(data, nibabel image) with data fully read and checked: dimensionality, finite values, integer labels."""
  if not os.path.isfile(path):
    _check_not_broken_link(path, "a NIfTI file")
    what = "is not a regular file" if os.path.exists(path) else "file does not exist"
    raise DataError(f"{path}: {what}; expected a NIfTI file")
  try:
    img = nib.load(path)
    # Reading the data here (not lazily later) surfaces truncated / corrupt payloads as one clear error.
    data = np.asanyarray(img.dataobj) if is_label else img.get_fdata(dtype=np.float32)
  except Exception as e:  # nibabel, gzip, zlib and numpy all raise their own types for broken files
    raise DataError(f"{path}: cannot read as NIfTI (truncated or corrupt file?): {type(e).__name__}: {e}") from e
  while data.ndim > ndim and data.shape[-1] == 1:  # some writers add singleton time/channel axes
    data = data[..., 0]
  if data.ndim != ndim:
    what = "a 3D volume (X, Y, Z)" if ndim == 3 else "a 4D image (X, Y, Z, C)"
    raise DataError(f"{path}: expected {what}, got a {data.ndim}D array of shape {data.shape}")
  if data.dtype.kind == "f":
    finite = np.isfinite(data)
    if not finite.all():
      raise DataError(f"{path}: {int(data.size - finite.sum())} NaN/inf voxels; expected finite values")
    if is_label:
      if not np.array_equal(data, np.round(data)):
        raise DataError(f"{path}: non-integer label values; expected integer labels")
  return data, img


@dataclasses.dataclass(frozen=True)
class _Grid:
  """Where a file's voxels lie: its path (for messages), array shape, affine and spacing from the affine."""
  path: str
  shape: tuple[int, ...]
  affine: np.ndarray
  spacing: tuple[float, float, float]


def _check_same_grid(grid: _Grid, ref: _Grid, affine_tol: float, spacing_rtol: float = SPACING_RTOL):
  if tuple(grid.shape[:3]) != tuple(ref.shape[:3]):
    raise DataError(f"{grid.path}: shape {tuple(grid.shape)} differs from {ref.path} shape {tuple(ref.shape)}; "
                    "expected all volumes of a case on one voxel grid")
  diff = float(np.abs(grid.affine - ref.affine).max())
  if diff > affine_tol:
    raise DataError(f"{grid.path}: affine differs from that of {ref.path} by up to {diff:.4g} (tolerance "
                    f"{affine_tol:g}); expected all volumes of a case in one space\n{grid.affine}\nvs\n{ref.affine}")
  spacing, ref_spacing = np.asarray(grid.spacing), np.asarray(ref.spacing)
  if np.any(np.abs(spacing - ref_spacing) > spacing_rtol * ref_spacing):
    raise DataError(f"{grid.path}: voxel spacing {_mm(spacing)} differs from that of {ref.path}, "
                    f"{_mm(ref_spacing)} (relative tolerance {spacing_rtol:g}); expected one voxel size per case")


def _spacing(img, path, rtol: float = SPACING_RTOL) -> tuple[float, float, float]:
  """Voxel size (mm) per axis from the affine (norms of its 3x3 columns), checked against the header's zooms.

  The affine is what places voxels in the world (and what resampling and HD95 use); a header whose voxel sizes
  disagree with it by more than `rtol` (relative) is a broken file, not a rounding difference.
  """
  spacing = np.sqrt((np.asarray(img.affine, np.float64)[:3, :3] ** 2).sum(axis=0))
  if not np.all(np.isfinite(spacing)) or spacing.min() <= 0:
    raise DataError(f"{path}: the affine gives voxel sizes {_mm(spacing)}; expected three positive spacings")
  zooms = np.asarray(img.header.get_zooms()[:3], np.float64)
  if zooms.shape != (3,) or np.any(np.abs(zooms - spacing) > rtol * spacing):
    raise DataError(f"{path}: header voxel sizes {_mm(zooms)} disagree with the affine's {_mm(spacing)} "
                    f"(relative tolerance {rtol:g}); expected one geometry (fix the header's pixdim or the affine)")
  return tuple(float(v) for v in spacing)


def _mm(values) -> str:
  return "(" + ", ".join(f"{float(v):.6g}" for v in values) + ") mm"


def _check_not_empty(data, path, allow_empty, what=""):
  if data.any():
    return
  message = f"{path}: {what}every voxel is 0; expected an image (an empty modality is a failed export or copy)"
  if not allow_empty:
    raise DataError(message + "; pass allow_empty_modality=True to accept it")
  logging.warning("%s; accepted (allow_empty_modality=True)", message)


def _check_not_broken_link(path, expected):
  """Raises a DataError naming a dangling symlink or a symlink loop at `path`; returns otherwise."""
  if not os.path.islink(path) or os.path.exists(path):
    return
  try:
    os.stat(path)
  except OSError as e:
    if e.errno == errno.ELOOP:
      raise DataError(f"{path}: symlink loop (it resolves through {os.readlink(path)} back to itself); "
                      f"expected {expected}") from e
  raise DataError(f"{path}: dangling symlink to {os.path.realpath(path)}, which does not exist; expected "
                  f"{expected}")
