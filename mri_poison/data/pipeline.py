"""Grain training pipeline: shard -> shuffle -> repeat -> sample a patch/slice -> augment -> batch.

Works over any random-access source whose elements are `Case`s or mappings with "image" (X, Y, Z, C) or
(X, Y, C) and "label" arrays (a list of Cases, a `tfds.data_source(...)["train"]`, ...). Every random draw comes
from the per-element `np.random.Generator` that grain derives from the seed and the element's position, so the
stream is a pure function of (source, config, seed, shard) and the iterator state is a few integers.

`data_cfg.batch_size` is the GLOBAL batch B (big_vision convention), and the global batch at every step is
the same whatever the number of processes P: one stream is drawn over ALL records, cut into global batches of B,
and process p keeps rows [p*B/P, (p+1)*B/P) of each (it reads and augments only those records; every example's
random draws depend on its position in the global stream, not on P). So a run does not depend on how many
processes ran it, the processes' examples at each step are different records of the same global batch, and the
iterator state (the number of global batches consumed) is the same on every process and for every P: a
checkpoint can resume on another process count. The rows match the mesh: `train.mesh.make_mesh` orders devices
by process, so `jax.make_array_from_process_local_data` puts process p's rows at [p*B/P, (p+1)*B/P).

`shard_index` / `shard_count` instead split the RECORDS: shard s draws its own stream of `B // shard_count`
examples per step from records s, s + shard_count, ... (disjoint cases per shard, but the global batch then
changes with the shard count). The process layout above is the default; the record split is for callers that
ask for it.

Besides "image" and "label", every example says where it came from, so that per-record tensors (study 4's
per-case error-minimising noise, a per-case gradient sum) can be gathered for a batch and written back:

  "index"    int32 ()    the record's position in the ORIGINAL source (also under per-process sharding).
  "origin"   int32 (R,)  where the patch starts in the record's voxel grid; R is the record's spatial rank.
                         3D mode: (x0, y0, z0). 2D mode from volume records: (x0, y0, z), z = the axial slice
                         taken. 2D mode from slice records: (x0, y0). An entry is negative (and the patch runs
                         past the grid's end) along an axis where the grid is smaller than the patch: the patch
                         is the grid zero-padded, centred.
  "flipped"  bool (P,)   per patch axis: the patch was mirrored along it (`augment.flip`).

The stored image and label are AFTER the flips, and the image after the intensity augmentation. Hence, with the
intensity augmentation off, `cut_patch(record_image, origin, patch_shape, flipped)` is the example's image, and
`paste_patch` maps a per-voxel patch (a gradient, a noise update) back onto the record's grid.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

import grain
import grain.experimental
import numpy as np

from mri_poison.data.case import Case, DataError


def train_iterator(source, data_cfg, *, seed: int, shard_index: int | None = None,
                   shard_count: int | None = None, process_index: int | None = None,
                   process_count: int | None = None) -> grain.DatasetIterator:
  """Infinite iterator of this process's rows of each global batch; has get_state/set_state (JSON-able).

  process_index / process_count: default jax.process_index() / jax.process_count() (see the module docstring);
  shard_index / shard_count: the record split instead (then the process arguments must be left out).

  A batch of B = this process's rows: {"image": (B, *patch, C) f32, "label": (B, *patch) i32, "index": (B,) i32, "origin": (B, R) i32,
  "flipped": (B, P) bool} (see the module docstring for index / origin / flipped).
  """
  return iter(train_dataset(source, data_cfg, seed=seed, shard_index=shard_index, shard_count=shard_count,
                            process_index=process_index, process_count=process_count))


def train_dataset(source, data_cfg, *, seed: int, shard_index: int | None = None,
                  shard_count: int | None = None, process_index: int | None = None,
                  process_count: int | None = None) -> grain.IterDataset:
  """The `grain.IterDataset` behind `train_iterator` (for callers that want to add stages or zip streams)."""
  (shard_index, shard_count), (process_index, process_count) = _resolve_layout(
      shard_index, shard_count, process_index, process_count)
  mode = str(data_cfg.mode)
  patch_shape = tuple(int(p) for p in data_cfg.patch_shape)
  want_rank = {"3d": 3, "2d": 2}.get(mode)
  if want_rank is None:
    raise DataError(f"data_cfg.mode: expected '3d' or '2d', got {mode!r}")
  if len(patch_shape) != want_rank or min(patch_shape) < 1:
    raise DataError(f"data_cfg.patch_shape: expected {want_rank} positive sizes for mode {mode!r}, "
                    f"got {tuple(data_cfg.patch_shape)}")
  batch_size = int(data_cfg.batch_size)
  if batch_size < 1 or batch_size % (shard_count * process_count):
    raise DataError(f"data_cfg.batch_size: the global batch {batch_size} must be a positive multiple of "
                    f"the process count {shard_count * process_count}")
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
                    "must each get a disjoint share (raise data_cfg.n_cases or use fewer shards)")
  # Tag each record with its position in the source before sharding, so examples can name it. The tag stays
  # upstream of `.seed`: grain derives the shuffle and random_map seeds from their distance to the seed node,
  # and any stage between them would change the image/label stream for a given seed.
  ds = ds.map_with_index(functools.partial(_tag_with_index, len(ds)))
  # The record split (shard_count > 1 only when asked): each shard draws its own stream from its own records.
  ds = ds[shard_index::shard_count]
  ds = ds.seed(int(seed)).shuffle().repeat(None)  # new permutation every epoch, infinite
  ds = ds.map(_indexed_example)

  def sample(example, rng: np.random.Generator):
    # The order and number of rng draws here fix the stream for a seed: change them and every run changes.
    image, label = example["image"], example["label"]
    slice_index = ()
    if mode == "2d" and image.ndim == 4:
      z = _sample_slice_index(image, label, tumour_fraction, rng)
      image, label, slice_index = image[:, :, z], label[:, :, z], (z,)
    if image.ndim != len(patch_shape) + 1:
      raise DataError(f"pipeline: record image has shape {image.shape}, which does not fit "
                      f"data_cfg.mode={mode!r} with data_cfg.patch_shape={patch_shape}")
    origin = sample_origin(label, patch_shape, fg_fraction, rng)
    image, label = cut_patch(image, origin, patch_shape), cut_patch(label, origin, patch_shape)
    image, label, flipped = _augment(image, label, rng, flip=flip, scale=scale, shift=shift)
    return {"image": image, "label": label, "index": example["index"],
            "origin": np.asarray((*origin, *slice_index), np.int32), "flipped": flipped}

  ds = ds.random_map(sample)
  batch_size //= shard_count
  if process_count > 1:
    # Downstream of random_map, so every example keeps the random draws of its global position.
    ds = _RowsOfBatches(ds, batch_size, process_index, process_count)
    batch_size //= process_count
  ds = ds.batch(batch_size, drop_remainder=True)
  read = grain.ReadOptions(num_threads=int(data_cfg.get("read_threads", 4)),
                           prefetch_buffer_size=int(data_cfg.get("prefetch", 4)))
  return ds.to_iter_dataset(read)


def zip_datasets(datasets: Mapping[str, grain.IterDataset | grain.MapDataset]) -> grain.IterDataset:
  """Steps several datasets together: element `{name: element of datasets[name]}`, e.g. {"a": ..., "b": ...}.

  For two-domain training (unpaired source- and target-domain batches) behind ONE iterator: the zipped
  iterator's state is `{"parents": [state of each dataset, in the mapping's order]}`, JSON-able, so
  `get_state`/`set_state` round-trip and `grain.checkpoint.CheckpointSave(iterator)` / `CheckpointRestore` (as
  in `mri_poison.train.checkpoint`) save and restore both streams at once. Restore into an iterator zipped from
  the same datasets in the same order. Built on grain's `ZipIterDataset`; finite datasets must have equal
  lengths (a shorter one raises ValueError when it ends first).

    pair = iter(zip_datasets({"a": train_dataset(src, cfg, seed=0), "b": train_dataset(tgt, cfg, seed=1)}))
    batch = next(pair)  # batch["a"]["image"], batch["b"]["image"]
  """
  if not datasets:
    raise ValueError("zip_datasets: expected at least one named dataset")
  names = tuple(datasets)
  bad = [n for n in names if not isinstance(n, str)]
  if bad:
    raise ValueError(f"zip_datasets: dataset names must be strings, got {bad}")
  parents = [d.to_iter_dataset() if isinstance(d, grain.MapDataset) else d for d in datasets.values()]
  return grain.experimental.ZipIterDataset(parents).map(functools.partial(_name_elements, names))


def stack_datasets(datasets: Sequence[grain.IterDataset | grain.MapDataset], axis: int = 1) -> grain.IterDataset:
  """Steps M datasets together and stacks their batches along `axis`: with batched datasets and axis 1, every
  leaf is laid out (B, M, ...), the layout `train.parts.stacked_step(..., batch_axis=1)` gives model m slice m.
  One savable state, as `zip_datasets`.
  """
  names = [str(i) for i in range(len(datasets))]
  zipped = zip_datasets(dict(zip(names, datasets)))
  return zipped.map(lambda d: _stack_elements([d[n] for n in names], axis))


def _stack_elements(elements: Sequence[Mapping[str, Any]], axis: int) -> dict[str, np.ndarray]:
  return {k: np.stack([e[k] for e in elements], axis=axis) for k in elements[0]}


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


def sample_origin(label: np.ndarray, patch_shape: Sequence[int], fg_fraction: float,
                  rng: np.random.Generator) -> np.ndarray:
  """Start (int per spatial axis of `label`'s grid) of a `patch_shape` window; a tumour voxel's w.p. fg_fraction.

  Where the grid is smaller than the patch, the window is the grid zero-padded (centred, the odd voxel after)
  and its start is negative. Else the window lies inside the grid; a tumour-centred window is shifted inwards.
  """
  spatial = np.asarray(label.shape)
  patch = np.asarray(patch_shape)
  pad_before = np.maximum(patch - spatial, 0) // 2
  high = np.maximum(spatial - patch, 0)  # largest start per axis on the padded grid
  foreground = np.flatnonzero(label) if rng.random() < fg_fraction else np.empty(0)
  if foreground.size:
    centre = np.asarray(np.unravel_index(foreground[rng.integers(foreground.size)], label.shape)) + pad_before
    start = np.clip(centre - patch // 2, 0, high)
  else:
    start = rng.integers(0, high + 1)
  return start - pad_before


def sample_patch(image: np.ndarray, label: np.ndarray, patch_shape: Sequence[int], fg_fraction: float,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """Crops `patch_shape` (zero-padding if the grid is smaller); centred on a tumour voxel w.p. fg_fraction."""
  origin = sample_origin(label, patch_shape, fg_fraction, rng)
  return cut_patch(image, origin, patch_shape), cut_patch(label, origin, patch_shape)


def cut_patch(volume: np.ndarray, origin: Sequence[int], patch_shape: Sequence[int],
              flipped: Sequence[bool] | None = None) -> np.ndarray:
  """`volume[origin : origin + patch_shape]`, zero where the window leaves the grid, then flipped as recorded.

  `volume` is a record's array with its spatial axes first (an image (X, Y, Z, C), a label (X, Y, Z), a
  per-case noise tensor). `origin` has one entry per spatial axis it indexes: the first `len(patch_shape)` are
  window starts, any further ones pick a single index (2D patches of volumes: origin (x0, y0, z)). `flipped`
  mirrors the patch along the marked patch axes, as the pipeline's flip augmentation did. Inside the grid and
  unflipped the result is a view.
  """
  origin = [int(o) for o in origin]
  patch_shape = tuple(int(p) for p in patch_shape)
  rank = len(patch_shape)
  if len(origin) < rank or volume.ndim < len(origin):
    raise ValueError(f"cut_patch: origin {tuple(origin)} does not fit patch_shape {patch_shape} and volume "
                     f"shape {volume.shape}")
  volume = volume[(slice(None),) * rank + tuple(origin[rank:])]
  inside, outside = _window(origin[:rank], patch_shape, volume.shape[:rank])
  if all(s.start == 0 and s.stop == p for s, p in zip(outside, patch_shape)):
    out = volume[inside]
  else:
    out = np.zeros(patch_shape + volume.shape[rank:], volume.dtype)
    if all(s.stop > s.start for s in inside):
      out[outside] = volume[inside]
  axes = tuple(int(a) for a in np.flatnonzero(flipped)) if flipped is not None else ()
  return np.flip(out, axes) if axes else out


def paste_patch(volume: np.ndarray, patch: np.ndarray, origin: Sequence[int],
                flipped: Sequence[bool] | None = None, *, add: bool = False) -> None:
  """Inverse of `cut_patch`, in place: writes (or with `add`, adds) the un-flipped `patch` at `origin`.

  The part of the patch that lies outside the grid (the zero padding) is dropped. Use it to write a per-example
  noise update or gradient back onto its record: `paste_patch(noise[index], grad, origin, flipped, add=True)`.
  """
  origin = [int(o) for o in origin]
  patch = np.asarray(patch)
  rank = patch.ndim - (volume.ndim - len(origin))  # patch spatial axes; the rest are channels
  if rank < 1 or len(origin) < rank:
    raise ValueError(f"paste_patch: patch shape {patch.shape} and origin {tuple(origin)} do not fit volume "
                     f"shape {volume.shape}")
  axes = tuple(int(a) for a in np.flatnonzero(flipped)) if flipped is not None else ()
  if axes:
    patch = np.flip(patch, axes)  # a flip is its own inverse
  target = volume[(slice(None),) * rank + tuple(origin[rank:])]  # a view: writes reach `volume`
  inside, outside = _window(origin[:rank], patch.shape[:rank], target.shape[:rank])
  if not all(s.stop > s.start for s in inside):
    return
  if add:
    target[inside] += patch[outside]
  else:
    target[inside] = patch[outside]


def _window(origin, patch_shape, grid):
  """(slices into the grid, matching slices into the patch) of the part of the window inside the grid."""
  inside, outside = [], []
  for o, p, g in zip(origin, patch_shape, grid):
    lo, hi = min(max(o, 0), g), max(min(o + p, g), 0)
    hi = max(hi, lo)
    inside.append(slice(lo, hi))
    outside.append(slice(lo - o, hi - o))
  return tuple(inside), tuple(outside)


def _sample_slice_index(image, label, tumour_fraction, rng) -> int:
  """An axial (last spatial axis) slice: a tumour slice w.p. tumour_fraction, else any slice with brain."""
  tumour = np.flatnonzero(label.any(axis=(0, 1)))
  if tumour.size and rng.random() < tumour_fraction:
    z = tumour[rng.integers(tumour.size)]
  else:
    brain = np.flatnonzero((image != 0).any(axis=(0, 1, 3)))
    z = brain[rng.integers(brain.size)] if brain.size else rng.integers(image.shape[2])
  return int(z)


def augment(image: np.ndarray, label: np.ndarray, rng: np.random.Generator, *, flip: bool, scale: float,
            shift: float) -> tuple[np.ndarray, np.ndarray]:
  """Random flips of each spatial axis; per-channel intensity x(1+U(-scale, scale)) + U(-shift, shift).

  The intensity change is applied inside the brain only, so background stays exactly 0 (the data contract).
  """
  image, label, _ = _augment(image, label, rng, flip=flip, scale=scale, shift=shift)
  return image, label


def _augment(image, label, rng, *, flip, scale, shift):
  """`augment` that also returns which patch axes it flipped (bool per spatial axis)."""
  flipped = np.zeros(label.ndim, bool)
  if flip:
    flipped = rng.random(label.ndim) < 0.5
    axes = tuple(int(a) for a in np.flatnonzero(flipped))
    if axes:
      image, label = np.flip(image, axes), np.flip(label, axes)  # views; the copies below make them contiguous
  label = np.ascontiguousarray(label, np.int32)
  if not (scale or shift):
    return np.ascontiguousarray(image, np.float32), label, flipped
  channels = image.shape[-1]
  gain = (1.0 + rng.uniform(-scale, scale, channels) if scale else np.ones(channels)).astype(np.float32)
  offset = (rng.uniform(-shift, shift, channels) if shift else np.zeros(channels)).astype(np.float32)
  brain = (image != 0).any(axis=-1, keepdims=True)
  out = image * gain  # new contiguous float32 array; then in place
  out += offset
  out *= brain
  return out, label, flipped


def _tag_with_index(n_records: int, index: int, record):
  # Grain's indices run on past the length over epochs; the source reads record `index % n_records`.
  return index % n_records, record


def _indexed_example(tagged) -> dict[str, np.ndarray]:
  index, record = tagged
  return {**as_example(record), "index": np.int32(index)}


def _name_elements(names, elements) -> dict[str, Any]:
  return dict(zip(names, elements))


class _RowsOfBatches(grain.MapDataset):
  """Process `index`'s rows of each global batch of `batch_size` consecutive elements of `parent`.

  Element j is parent element (j // b) * batch_size + index * b + j % b, with b = batch_size // count: batched
  by b, local batch k holds rows [index * b, (index + 1) * b) of global batch k. Lazy: only these elements are
  ever read.
  """

  def __init__(self, parent: grain.MapDataset, batch_size: int, index: int, count: int):
    super().__init__(parent)
    self._batch_size, self._rows = int(batch_size), int(batch_size) // int(count)
    self._offset = int(index) * self._rows

  def __len__(self) -> int:
    return (len(self._parent) // self._batch_size) * self._rows

  def _parent_index(self, index: int) -> int:
    step, row = divmod(int(index), self._rows)
    return step * self._batch_size + self._offset + row

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._parent[self._parent_index(index)]

  def _getitems(self, indices):
    return self._parent._getitems([self._parent_index(i) for i in indices])  # pylint: disable=protected-access

  def __str__(self) -> str:
    return f"RowsOfBatches(rows [{self._offset}, {self._offset + self._rows}) of {self._batch_size})"


def _resolve_layout(shard_index, shard_count, process_index, process_count):
  """((shard_index, shard_count), (process_index, process_count)), checked; see the module docstring."""
  records = shard_index is not None or shard_count is not None
  rows = process_index is not None or process_count is not None
  if records and rows:
    raise DataError("pipeline: pass either shard_index/shard_count (split the records) or "
                    "process_index/process_count (split each global batch), not both")
  if records:
    shard_index = 0 if shard_index is None else shard_index
    shard_count = 1 if shard_count is None else shard_count
    return _check_index("shard", shard_index, shard_count), (0, 1)
  if process_index is None or process_count is None:
    import jax  # only when the caller did not say; keeps the pipeline importable without touching devices
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  return (0, 1), _check_index("process", process_index, process_count)


def _check_index(what, index, count):
  index, count = int(index), int(count)
  if not 0 <= index < count:
    raise DataError(f"pipeline: {what}_index {index} not in [0, {what}_count={count})")
  return index, count
