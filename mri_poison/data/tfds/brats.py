"""TFDS builder `brats`: a BraTS-format folder (manual download) preprocessed to 3D volumes or 2D slices.

Build (no TensorFlow needed; records are array_record files read back with `tfds.data_source`):

  import tensorflow_datasets as tfds, mri_poison.data.tfds
  builder = tfds.builder("brats/vol128", data_dir=DATA_DIR, file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=BRATS_ROOT))
  source = tfds.data_source("brats/vol128", data_dir=DATA_DIR)["train"]

Volume records: image f32 (G, G, G, C), label i32 (G, G, G), affine f64 (4, 4), spacing f32 (3,), case_id,
modalities ("t1,t1ce,t2,flair"). Tensors are stored raw: array_record already compresses its chunks
(a 64^3 x 4 phantom volume: 4.2 MB raw -> ~1.3 MB on disk), and a zlib feature encoding on top only made reads
2.7x slower for no size gain. Slice records: image f32 (G, G, C), label i32 (G, G), case_id, modalities,
slice (index along the axial axis). Images are z-scored inside the brain, background 0 (the data contract).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from mri_poison.data.case import MODALITIES, Case, DataError

# The grid covers this many mm per axis: an adult brain's bounding box plus the crop margin fits with room.
FIELD_OF_VIEW_MM = 192.0

_DESCRIPTION = """Brain-tumour MRI (BraTS 2018-2021, 2023+ or MSD Task01 layout) preprocessed for mri_poison:
brain mask (nonzero in any modality), per-modality z-score inside the mask, crop to the brain with a margin,
resample so that a 192 mm brain fits the grid (1.5 mm for 128, 3 mm for 64, 6 mm for 32 voxels), pad to the
grid; labels remapped to {0: background, 1: necrotic/non-enhancing core, 2: oedema,
3: enhancing tumour}. `vol*` configs hold one 3D volume per case, `slices*` configs axial 2D slices."""

_CITATION = """@article{menze2015brats, title={The Multimodal Brain Tumor Image Segmentation Benchmark (BRATS)},
author={Menze, Bjoern H and others}, journal={IEEE Transactions on Medical Imaging}, volume={34}, number={10},
pages={1993--2024}, year={2015}}"""


@dataclasses.dataclass(eq=False)
class BratsConfig(tfds.core.BuilderConfig):
  """grid: preprocessed 3D grid; kind: "volume" or "slices" (axial slices of the grid volume); spacing: voxel
  size (mm) the brain is resampled to before the pad to the grid (() keeps each scan's own)."""
  grid: tuple[int, int, int] = (128, 128, 128)
  spacing: tuple[float, ...] = ()
  kind: str = "volume"
  tumour_fraction: float = 0.5  # slices: fraction of kept slices that contain tumour
  modalities: tuple[str, ...] = MODALITIES
  seed: int = 0  # slices: which non-tumour slices are kept; phantom: seed of case 0


def _volume(name, size):
  return BratsConfig(name=name, grid=(size,) * 3, kind="volume", spacing=(FIELD_OF_VIEW_MM / size,) * 3,
                     description=f"3D volumes resampled to {FIELD_OF_VIEW_MM / size:g} mm on a {size}^3 grid")


def _slices(name, size):
  return BratsConfig(name=name, grid=(size,) * 3, kind="slices", spacing=(FIELD_OF_VIEW_MM / size,) * 3,
                     description=f"axial 2D slices ({size}x{size}) of volumes resampled to "
                                 f"{FIELD_OF_VIEW_MM / size:g} mm on a {size}^3 grid")


def features(config: BratsConfig) -> tfds.features.FeaturesDict:
  """Record layout of a config (shared with brats_phantom)."""
  grid, channels = tuple(config.grid), len(config.modalities)
  if config.kind == "volume":
    return tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(shape=grid + (channels,), dtype=np.float32),
        "label": tfds.features.Tensor(shape=grid, dtype=np.int32),
        "affine": tfds.features.Tensor(shape=(4, 4), dtype=np.float64),
        "spacing": tfds.features.Tensor(shape=(3,), dtype=np.float32),
        "case_id": tfds.features.Text(),
        "modalities": tfds.features.Text(),
    })
  if config.kind == "slices":
    return tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(shape=grid[:2] + (channels,), dtype=np.float32),
        "label": tfds.features.Tensor(shape=grid[:2], dtype=np.int32),
        "case_id": tfds.features.Text(),
        "modalities": tfds.features.Text(),
        "slice": tfds.features.Scalar(dtype=np.int32),
    })
  raise ValueError(f"BratsConfig {config.name}: kind must be 'volume' or 'slices', got {config.kind!r}")


