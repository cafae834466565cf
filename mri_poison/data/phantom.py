"""The embedded phantom, versioned, and a writer for BraTS-format folders of it.

Versions (`data.phantom_version` in every config, recorded in manifest.json):
- "v2" (the default, `phantom_v2`): MNI152 anatomy warped per subject, MR signal equations with per-case
  protocols, a reaction-diffusion tumour with mass effect, look-alike structures, thick slices, misregistration,
  bias and Rician noise, CT in Hounsfield units. Hard in the ways BraTS is hard.
- "v1" (`phantom_v1`): the procedural head with constant tissue intensities that every result before v2 used;
  kept unchanged so those results reproduce.

`write_brats_dir` writes phantom cases as a real BraTS 2021 or 2023 folder of NIfTI files, so the loader path
users run on real data is exercised by every test and demo.
"""
from __future__ import annotations

import os
import time
from typing import Sequence

import numpy as np

from mri_poison import io_utils
from mri_poison.data import phantom_v1
from mri_poison.data.case import MODALITIES, Case

VERSIONS = ("v1", "v2")
DEFAULT_VERSION = "v2"
ALL_MODALITIES = phantom_v1.ALL_MODALITIES

# File suffixes per naming convention (the key is our modality name).
_SUFFIX = {
    "2021": {"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair", "ct": "ct", "seg": "seg"},
    "2023": {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f", "ct": "ct", "seg": "seg"},
}


def make_case(seed: int, shape: Sequence[int] = (64, 64, 64), modalities: Sequence[str] = MODALITIES, *,
              version: str = DEFAULT_VERSION, options=None) -> Case:
  """One phantom case, a deterministic function of (`version`, `seed`, `shape`, `modalities`, `options`).

  options: v2, a mapping of `phantom_v2.default_config()` fields (data.phantom in a config; missing fields
  take their defaults); v1, keyword arguments of `phantom_v1.make_case` (anatomy, spacing).
  """
  if version == "v1":
    return phantom_v1.make_case(seed, shape, modalities, **dict(options or {}))
  if version == "v2":
    from mri_poison.data import phantom_v2  # pylint: disable=g-import-not-at-top
    return phantom_v2.make_case(seed, shape, modalities, options)
  raise ValueError(f"data.phantom_version: expected one of {VERSIONS}, got {version!r}")

# ---------------------------------------------------------------------------------------------------------------
# BraTS-format folders.


def case_id(index: int, naming: str) -> str:
  if naming == "2021":
    return f"BraTS2021_{index:05d}"
  if naming == "2023":
    return f"BraTS-GLI-{index:05d}-000"
  raise ValueError(f"naming must be '2021' or '2023', got {naming!r}")


def brats_file_name(cid: str, key: str, naming: str) -> str:
  """File name of modality (or "seg") `key` for case `cid` in the naming convention."""
  sep = "_" if naming == "2021" else "-"
  return f"{cid}{sep}{_SUFFIX[naming][key]}.nii.gz"


def write_brats_dir(root: str | os.PathLike, n_cases: int, naming: str = "2021",
                    shape: Sequence[int] = (64, 64, 64), seed: int = 0,
                    modalities: Sequence[str] = MODALITIES, *, version: str = DEFAULT_VERSION,
                    options=None) -> list[str]:
  """Writes `n_cases` phantom cases (case i from seed `seed + i`) as a BraTS-format folder; returns case dirs.

  2021: `<root>/BraTS2021_00000/BraTS2021_00000_{t1,t1ce,t2,flair,seg}.nii.gz`, labels {0,1,2,4} (ET = 4).
  2023: `<root>/BraTS-GLI-00000-000/BraTS-GLI-00000-000-{t1n,t1c,t2w,t2f,seg}.nii.gz`, labels {0,1,2,3}.
  Images are int16 (intensities rounded; >= 1 inside the head, 0 outside), seg uint8, with the case affine.
  Each file is written atomically.
  """
  import nibabel as nib  # pylint: disable=g-import-not-at-top
  case_id(0, naming)  # validates `naming`
  root = os.fspath(root)
  dirs = []
  for i in range(n_cases):
    case = make_case(seed + i, shape=shape, modalities=modalities, version=version, options=options)
    cid = case_id(i, naming)
    case_dir = os.path.join(root, cid)
    os.makedirs(case_dir, exist_ok=True)
    seg = case.label.astype(np.uint8)
    if naming == "2021":
      seg = np.where(seg == 3, 4, seg).astype(np.uint8)
    volumes = {m: np.clip(np.rint(case.image[..., c]), 0, np.iinfo(np.int16).max).astype(np.int16)
               for c, m in enumerate(case.modalities)}
    volumes["seg"] = seg
    for key, data in volumes.items():
      img = nib.Nifti1Image(data, case.affine)
      img.header.set_xyzt_units("mm", "sec")
      img.set_qform(case.affine, code=1)
      img.set_sform(case.affine, code=1)
      with io_utils.atomic_path(os.path.join(case_dir, brats_file_name(cid, key, naming))) as tmp:
        nib.save(img, tmp)
    dirs.append(case_dir)
  return dirs


def summarize(case_dirs: Sequence[str]) -> list[dict]:
  """Per written case: id, grid shape, spacing, tumour voxels per contract label, file sizes (read back)."""
  import nibabel as nib  # pylint: disable=g-import-not-at-top
  rows = []
  for case_dir in case_dirs:
    files = sorted(f for f in os.listdir(case_dir) if f.endswith((".nii.gz", ".nii")))
    seg_files = [f for f in files if f.endswith(("_seg.nii.gz", "-seg.nii.gz"))]
    if not seg_files:
      raise FileNotFoundError(f"{case_dir}: no *_seg / *-seg file")
    seg_img = nib.load(os.path.join(case_dir, seg_files[0]))
    seg = np.asarray(seg_img.dataobj)
    rows.append({
        "case_id": os.path.basename(os.path.normpath(case_dir)),
        "shape": tuple(int(s) for s in seg.shape),
        "spacing": tuple(round(float(s), 3) for s in seg_img.header.get_zooms()[:3]),
        # ET is stored as 4 in 2021 files and as 3 in 2023 files; report it as label 3 either way.
        "voxels": {1: int((seg == 1).sum()), 2: int((seg == 2).sum()), 3: int(((seg == 3) | (seg == 4)).sum())},
        "files": {f: os.path.getsize(os.path.join(case_dir, f)) for f in files},
    })
  return rows


def format_summary(rows: Sequence[dict], root: str, seconds: float | None = None) -> str:
  """A readable table of `summarize` rows plus totals."""
  lines = [f"phantom BraTS folder: {root}",
           f"{'case':<22} {'shape':<13} {'spacing mm':<19} {'NCR(1)':>7} {'ED(2)':>7} {'ET(3)':>7} "
           f"{'WT':>7} {'files':>5} {'size':>9}"]
  total_bytes = 0
  total_vox = {1: 0, 2: 0, 3: 0}
  for r in rows:
    size = sum(r["files"].values())
    total_bytes += size
    v = r["voxels"]
    for k in total_vox:
      total_vox[k] += v[k]
    lines.append(f"{r['case_id']:<22} {'x'.join(map(str, r['shape'])):<13} "
                 f"{'x'.join(f'{s:g}' for s in r['spacing']):<19} {v[1]:>7} {v[2]:>7} {v[3]:>7} "
                 f"{v[1] + v[2] + v[3]:>7} {len(r['files']):>5} {_human(size):>9}")
  if rows:
    lines.append("files per case: " + ", ".join(
        f"{f.split(rows[-1]['case_id'])[-1].lstrip('_-')} {_human(s)}" for f, s in rows[-1]["files"].items()))
  n = len(rows)
  total = (f"total: {n} cases, {sum(len(r['files']) for r in rows)} files, {_human(total_bytes)}, "
           f"tumour voxels NCR {total_vox[1]} / ED {total_vox[2]} / ET {total_vox[3]}")
  if seconds is not None:
    total += f", {seconds:.2f} s ({seconds / max(n, 1):.3f} s/case)"
  lines.append(total)
  return "\n".join(lines)


def _human(n_bytes: float) -> str:
  for unit in ("B", "KB", "MB", "GB"):
    if n_bytes < 1024 or unit == "GB":
      return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
    n_bytes /= 1024
  return ""


def timed_write(root, n_cases, **kw) -> tuple[list[str], float]:
  """`write_brats_dir` and the seconds it took (for launchers and benches)."""
  start = time.perf_counter()
  dirs = write_brats_dir(root, n_cases, **kw)
  return dirs, time.perf_counter() - start
