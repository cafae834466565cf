"""load_splits: deterministic splits of preprocessed cases from the phantom and a BraTS folder; config errors."""
import numpy as np
import pytest

from mri_poison.data import datasets, phantom
from mri_poison.data.case import DataError


def _cfg(**kw):
  cfg = datasets.default_data_config()
  cfg.update(dict(n_cases=5, n_val=2, phantom_shape=(24, 24, 24), shape=(16, 16, 16)))
  cfg.update(kw)
  return cfg


def test_default_config_fields():
  cfg = datasets.default_data_config()
  assert cfg.source == "phantom" and cfg.mode == "3d" and cfg.n_val < cfg.n_cases
  assert len(cfg.shape) == len(cfg.patch_shape) == 3 and cfg.augment.flip and 0 < cfg.fg_fraction < 1


@pytest.fixture(scope="module")
def phantom_splits():
  return datasets.load_splits(_cfg())


def test_phantom_splits_are_disjoint_preprocessed_and_deterministic(phantom_splits):
  splits = phantom_splits
  train, val = [c.case_id for c in splits["train"]], [c.case_id for c in splits["val"]]
  assert len(train) == 3 and len(val) == 2 and not set(train) & set(val)
  assert set(train) | set(val) == {f"phantom-{i}" for i in range(5)}
  for case in splits["train"] + splits["val"]:
    assert case.image.shape == (16, 16, 16, 4) and case.label.shape == (16, 16, 16)
    brain = (case.image != 0).any(-1)
    assert abs(case.image[brain].mean()) < 0.2  # z-scored inside the brain
  again = datasets.load_splits(_cfg())
  assert [c.case_id for c in again["val"]] == val
  np.testing.assert_array_equal(again["train"][0].image, splits["train"][0].image)


def test_split_depends_on_seed():
  vals = {tuple(datasets.split_indices(10, 3, seed)) for seed in range(6)}
  assert len(vals) > 3
  assert datasets.split_indices(10, 3, 4) == datasets.split_indices(10, 3, 4)


def test_case_ids_sort_naturally():
  ids = ["phantom-10", "phantom-2", "phantom-1"]
  assert sorted(ids, key=datasets.case_sort_key) == ["phantom-1", "phantom-2", "phantom-10"]


def test_brats_folder_source_with_a_modality_subset(tmp_path):
  phantom.write_brats_dir(str(tmp_path), 3, naming="2021", shape=(24, 24, 24), seed=0)
  cfg = _cfg(source="brats", root=str(tmp_path), n_cases=0, n_val=1, modalities=("t1ce", "flair"))
  splits = datasets.load_splits(cfg)
  cases = splits["train"] + splits["val"]
  assert len(splits["train"]) == 2 and len(splits["val"]) == 1
  assert all(c.modalities == ("t1ce", "flair") and c.image.shape == (16, 16, 16, 2) for c in cases)
  assert all(set(np.unique(c.label)) <= {0, 1, 2, 3} for c in cases)  # BraTS 2021 label 4 -> 3
  assert any((c.label == 3).any() for c in cases)


@pytest.mark.parametrize("changes, key", [
    (dict(n_val=5), "data_cfg.n_val"),
    (dict(n_val=-1), "data_cfg.n_val"),
    (dict(source="nifti"), "data_cfg.source"),
    (dict(shape=(16, 16)), "data_cfg.shape"),
    (dict(source="brats", root=""), "data_cfg.root"),
    (dict(source="tfds", tfds_name="no_such_dataset_xyz"), "data_cfg.tfds_name"),
])
def test_bad_config_names_the_key(changes, key, tmp_path):
  with pytest.raises(DataError, match=key):
    datasets.load_splits(_cfg(data_dir=str(tmp_path), **changes))
