"""Grain pipeline: shapes, determinism, resumable state, per-process disjointness, foreground bias, 2D mode."""
import json

import ml_collections
import numpy as np
import pytest

from mri_poison.data import pipeline
from mri_poison.data.case import Case, DataError

MODS = ("t1", "t1ce", "t2", "flair")


def _cfg(**kw):
  cfg = ml_collections.ConfigDict(dict(
      mode="3d", patch_shape=(8, 8, 8), fg_fraction=0.5, tumour_fraction=0.5, batch_size=2,
      augment=dict(flip=True, scale=0.1, shift=0.1), read_threads=2, prefetch=2))
  cfg.update(kw)
  return cfg


def _cases(n=6, size=24, value=None):
  """Noise (or constant `value` = case number) heads with a 4^3 tumour in the middle."""
  rng = np.random.default_rng(0)
  cases = []
  for i in range(n):
    image = np.zeros((size, size, size, 4), np.float32)
    brain = (slice(2, size - 2),) * 3
    image[brain] = rng.normal(size=image[brain].shape) if value is None else i + 1
    label = np.zeros((size,) * 3, np.int32)
    label[10:14, 10:14, 10:14] = 1 + i % 3
    cases.append(Case(image, MODS, label, np.eye(4), (1.0, 1.0, 1.0), f"c{i}"))
  return cases


def _take(it, n):
  return [next(it) for _ in range(n)]


def _same(a, b):
  return all(np.array_equal(x["image"], y["image"]) and np.array_equal(x["label"], y["label"]) for x, y in zip(a, b))


def test_batch_shapes_and_dtypes():
  batch = next(pipeline.train_iterator(_cases(), _cfg(), seed=0, shard_index=0, shard_count=1))
  assert batch["image"].shape == (2, 8, 8, 8, 4) and batch["image"].dtype == np.float32
  assert batch["label"].shape == (2, 8, 8, 8) and batch["label"].dtype == np.int32
  assert set(np.unique(batch["label"])) <= {0, 1, 2, 3}


def test_deterministic_for_a_seed_and_different_across_seeds():
  cases = _cases()
  a = _take(pipeline.train_iterator(cases, _cfg(), seed=3, shard_index=0, shard_count=1), 4)
  b = _take(pipeline.train_iterator(cases, _cfg(), seed=3, shard_index=0, shard_count=1), 4)
  c = _take(pipeline.train_iterator(cases, _cfg(), seed=4, shard_index=0, shard_count=1), 4)
  assert _same(a, b)
  assert not _same(a, c)


def test_state_round_trip_resumes_the_same_batches():
  cases, cfg = _cases(), _cfg()
  it = pipeline.train_iterator(cases, cfg, seed=1, shard_index=0, shard_count=1)
  _take(it, 5)  # past the first epoch of 6 cases / batch 2 = 3 batches
  state = json.loads(json.dumps(it.get_state()))  # JSON-able for checkpoints
  expected = _take(it, 4)
  fresh = pipeline.train_iterator(cases, cfg, seed=1, shard_index=0, shard_count=1)
  fresh.set_state(state)
  assert _same(_take(fresh, 4), expected)


def test_processes_see_disjoint_cases_covering_the_dataset():
  cases = _cases(n=6, value=True)  # constant image value = case number, so a patch names its case
  cfg = _cfg(batch_size=4, augment=dict(flip=True, scale=0.0, shift=0.0), fg_fraction=1.0)
  seen = []
  for shard in range(2):
    batches = _take(pipeline.train_iterator(cases, cfg, seed=0, shard_index=shard, shard_count=2), 6)
    assert batches[0]["image"].shape[0] == 2  # global batch 4 over 2 processes
    seen.append({int(img.max()) for b in batches for img in b["image"]})
  assert seen[0].isdisjoint(seen[1])
  assert seen[0] | seen[1] == set(range(1, 7))


def test_foreground_fraction_biases_patch_centres():
  cases = _cases()
  no_flip = dict(flip=False, scale=0.0, shift=0.0)
  fg = _take(pipeline.train_iterator(cases, _cfg(fg_fraction=1.0, augment=no_flip), seed=0,
                                     shard_index=0, shard_count=1), 16)
  assert all((b["label"][:, 4, 4, 4] > 0).all() for b in fg)  # centre voxel is tumour
  rand = _take(pipeline.train_iterator(cases, _cfg(fg_fraction=0.0, augment=no_flip), seed=0,
                                       shard_index=0, shard_count=1), 32)
  with_tumour = np.mean([lab.any() for b in rand for lab in b["label"]])
  assert 0.05 < with_tumour < 0.6  # uniform windows hit the 4^3 tumour w.p. (11/17)^3 ~ 0.27


