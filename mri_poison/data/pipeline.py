"""Grain training pipeline: shard -> shuffle -> repeat -> sample a patch/slice -> augment -> batch.

Works over any random-access source whose elements are `Case`s or mappings with "image" (X, Y, Z, C) or
(X, Y, C) and "label" arrays (a list of Cases, a `tfds.data_source(...)["train"]`, ...). Every random draw comes
from the per-element `np.random.Generator` that grain derives from the seed and the element's position, so the
stream is a pure function of (source, config, seed, shard) and the iterator state is a few integers.

`data_cfg.batch_size` is the GLOBAL batch (big_vision convention): each process yields
`batch_size // shard_count` examples per step, drawn from its own disjoint subset of the source records.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import grain
import numpy as np

from mri_poison.data.case import Case, DataError


def train_iterator(source, data_cfg, *, seed: int, shard_index: int | None = None,
                   shard_count: int | None = None) -> grain.DatasetIterator:
  """Infinite iterator of {"image": (B, *patch, C) f32, "label": (B, *patch) i32}; has get_state/set_state."""
  return iter(train_dataset(source, data_cfg, seed=seed, shard_index=shard_index, shard_count=shard_count))


def train_dataset(source, data_cfg, *, seed: int, shard_index: int | None = None,
                  shard_count: int | None = None) -> grain.IterDataset:
  """The `grain.IterDataset` behind `train_iterator` (for callers that want to add stages)."""
  shard_index, shard_count = _resolve_shard(shard_index, shard_count)
  mode = str(data_cfg.mode)
  patch_shape = tuple(int(p) for p in data_cfg.patch_shape)
  want_rank = {"3d": 3, "2d": 2}.get(mode)
  if want_rank is None:
    raise DataError(f"data_cfg.mode: expected '3d' or '2d', got {mode!r}")
  if len(patch_shape) != want_rank or min(patch_shape) < 1:
    raise DataError(f"data_cfg.patch_shape: expected {want_rank} positive sizes for mode {mode!r}, "
                    f"got {tuple(data_cfg.patch_shape)}")
  batch_size = int(data_cfg.batch_size)
  if batch_size < 1 or batch_size % shard_count:
    raise DataError(f"data_cfg.batch_size: the global batch {batch_size} must be a positive multiple of "
                    f"the process count {shard_count}")
  fg_fraction = float(data_cfg.fg_fraction)
  tumour_fraction = float(data_cfg.get("tumour_fraction", fg_fraction))
  for key, value in (("fg_fraction", fg_fraction), ("tumour_fraction", tumour_fraction)):
    if not 0.0 <= value <= 1.0:
      raise DataError(f"data_cfg.{key}: expected a probability in [0, 1], got {value}")
  aug = data_cfg.get("augment", None) or {}
  flip, scale, shift = bool(aug.get("flip", False)), float(aug.get("scale", 0.0)), float(aug.get("shift", 0.0))

  ds = grain.MapDataset.source(source)
  if len(ds) < shard_count:
    raise DataError(f"pipeline source has {len(ds)} records, fewer than the {shard_count} processes that "
                    "must each get a disjoint share (raise data_cfg.n_cases or use fewer processes)")
  # Shard the records (not the stream) so processes see disjoint cases, as with grain's ShardByJaxProcess.
  ds = ds[shard_index::shard_count]
  ds = ds.seed(int(seed)).shuffle().repeat(None)  # new permutation every epoch, infinite
  ds = ds.map(as_example)

  def sample(example, rng: np.random.Generator):
    image, label = example["image"], example["label"]
    if mode == "2d" and image.ndim == 4:
      image, label = _sample_slice(image, label, tumour_fraction, rng)
    if image.ndim != len(patch_shape) + 1:
      raise DataError(f"pipeline: record image has shape {image.shape}, which does not fit "
                      f"data_cfg.mode={mode!r} with data_cfg.patch_shape={patch_shape}")
    image, label = sample_patch(image, label, patch_shape, fg_fraction, rng)
    image, label = augment(image, label, rng, flip=flip, scale=scale, shift=shift)
    return {"image": image, "label": label}

  ds = ds.random_map(sample)
  ds = ds.batch(batch_size // shard_count, drop_remainder=True)
  read = grain.ReadOptions(num_threads=int(data_cfg.get("read_threads", 4)),
                           prefetch_buffer_size=int(data_cfg.get("prefetch", 4)))
  return ds.to_iter_dataset(read)


def as_example(record: Case | Mapping[str, Any]) -> dict[str, np.ndarray]:
  """{"image" f32, "label" i32} from a Case or a TFDS-style record (other fields dropped)."""
  if isinstance(record, Case):
    image, label, name = record.image, record.label, record.case_id
  else:
    image, label = record["image"], record.get("label")
    name = record.get("case_id", "<record>")
    name = name.decode() if isinstance(name, bytes) else name
  if label is None:
    raise DataError(f"pipeline: case {name} has no label; training needs labelled cases")
  return {"image": np.asarray(image, np.float32), "label": np.asarray(label, np.int32)}


def sample_patch(image: np.ndarray, label: np.ndarray, patch_shape: Sequence[int], fg_fraction: float,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """Crops `patch_shape` (zero-padding if the grid is smaller); centred on a tumour voxel w.p. fg_fraction."""
  spatial = image.shape[:-1]
  pad = [max(p - s, 0) for p, s in zip(patch_shape, spatial)]
  if any(pad):
    widths = [(q // 2, q - q // 2) for q in pad]
    image = np.pad(image, widths + [(0, 0)])
    label = np.pad(label, widths)
    spatial = image.shape[:-1]
  high = np.asarray(spatial) - np.asarray(patch_shape)  # largest valid start per axis
  foreground = np.flatnonzero(label) if rng.random() < fg_fraction else np.empty(0)
  if foreground.size:
    centre = np.asarray(np.unravel_index(foreground[rng.integers(foreground.size)], spatial))
    start = np.clip(centre - np.asarray(patch_shape) // 2, 0, high)
  else:
    start = rng.integers(0, high + 1)
  window = tuple(slice(int(b), int(b) + p) for b, p in zip(start, patch_shape))
  return image[window], label[window]


def _sample_slice(image, label, tumour_fraction, rng):
  """An axial (last spatial axis) slice: a tumour slice w.p. tumour_fraction, else any slice with brain."""
  tumour = np.flatnonzero(label.any(axis=(0, 1)))
  if tumour.size and rng.random() < tumour_fraction:
    z = tumour[rng.integers(tumour.size)]
  else:
    brain = np.flatnonzero((image != 0).any(axis=(0, 1, 3)))
    z = brain[rng.integers(brain.size)] if brain.size else rng.integers(image.shape[2])
  return image[:, :, z], label[:, :, z]


def augment(image: np.ndarray, label: np.ndarray, rng: np.random.Generator, *, flip: bool, scale: float,
            shift: float) -> tuple[np.ndarray, np.ndarray]:
  """Random flips of each spatial axis; per-channel intensity x(1+U(-scale, scale)) + U(-shift, shift).

  The intensity change is applied inside the brain only, so background stays exactly 0 (the data contract).
  """
  if flip:
    axes = tuple(int(a) for a in np.flatnonzero(rng.random(label.ndim) < 0.5))
    if axes:
      image, label = np.flip(image, axes), np.flip(label, axes)  # views; the copies below make them contiguous
  label = np.ascontiguousarray(label, np.int32)
  if not (scale or shift):
    return np.ascontiguousarray(image, np.float32), label
  channels = image.shape[-1]
  gain = (1.0 + rng.uniform(-scale, scale, channels) if scale else np.ones(channels)).astype(np.float32)
  offset = (rng.uniform(-shift, shift, channels) if shift else np.zeros(channels)).astype(np.float32)
  brain = (image != 0).any(axis=-1, keepdims=True)
  out = image * gain  # new contiguous float32 array; then in place
  out += offset
  out *= brain
  return out, label


def _resolve_shard(shard_index, shard_count):
  if shard_index is None or shard_count is None:
    import jax  # only when the caller did not say; keeps the pipeline importable without touching devices
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
  shard_index, shard_count = int(shard_index), int(shard_count)
  if not 0 <= shard_index < shard_count:
    raise DataError(f"pipeline: shard_index {shard_index} not in [0, shard_count={shard_count})")
  return shard_index, shard_count
