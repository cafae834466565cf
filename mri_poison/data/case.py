"""The `Case` record and the label/region contract shared by every loader and study.

Images are channel-last float32 `(X, Y, Z, C)`; labels int32 in {0: background, 1: necrotic / non-enhancing
core, 2: oedema, 3: enhancing tumour} whatever the source convention.
"""
from __future__ import annotations

import dataclasses

import numpy as np

MODALITIES = ("t1", "t1ce", "t2", "flair")
LABELS = {0: "background", 1: "necrotic/non-enhancing core", 2: "oedema", 3: "enhancing tumour"}
REGIONS = ("WT", "TC", "ET")
# Official BraTS glioma regions, as label sets after the remap to the contract.
REGION_LABELS = {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)}


class DataError(ValueError):
  """Bad input data: the message names the offending file (or key) and what was expected."""


@dataclasses.dataclass
class Case:
  image: np.ndarray  # float32 (X, Y, Z, C)
  modalities: tuple[str, ...]
  label: np.ndarray | None  # int32 (X, Y, Z) in {0, 1, 2, 3}
  affine: np.ndarray  # float64 (4, 4), voxel -> world (mm)
  spacing: tuple[float, float, float]
  case_id: str
  # What preprocessing did to a scan read from disk (`grid.fit_to_grid`): shapes, spacings, what was kept.
  preprocessing: dict | None = dataclasses.field(default=None, compare=False)

  def __post_init__(self):
    if self.image.ndim != 4:
      raise DataError(f"case {self.case_id}: image must be (X, Y, Z, C), got shape {self.image.shape}")
    if self.image.shape[-1] != len(self.modalities):
      raise DataError(f"case {self.case_id}: {self.image.shape[-1]} channels but modalities {self.modalities}")
    if self.label is not None and self.label.shape != self.image.shape[:3]:
      raise DataError(f"case {self.case_id}: label shape {self.label.shape} != image grid {self.image.shape[:3]}")

  @property
  def shape(self) -> tuple[int, int, int]:
    return tuple(self.image.shape[:3])

  def replace(self, **changes) -> "Case":
    return dataclasses.replace(self, **changes)


def brats_regions(label):
  """Boolean region masks `(..., 3)` in the order (WT, TC, ET) from a contract label map (numpy or jax)."""
  xp = np if isinstance(label, np.ndarray) else _jnp()
  wt = label > 0
  tc = (label == 1) | (label == 3)
  et = label == 3
  return xp.stack([wt, tc, et], axis=-1)


def _jnp():
  import jax.numpy as jnp
  return jnp