def test_2d_mode_from_volumes_and_from_slice_records():
  cfg = _cfg(mode="2d", patch_shape=(16, 16), tumour_fraction=1.0, fg_fraction=1.0)
  batch = next(pipeline.train_iterator(_cases(), cfg, seed=0, shard_index=0, shard_count=1))
  assert batch["image"].shape == (2, 16, 16, 4) and batch["label"].shape == (2, 16, 16)
  assert all(lab.any() for lab in batch["label"])  # tumour slices only
  records = [{"image": c.image[:, :, 12], "label": c.label[:, :, 12], "case_id": b"x"} for c in _cases()]
  batch = next(pipeline.train_iterator(records, cfg, seed=0, shard_index=0, shard_count=1))
  assert batch["image"].shape == (2, 16, 16, 4)


def test_patch_larger_than_volume_is_zero_padded():
  batch = next(pipeline.train_iterator(_cases(size=12), _cfg(patch_shape=(16, 16, 16)), seed=0,
                                       shard_index=0, shard_count=1))
  assert batch["image"].shape == (2, 16, 16, 16, 4)
  assert (batch["image"][:, :2] == 0).all() and (batch["label"][:, :2] == 0).all()


def test_augment_keeps_background_zero_and_bounds_intensity_change():
  image = np.zeros((10, 10, 10, 4), np.float32)
  image[2:8, 2:8, 2:8] = 1.0
  label = (image[..., 0] > 0).astype(np.int32)
  rng = np.random.default_rng(0)
  outs = [pipeline.augment(image, label, rng, flip=True, scale=0.1, shift=0.2) for _ in range(20)]
  for img, lab in outs:
    assert ((img != 0).any(-1) == (lab > 0)).all()  # flips move image and label together; background stays 0
    inside = img[lab > 0]
    assert inside.min() >= 0.9 - 0.2 - 1e-6 and inside.max() <= 1.1 + 0.2 + 1e-6
  assert np.std([img[lab > 0].mean() for img, lab in outs]) > 0.01


@pytest.mark.parametrize("changes, key", [
    (dict(mode="4d"), "data_cfg.mode"),
    (dict(patch_shape=(8, 8)), "data_cfg.patch_shape"),
    (dict(batch_size=3), "data_cfg.batch_size"),
    (dict(fg_fraction=1.5), "data_cfg.fg_fraction"),
])
def test_bad_config_names_the_key(changes, key):
  with pytest.raises(DataError, match=key):
    pipeline.train_iterator(_cases(), _cfg(**changes), seed=0, shard_index=0, shard_count=2)


def test_unlabelled_case_and_too_many_shards_are_rejected():
  cases = _cases(n=2)
  with pytest.raises(DataError, match="fewer than the 4 processes"):
    pipeline.train_iterator(cases, _cfg(batch_size=4), seed=0, shard_index=0, shard_count=4)
  unlabelled = [c.replace(label=None) for c in cases]
  with pytest.raises(DataError, match="no label"):
    next(pipeline.train_iterator(unlabelled, _cfg(), seed=0, shard_index=0, shard_count=1))


def test_default_sharding_follows_jax_process_index():
  import jax
  assert (jax.process_index(), jax.process_count()) == (0, 1)
  cases = _cases()
  default = _take(pipeline.train_iterator(cases, _cfg(), seed=2), 3)
  explicit = _take(pipeline.train_iterator(cases, _cfg(), seed=2, shard_index=0, shard_count=1), 3)
  assert _same(default, explicit)


# ---------------------------------------------------------------------------------------------------------------
# Provenance: every example names its record (index) and where the patch was cut (origin, flipped).


def _cut_reference(volume, origin, patch_shape, flipped):
  """Independent of pipeline.cut_patch: pad the record generously, slice, then flip."""
  rank, margin = len(patch_shape), max(patch_shape)
  volume = volume[(slice(None),) * rank + tuple(int(z) for z in origin[rank:])]
  padded = np.pad(volume, [(margin, margin)] * rank + [(0, 0)] * (volume.ndim - rank))
  patch = padded[tuple(slice(int(o) + margin, int(o) + margin + p) for o, p in zip(origin, patch_shape))]
  return np.flip(patch, tuple(np.flatnonzero(flipped)))


