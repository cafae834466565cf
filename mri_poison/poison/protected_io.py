"""Protected datasets written in formats we (and outside pipelines) read: BraTS NIfTI folders and TFDS.

`write_brats_folder(root, cases)` writes `<root>/<case_id>/<case_id>_{t1,t1ce,t2,flair,seg}.nii.gz` (other
modalities under their own name, e.g. `_ct`) with the case affine: images float32 (our z-scored, protected
intensities; background 0), labels uint8 in the BraTS 2018-2021 convention (enhancing tumour = 4), each file
written atomically. `mri_poison.data.load_splits` reads it back with `source="brats"` and `root=<root>` (which
preprocesses again: z-scoring an already z-scored case is nearly the identity), so any training pipeline that
reads BraTS folders can be tried on protected data.

`write_tfds(data_dir, config_name, cases)` writes the same cases as the TFDS dataset
`brats_protected/<config_name>` (array_record, one volume record per case in the layout of the `brats` builder's
`vol*` configs: image f32 (X, Y, Z, C), label i32, affine, spacing, case_id, modalities), built without
TensorFlow. The voxels are stored as they are (no second preprocessing), and `load_splits` reads them back
unchanged with `source="tfds"`, `tfds_name="brats_protected/<config_name>"`, `data_dir=<data_dir>`: the
builder class is not registered, so TFDS opens the prepared files by their dataset_info.json (no code needed
on the reading side; `tfds.data_source` works the same way).
"""
from __future__ import annotations

import os
import re
import shutil

import nibabel as nib
import numpy as np
import tensorflow_datasets as tfds

from mri_poison import io_utils
from mri_poison.data.tfds import brats as brats_tfds
from mri_poison.data.tfds import without_progress_bars

TFDS_NAME = "brats_protected"
_DESCRIPTION = """A protected (unlearnable-example) training split written by mri_poison's study 4: cases already
preprocessed like the `brats` dataset (z-scored inside the brain, background 0, labels {0, 1, 2, 3}) with the
protection's perturbation added. One 3D volume record per case."""


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


class BratsProtected(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Writer of a list of Cases as volume records (see the module doc); `cases` is given at construction."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  def __init__(self, *, cases, **kwargs):
    self._cases = list(cases)
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return brats_tfds.dataset_info(self, self.builder_config, _DESCRIPTION)

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download: the cases are in memory
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for index, case in enumerate(self._cases):
      yield from brats_tfds.records(case, self.builder_config, index)


def write_tfds(data_dir: str | os.PathLike, config_name: str, cases) -> str:
  """Writes `cases` as TFDS `brats_protected/<config_name>` under `data_dir`; returns that TFDS name.

  An existing dataset of that name and version is replaced (TFDS itself builds into a temporary folder and
  renames it when complete, so a killed write leaves no half dataset behind).
  """
  data_dir = os.fspath(data_dir)
  cases = list(cases)
  if not cases:
    raise ValueError("write_tfds: no cases to write")
  if not re.fullmatch(r"[a-z][a-z0-9_]*", str(config_name)):
    raise ValueError(f"write_tfds: config name {config_name!r} must be lower-case letters, digits and '_'")
  shapes = {c.image.shape for c in cases}
  modalities = {tuple(c.modalities) for c in cases}
  if len(shapes) != 1 or len(modalities) != 1:
    raise ValueError(f"write_tfds: cases must share one grid and modality list, got {shapes} and {modalities}")
  for c in cases:
    if c.label is None:
      raise ValueError(f"write_tfds: case {c.case_id} has no label")
  grid = tuple(int(s) for s in cases[0].image.shape[:3])
  config = brats_tfds.BratsConfig(name=str(config_name), grid=grid, kind="volume", modalities=next(iter(modalities)),
                                  description=f"{len(cases)} protected cases on a {grid} grid")
  builder = BratsProtected(cases=cases, config=config, data_dir=data_dir, file_format="array_record")
  if os.path.isdir(builder.data_dir):  # a previous (other) protection of the same name: replace it
    shutil.rmtree(builder.data_dir)
  with without_progress_bars():
    builder.download_and_prepare()
  return f"{TFDS_NAME}/{config_name}"