def records(case: Case, config: BratsConfig, index: int):
  """Yields (key, record) for one preprocessed case (already on `config.grid`)."""
  mods = ",".join(case.modalities)
  if config.kind == "volume":
    yield case.case_id, {
        "image": case.image.astype(np.float32), "label": case.label.astype(np.int32),
        "affine": np.asarray(case.affine, np.float64), "spacing": np.asarray(case.spacing, np.float32),
        "case_id": case.case_id, "modalities": mods}
    return
  for z in slice_indices(case.label, config.tumour_fraction, seed=config.seed + index):
    yield f"{case.case_id}/{z:04d}", {
        "image": np.ascontiguousarray(case.image[:, :, z], np.float32),
        "label": np.ascontiguousarray(case.label[:, :, z], np.int32),
        "case_id": case.case_id, "modalities": mods, "slice": np.int32(z)}


def slice_indices(label: np.ndarray, tumour_fraction: float, seed: int) -> list[int]:
  """Axial slices to keep: every tumour slice, plus non-tumour slices so tumour slices make ~tumour_fraction."""
  has_tumour = label.any(axis=(0, 1))
  tumour, other = np.flatnonzero(has_tumour), np.flatnonzero(~has_tumour)
  if tumour_fraction >= 1.0 or not tumour.size:
    n_other = 0 if tumour.size else other.size
  else:
    n_other = min(other.size, int(round(tumour.size * (1.0 - tumour_fraction) / max(tumour_fraction, 1e-6))))
  chosen = np.random.default_rng(seed).choice(other, n_other, replace=False) if n_other else []
  return sorted(int(z) for z in np.concatenate([tumour, chosen]))


def dataset_info(builder, config: BratsConfig, description: str) -> tfds.core.DatasetInfo:
  return tfds.core.DatasetInfo(
      builder=builder, description=description, features=features(config), supervised_keys=("image", "label"),
      disable_shuffling=True,  # records in case order, so a record index means the same case everywhere
      homepage="https://www.synapse.org/brats", citation=_CITATION)


class Brats(tfds.core.GeneratorBasedBuilder):
  """BraTS-format folder preprocessed for mri_poison (see the module docstring)."""

  VERSION = tfds.core.Version("2.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release.",
                   "2.0.0": "Brains resampled to fit the grid (was: centre-cropped at the scan's spacing); a case "
                            "whose brain or tumour would still be cropped is an error; unlabelled cases logged."}
  BUILDER_CONFIGS = [_volume("vol128", 128), _volume("vol64", 64), _volume("vol32", 32),
                     _slices("slices128", 128), _slices("slices64", 64)]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Download a BraTS training set (e.g. BraTS 2021 Task 1 from https://www.synapse.org/brats, or the Medical
  Segmentation Decathlon Task01_BrainTumour), unpack it, and pass its root folder as the manual dir:
    tfds.download.DownloadConfig(manual_dir="/path/to/BraTS2021_Training_Data")
  The folder may hold BraTS 2018-2021 case folders (<id>/<id>_t1.nii.gz, _t1ce, _t2, _flair, _seg), BraTS
  2023+ case folders (<id>/<id>-t1n.nii.gz, -t1c, -t2w, -t2f, -seg), or an MSD Task01 root (imagesTr/,
  labelsTr/). Only cases with a segmentation are used."""

  def _info(self) -> tfds.core.DatasetInfo:
    return dataset_info(self, self.builder_config, _DESCRIPTION)

  def _split_generators(self, dl_manager):
    from mri_poison.data.loaders import list_cases
    refs = sorted(list_cases(str(dl_manager.manual_dir)))
    return {"train": self._generate_examples(refs)}

  def _generate_examples(self, refs):
    from absl import logging
    from mri_poison.data.grid import fit_to_grid
    from mri_poison.data.loaders import load_case
    config = self.builder_config
    limits = {"spacing": tuple(config.spacing)}  # and the crop-loss limits of a `brats` folder config
    for index, ref in enumerate(refs):
      case = load_case(ref, tuple(config.modalities))
      if case.label is None:  # unlabelled (validation/test) cases cannot train a segmenter
        logging.warning("brats/%s: %s has no segmentation: left out", config.name, ref)
        continue
      try:
        case = fit_to_grid(case, tuple(config.grid), limits)
      except DataError as e:
        raise DataError(f"brats/{config.name} ({config.spacing} mm, grid {config.grid}): {e}. In TFDS: build "
                        "a BratsConfig(spacing=...) coarser than that") from e
      yield from records(case, config, index)