@pytest.mark.parametrize("mode, patch, shard_count", [
    ("3d", (12, 8, 10), 1),  # inside the 20x18x16 grid
    ("3d", (24, 8, 20), 2),  # wider than the grid along x and z: zero-padded, negative origins; 2 processes
    ("2d", (16, 24), 1),  # slices of volumes: origin (x0, y0, z)
])
def test_examples_carry_their_record_index_and_crop(mode, patch, shard_count):
  from mri_poison.data import phantom
  cases = [phantom.make_case(seed, shape=(20, 18, 16)) for seed in range(5)]
  cfg = _cfg(mode=mode, patch_shape=patch, batch_size=2 * shard_count,
             augment=dict(flip=True, scale=0.0, shift=0.0))
  for shard in range(shard_count):
    batches = _take(pipeline.train_iterator(cases, cfg, seed=0, shard_index=shard, shard_count=shard_count), 6)
    indices = np.concatenate([b["index"] for b in batches])
    assert set(indices.tolist()) == set(range(shard, 5, shard_count))  # ORIGINAL source positions
    for b in batches:
      assert b["index"].dtype == np.int32 and b["origin"].dtype == np.int32 and b["flipped"].dtype == bool
      assert b["origin"].shape == (2, 3) and b["flipped"].shape == (2, len(patch))
      for image, label, index, origin, flipped in zip(b["image"], b["label"], b["index"], b["origin"],
                                                      b["flipped"]):
        case = cases[index]
        np.testing.assert_array_equal(image, _cut_reference(case.image, origin, patch, flipped))
        np.testing.assert_array_equal(label, _cut_reference(case.label, origin, patch, flipped))
        np.testing.assert_array_equal(image, pipeline.cut_patch(case.image, origin, patch, flipped))
  if mode == "3d" and shard_count == 2:  # every padded axis starts at -(pad // 2)
    origins = np.concatenate([b["origin"] for b in batches])
    assert (origins[:, 0] == -2).all() and (origins[:, 2] == -2).all() and (origins[:, 1] >= 0).all()
  flips = np.concatenate([b["flipped"] for b in batches])
  assert flips.any() and not flips.all()  # the flags vary, so the test above saw both kinds


def test_slice_records_get_a_2d_origin():
  records = [{"image": c.image[:, :, 12], "label": c.label[:, :, 12]} for c in _cases()]
  cfg = _cfg(mode="2d", patch_shape=(8, 8), augment=dict(flip=True, scale=0.0, shift=0.0))
  for b in _take(pipeline.train_iterator(records, cfg, seed=0, shard_index=0, shard_count=1), 4):
    assert b["origin"].shape == (2, 2)
    for image, index, origin, flipped in zip(b["image"], b["index"], b["origin"], b["flipped"]):
      np.testing.assert_array_equal(image, _cut_reference(records[index]["image"], origin, (8, 8), flipped))


def test_paste_patch_maps_a_patch_back_onto_its_record():
  rng = np.random.default_rng(0)
  volume = rng.normal(size=(6, 5, 4, 2))
  # (origin, patch shape, record voxels the patch covers): inside; zero-padded on three sides; a 2D patch of slice 3.
  for origin, patch_shape, n_covered in [((1, 0, 2), (3, 4, 2), 3 * 4 * 2), ((-2, 1, -1), (9, 3, 6), 6 * 3 * 4),
                                         ((1, 2, 3), (4, 3), 4 * 3)]:
    flipped = rng.random(len(patch_shape)) < 0.5
    patch = pipeline.cut_patch(volume, origin, patch_shape, flipped)
    assert patch.shape == patch_shape + (2,)
    # Pasting the cut patch onto zeros recovers exactly the part of the record it covers.
    back = np.zeros_like(volume)
    pipeline.paste_patch(back, patch, origin, flipped)
    covered = np.zeros(volume.shape, bool)
    pipeline.paste_patch(covered, np.ones(patch.shape, bool), origin)
    assert covered.sum() == 2 * n_covered
    np.testing.assert_array_equal(back, np.where(covered, volume, 0))
    # add=True accumulates (e.g. per-example gradients of one record).
    pipeline.paste_patch(back, patch, origin, flipped, add=True)
    np.testing.assert_array_equal(back, np.where(covered, 2 * volume, 0))


