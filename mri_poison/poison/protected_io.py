"""Protected datasets written in a format we (and outside pipelines) read: a BraTS-2021-style NIfTI folder.

`write_brats_folder(root, cases)` writes `<root>/<case_id>/<case_id>_{t1,t1ce,t2,flair,seg}.nii.gz` (other
modalities under their own name, e.g. `_ct`) with the case affine: images float32 (our z-scored, protected
intensities; background 0), labels uint8 in the BraTS 2018-2021 convention (enhancing tumour = 4), each file
written atomically. `mri_poison.data.load_splits` reads it back with `source="brats"` and `root=<root>` (which
preprocesses again: z-scoring an already z-scored case is nearly the identity), so any training pipeline that
reads BraTS folders can be tried on protected data. TFDS output is not written (use the TFDS "brats" builder on
this folder as its manual dir).
"""
from __future__ import annotations

import os

import nibabel as nib
import numpy as np

from mri_poison import io_utils


def write_brats_folder(root: str | os.PathLike, cases) -> list[str]:
  """Writes `cases` (Cases with labels) as a BraTS-2021-style folder; returns the case folders."""
  root = os.fspath(root)
  dirs = []
  for case in cases:
    if case.label is None:
      raise ValueError(f"write_brats_folder: case {case.case_id} has no label")
    cid = str(case.case_id)
    if not cid or os.sep in cid or cid.startswith("."):
      raise ValueError(f"write_brats_folder: case id {cid!r} cannot name a folder")
    case_dir = os.path.join(root, cid)
    os.makedirs(case_dir, exist_ok=True)
    label = np.asarray(case.label).astype(np.uint8)
    volumes = {m: np.asarray(case.image[..., c], np.float32) for c, m in enumerate(case.modalities)}
    volumes["seg"] = np.where(label == 3, 4, label).astype(np.uint8)
    for key, array in volumes.items():
      img = nib.Nifti1Image(array, np.asarray(case.affine, np.float64))
      img.header.set_xyzt_units("mm", "sec")
      img.set_qform(case.affine, code=1)
      img.set_sform(case.affine, code=1)
      with io_utils.atomic_path(os.path.join(case_dir, f"{cid}_{key}.nii.gz")) as tmp:
        nib.save(img, tmp)
    dirs.append(case_dir)
  return dirs
