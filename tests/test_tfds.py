"""TFDS builders: build into tmp_path and read back by random access, with TensorFlow absent."""
import sys

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from mri_poison.data import datasets, phantom, pipeline
from mri_poison.data.case import DataError
from mri_poison.data.loaders import load_brats_case
from mri_poison.data.preprocess import preprocess_case
from mri_poison.data.tfds import Brats, BratsPhantom, BratsPhantomConfig, brats

tfds.disable_progress_bar()


def test_tensorflow_is_not_installed():
  # "Works without TensorFlow" is only tested if TensorFlow really is absent from the test environment.
  with pytest.raises(ImportError):
    import tensorflow  # noqa: F401


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  builder = tfds.builder("brats_phantom/tiny", data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare()
  return data_dir


def _assert_record_is_case(record, case):
  assert record["case_id"].decode() == case.case_id
  assert record["modalities"].decode() == ",".join(case.modalities)
  np.testing.assert_array_equal(record["image"], case.image)
  np.testing.assert_array_equal(record["label"], case.label)
  np.testing.assert_allclose(record["affine"], case.affine)
  np.testing.assert_allclose(record["spacing"], case.spacing, rtol=1e-6)


def test_brats_phantom_random_access_equals_preprocessed_phantom(tiny_dir):
  source = tfds.data_source("brats_phantom/tiny", data_dir=tiny_dir)["train"]
  assert len(source) == 4
  for index in (2, 0):  # random access, out of order
    record = source[index]
    assert record["image"].shape == (16, 16, 16, 4) and record["image"].dtype == np.float32
    _assert_record_is_case(record, preprocess_case(phantom.make_case(index, shape=(24, 24, 24)), shape=(16, 16, 16)))
  assert "tensorflow" not in sys.modules  # nothing on the build or read path pulled TensorFlow in


def test_load_splits_from_tfds_matches_phantom_source(tiny_dir):
  cfg = datasets.default_data_config()
  cfg.update(dict(n_cases=4, n_val=1, phantom_shape=(24, 24, 24), shape=(16, 16, 16)))
  direct = datasets.load_splits(cfg)
  cfg.update(dict(source="tfds", tfds_name="brats_phantom/tiny", data_dir=tiny_dir))
  via_tfds = datasets.load_splits(cfg)
  for split in ("train", "val"):
    assert [c.case_id for c in via_tfds[split]] == [c.case_id for c in direct[split]]
    for a, b in zip(via_tfds[split], direct[split]):
      np.testing.assert_array_equal(a.image, b.image)
      np.testing.assert_array_equal(a.label, b.label)
  cfg.shape = (8, 8, 8)  # records of a 16^3 grid cut to 8^3 would lose brain: an error, not a silent crop
  with pytest.raises(DataError, match=r"case phantom-\d+: its brain \(16x16x16 voxels.*does not fit data.shape="
                                      r"\(8, 8, 8\).*Use a brats_phantom config whose grid is data.shape"):
    datasets.load_splits(cfg)


def test_pipeline_over_tfds_source_equals_pipeline_over_cases(tiny_dir):
  source = tfds.data_source("brats_phantom/tiny", data_dir=tiny_dir)["train"]
  cases = datasets.phantom_cases(4, seed=0, phantom_shape=(24, 24, 24), shape=(16, 16, 16))
  cfg = ml_collections.ConfigDict(dict(mode="3d", patch_shape=(8, 8, 8), fg_fraction=0.5, batch_size=2,
                                       augment=dict(flip=True, scale=0.1, shift=0.1)))
  a = pipeline.train_iterator(source, cfg, seed=7, shard_index=0, shard_count=1)
  b = pipeline.train_iterator(cases, cfg, seed=7, shard_index=0, shard_count=1)
  for _ in range(5):
    x, y = next(a), next(b)
    assert x["image"].shape == (2, 8, 8, 8, 4)
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])