def _reference_stream(source, cfg, seed):
  """The pipeline as it was before examples carried index/origin/flipped (one process): the image/label stream
  for a seed must not change, or every earlier result changes with it."""
  import grain
  patch_shape = tuple(cfg.patch_shape)
  aug = cfg.augment

  def sample(example, rng):
    image, label = example["image"], example["label"]
    if cfg.mode == "2d" and image.ndim == 4:
      tumour = np.flatnonzero(label.any(axis=(0, 1)))
      if tumour.size and rng.random() < cfg.tumour_fraction:
        z = tumour[rng.integers(tumour.size)]
      else:
        brain = np.flatnonzero((image != 0).any(axis=(0, 1, 3)))
        z = brain[rng.integers(brain.size)] if brain.size else rng.integers(image.shape[2])
      image, label = image[:, :, z], label[:, :, z]
    pad = [max(p - s, 0) for p, s in zip(patch_shape, image.shape[:-1])]
    widths = [(q // 2, q - q // 2) for q in pad]
    image, label = np.pad(image, widths + [(0, 0)]), np.pad(label, widths)
    high = np.asarray(label.shape) - np.asarray(patch_shape)
    foreground = np.flatnonzero(label) if rng.random() < cfg.fg_fraction else np.empty(0)
    if foreground.size:
      centre = np.asarray(np.unravel_index(foreground[rng.integers(foreground.size)], label.shape))
      start = np.clip(centre - np.asarray(patch_shape) // 2, 0, high)
    else:
      start = rng.integers(0, high + 1)
    window = tuple(slice(int(b), int(b) + p) for b, p in zip(start, patch_shape))
    image, label = image[window], label[window]
    if aug.flip:
      axes = tuple(int(a) for a in np.flatnonzero(rng.random(label.ndim) < 0.5))
      image, label = np.flip(image, axes), np.flip(label, axes)
    gain = (1.0 + rng.uniform(-aug.scale, aug.scale, image.shape[-1])).astype(np.float32)
    offset = rng.uniform(-aug.shift, aug.shift, image.shape[-1]).astype(np.float32)
    image = (image * gain + offset) * (image != 0).any(axis=-1, keepdims=True)
    return {"image": image, "label": np.ascontiguousarray(label, np.int32)}

  ds = grain.MapDataset.source(source).seed(seed).shuffle().repeat(None).map(pipeline.as_example)
  return iter(ds.random_map(sample).batch(cfg.batch_size, drop_remainder=True))


@pytest.mark.parametrize("changes", [
    dict(),
    dict(mode="2d", patch_shape=(16, 16)),
    dict(patch_shape=(30, 8, 12), fg_fraction=0.7),  # padded along x
])
def test_image_label_stream_is_unchanged_by_provenance(changes):
  cases, cfg = _cases(), _cfg(**changes)
  new = _take(pipeline.train_iterator(cases, cfg, seed=5, shard_index=0, shard_count=1), 6)
  old = _take(_reference_stream(cases, cfg, seed=5), 6)
  assert _same(new, old)


def test_image_label_stream_checksum_is_pinned():
  # sha256 of 7 batches' image and label bytes, computed with the pipeline before index/origin were added. A
  # mismatch means the stream for a seed changed: from this file, or from a numpy / grain upgrade.
  import hashlib
  digest = hashlib.sha256()
  for b in _take(pipeline.train_iterator(_cases(), _cfg(batch_size=4), seed=5, shard_index=1, shard_count=2), 7):
    digest.update(b["image"].tobytes())
    digest.update(b["label"].tobytes())
  assert digest.hexdigest()[:16] == "1e8fa1d3a0c46fd0"


# ---------------------------------------------------------------------------------------------------------------
# Two streams zipped behind one iterator state.


def _pair_dataset():
  cases = _cases()
  a = pipeline.train_dataset(cases[:3], _cfg(), seed=0, shard_index=0, shard_count=1)
  b = pipeline.train_dataset(cases[3:], _cfg(mode="2d", patch_shape=(16, 16)), seed=1, shard_index=0,
                             shard_count=1)
  return pipeline.zip_datasets({"a": a, "b": b})


def _same_pairs(x, y):
  return all(_same([p["a"]], [q["a"]]) and _same([p["b"]], [q["b"]]) for p, q in zip(x, y))


def test_zip_datasets_steps_both_streams_and_resumes_from_one_state():
  it = iter(_pair_dataset())
  first = _take(it, 3)
  assert first[0]["a"]["image"].shape == (2, 8, 8, 8, 4) and first[0]["b"]["image"].shape == (2, 16, 16, 4)
  assert set(np.concatenate([p["a"]["index"] for p in first]).tolist()) <= {0, 1, 2}
  state = json.loads(json.dumps(it.get_state()))
  expected = _take(it, 3)
  assert not _same_pairs(first, expected)
  fresh = iter(_pair_dataset())
  fresh.set_state(state)
  assert _same_pairs(_take(fresh, 3), expected)
  # Each stream is the one it would be alone.
  alone = _take(pipeline.train_iterator(_cases()[3:], _cfg(mode="2d", patch_shape=(16, 16)), seed=1,
                                        shard_index=0, shard_count=1), 6)
  assert _same([p["b"] for p in first + expected], alone)


def test_zip_datasets_state_through_grain_checkpoint_handler(tmp_path):
  import grain
  import orbax.checkpoint as ocp
  it = iter(_pair_dataset())
  _take(it, 3)
  with ocp.Checkpointer(grain.checkpoint.CheckpointHandler()) as checkpointer:
    checkpointer.save(tmp_path / "data", args=grain.checkpoint.CheckpointSave(it))
    expected = _take(it, 3)
    fresh = iter(_pair_dataset())
    checkpointer.restore(tmp_path / "data", args=grain.checkpoint.CheckpointRestore(fresh))
  assert _same_pairs(_take(fresh, 3), expected)


def test_zip_datasets_of_finite_map_datasets():
  import grain
  numbers = grain.MapDataset.range(4)
  pairs = list(pipeline.zip_datasets({"x": numbers, "y": numbers.map(lambda i: 10 * i)}))
  assert pairs == [{"x": i, "y": 10 * i} for i in range(4)]
  with pytest.raises(ValueError, match="shorter"):  # unequal lengths are an error, not a silent truncation
    list(pipeline.zip_datasets({"x": numbers, "y": grain.MapDataset.range(3)}))
  with pytest.raises(ValueError, match="at least one"):
    pipeline.zip_datasets({})


# ---------------------------------------------------------------------------------------------------------------
# Process layout: the global batch does not depend on the process count.


@pytest.mark.parametrize("mode, patch", [("3d", (8, 8, 8)), ("2d", (16, 16))])
def test_global_batch_is_the_same_for_every_process_count(mode, patch):
  cases = _cases(n=5)  # 5 records, batch 4: global batches straddle epochs
  cfg = _cfg(mode=mode, patch_shape=patch, batch_size=4)
  whole = _take(pipeline.train_iterator(cases, cfg, seed=2, process_index=0, process_count=1), 5)
  # One process is the stream every caller had before the process layout (shard 0 of 1), bit for bit.
  assert _same(whole, _take(pipeline.train_iterator(cases, cfg, seed=2, shard_index=0, shard_count=1), 5))
  for count in (2, 4):
    its = [pipeline.train_iterator(cases, cfg, seed=2, process_index=p, process_count=count) for p in range(count)]
    for step, batch in enumerate(whole):
      rows = [next(it) for it in its]
      for key in batch:  # process p holds rows [p*4/count, (p+1)*4/count)
        np.testing.assert_array_equal(np.concatenate([r[key] for r in rows]), batch[key], err_msg=f"{key} {step}")
    # The state counts global batches: the same on every process, and it resumes on another process count.
    states = [json.loads(json.dumps(it.get_state())) for it in its]
    assert all(s == states[0] for s in states)
    fresh = pipeline.train_iterator(cases, cfg, seed=2, process_index=0, process_count=1)
    fresh.set_state(states[0])
    expected = next(its[0])
    np.testing.assert_array_equal(next(fresh)["image"][:4 // count], expected["image"])


def test_process_layout_errors_name_the_argument():
  with pytest.raises(DataError, match="process_index 2 not in"):
    pipeline.train_iterator(_cases(), _cfg(batch_size=4), seed=0, process_index=2, process_count=2)
  with pytest.raises(DataError, match="multiple of the process count 4"):
    pipeline.train_iterator(_cases(), _cfg(batch_size=2), seed=0, process_index=0, process_count=4)
  with pytest.raises(DataError, match="either shard_index/shard_count"):
    pipeline.train_iterator(_cases(), _cfg(batch_size=4), seed=0, shard_count=2, process_count=2)
