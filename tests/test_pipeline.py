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