def test_phantom_slices_config_and_2d_pipeline(tmp_path):
  config = BratsPhantomConfig(name="slices_test", n_cases=2, phantom_shape=(24, 24, 24), grid=(16, 16, 16),
                              kind="slices", tumour_fraction=0.5)
  builder = BratsPhantom(config=config, data_dir=str(tmp_path), file_format="array_record")
  builder.download_and_prepare()
  source = builder.as_data_source()["train"]
  volumes = datasets.phantom_cases(2, seed=0, phantom_shape=(24, 24, 24), shape=(16, 16, 16))
  by_id = {c.case_id: c for c in volumes}
  records = [source[i] for i in range(len(source))]
  for r in records:
    case = by_id[r["case_id"].decode()]
    np.testing.assert_array_equal(r["image"], case.image[:, :, int(r["slice"])])
    np.testing.assert_array_equal(r["label"], case.label[:, :, int(r["slice"])])
  for case in volumes:  # every tumour slice kept, plus as many others (fraction 0.5) as the case has
    has_tumour = case.label.any(axis=(0, 1))
    kept = [r["label"].any() for r in records if r["case_id"].decode() == case.case_id]
    assert sum(kept) == has_tumour.sum()
    assert len(kept) - sum(kept) == min((~has_tumour).sum(), has_tumour.sum())
  cfg = ml_collections.ConfigDict(dict(mode="2d", patch_shape=(16, 16), fg_fraction=0.5, batch_size=2,
                                       augment=dict(flip=True, scale=0.1, shift=0.1)))
  batch = next(pipeline.train_iterator(source, cfg, seed=0, shard_index=0, shard_count=1))
  assert batch["image"].shape == (2, 16, 16, 4) and batch["label"].shape == (2, 16, 16)


def test_slice_indices_hit_the_tumour_fraction():
  label = np.zeros((4, 4, 40), np.int32)
  label[1, 1, 10:16] = 3  # 6 tumour slices, 34 others
  for fraction, n_other in ((0.5, 6), (0.25, 18), (1.0, 0)):
    kept = brats.slice_indices(label, fraction, seed=0)
    assert set(range(10, 16)) <= set(kept) and len(kept) == 6 + n_other
  assert brats.slice_indices(label, 0.25, seed=0) == brats.slice_indices(label, 0.25, seed=0)
  assert brats.slice_indices(np.zeros((4, 4, 5), np.int32), 0.5, seed=0) == [0, 1, 2, 3, 4]


def test_brats_builder_from_a_brats_folder(tmp_path):
  raw = tmp_path / "raw"
  case_dirs = phantom.write_brats_dir(str(raw), 2, naming="2023", shape=(24, 24, 24), seed=5)
  builder = Brats(config="vol32", data_dir=str(tmp_path / "tfds"), file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(raw)))
  source = tfds.data_source("brats/vol32", data_dir=str(tmp_path / "tfds"))["train"]
  assert len(source) == 2
  for index, case_dir in enumerate(sorted(case_dirs)):
    case = datasets.fit_to_grid(load_brats_case(case_dir), (32, 32, 32), {"spacing": (6.0, 6.0, 6.0)})
    _assert_record_is_case(source[index], case)
    assert case.preprocessing["tumour_kept"] == 1.0 and case.preprocessing["brain_kept"] >= 0.98  # data.max_cropped_*
    np.testing.assert_allclose(source[index]["spacing"], 6.0, atol=0.3)  # 8.33 mm scans resampled to ~6 mm
    labels = set(np.unique(source[index]["label"]))
    assert labels <= {0, 1, 2, 3} and {0, 2} <= labels


def test_brats_builder_fails_on_a_case_its_grid_would_crop(tmp_path):
  raw = tmp_path / "raw"
  phantom.write_brats_dir(str(raw), 1, naming="2021", shape=(24, 24, 24), seed=5)
  fine = brats.BratsConfig(name="fine16", grid=(16, 16, 16), spacing=(4.0, 4.0, 4.0))  # ~200 mm head in 64 mm
  builder = Brats(config=fine, data_dir=str(tmp_path / "tfds"), file_format="array_record")
  with pytest.raises(DataError, match=r"brats/fine16 .*case BraTS2021_00000: its brain .* does not fit .*"
                                      r"BratsConfig\(spacing=...\) coarser"):
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(raw)))
