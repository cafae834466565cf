"""TFDS builder `brats_phantom`: procedural phantom cases (no download), in the same layout as `brats`.

Case i is `phantom.make_case(seed + i, shape=phantom_shape, version=phantom_version)` preprocessed to the config grid, i.e. exactly what
`datasets.load_splits` returns for source="phantom" with the same n_cases / phantom_shape / shape / seed.

  import tensorflow_datasets as tfds, mri_poison.data.tfds
  tfds.builder("brats_phantom/vol32", data_dir=DATA_DIR, file_format="array_record").download_and_prepare()
  source = tfds.data_source("brats_phantom/vol32", data_dir=DATA_DIR)["train"]
"""
from __future__ import annotations

import dataclasses

import tensorflow_datasets as tfds

from mri_poison.data.tfds import brats

_DESCRIPTION = """BraTS-like phantom cases (mri_poison.data.phantom, version v2) preprocessed like the `brats`
dataset: z-scored inside the brain, cropped to the brain and padded to the grid; labels {0, 1, 2, 3}."""


@dataclasses.dataclass(eq=False)
class BratsPhantomConfig(brats.BratsConfig):
  n_cases: int = 8
  phantom_shape: tuple[int, int, int] = (48, 48, 48)
  phantom_version: str = "v2"  # default phantom options; builds of v1 cases are dataset version 1.0.0


def _config(name, n_cases, phantom, grid, kind="volume"):
  what = "3D volumes" if kind == "volume" else "axial 2D slices"
  return BratsPhantomConfig(name=name, n_cases=n_cases, phantom_shape=(phantom,) * 3, grid=(grid,) * 3,
                            kind=kind, description=f"{n_cases} phantom cases ({phantom}^3) as {what} on {grid}^3")


class BratsPhantom(tfds.core.GeneratorBasedBuilder):
  """Generated phantom counterpart of `brats` (see the module docstring)."""

  VERSION = tfds.core.Version("2.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release (phantom v1).", "2.0.0": "Cases from phantom v2."}
  BUILDER_CONFIGS = [
      _config("tiny", 4, 24, 16),  # tests
      _config("vol32", 8, 48, 32),
      _config("vol64", 16, 80, 64),
      _config("slices32", 8, 48, 32, kind="slices"),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    return brats.dataset_info(self, self.builder_config, _DESCRIPTION)

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    from mri_poison.data.grid import phantom_cases
    config = self.builder_config
    for index in range(config.n_cases):
      case, = phantom_cases(1, seed=config.seed + index, phantom_shape=config.phantom_shape,
                            shape=config.grid, modalities=config.modalities, version=config.phantom_version)
      yield from brats.records(case, config, index)
