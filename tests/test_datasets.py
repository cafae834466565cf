"""load_splits: deterministic splits of preprocessed cases from the phantom and a BraTS folder; config errors;
what preprocessing did to each scan; a study on a 1 mm BraTS folder (every case resampled, a crop refused)."""
import hashlib
import json
import os

import nibabel as nib
import numpy as np
import pytest

from mri_poison.data import datasets, phantom
from mri_poison.data.case import DataError


FITS = (12.5, 12.5, 12.5)  # resamples the 24^3 test folders' brains into the 16^3 grid (8.3 mm voxels)


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
  cfg = _cfg(source="brats", root=str(tmp_path), spacing=FITS, n_cases=0, n_val=1, modalities=("t1ce", "flair"))
  splits = datasets.load_splits(cfg)
  cases = splits["train"] + splits["val"]
  assert len(splits["train"]) == 2 and len(splits["val"]) == 1
  assert all(c.modalities == ("t1ce", "flair") and c.image.shape == (16, 16, 16, 2) for c in cases)
  assert all(set(np.unique(c.label)) <= {0, 1, 2, 3} for c in cases)  # BraTS 2021 label 4 -> 3
  assert any((c.label == 3).any() for c in cases)


def test_asking_for_more_cases_than_the_folder_holds_is_an_error_unless_allowed(tmp_path, caplog):
  phantom.write_brats_dir(str(tmp_path), 3, naming="2021", shape=(24, 24, 24), seed=0)
  cfg = _cfg(source="brats", root=str(tmp_path), spacing=FITS, n_cases=5, n_val=1)
  with pytest.raises(DataError, match=r"data.n_cases=5, but the brats source at .* holds 3 cases: 2 would train "
                                      r"and 1 validate instead of 4 and 1.*data.allow_fewer_cases=True"):
    datasets.load_splits(cfg)
  cfg.allow_fewer_cases = True
  splits = datasets.load_splits(cfg)
  assert len(splits["train"]) == 2 and len(splits["val"]) == 1
  assert "holds 3 cases" in caplog.text
  cfg.n_cases = 3  # exactly what is there: no warning needed
  caplog.clear()
  assert len(datasets.load_splits(cfg)["train"]) == 2 and "holds" not in caplog.text


def test_a_crop_that_drops_brain_or_tumour_is_an_error_naming_the_case_and_the_fix(tmp_path, caplog):
  phantom.write_brats_dir(str(tmp_path), 2, naming="2021", shape=(24, 24, 24), seed=0)
  cfg = _cfg(source="brats", root=str(tmp_path), n_cases=0, n_val=1)  # the 24^3 heads cropped to 16^3
  with pytest.raises(DataError, match=r"case BraTS2021_00000: its brain \(24x24x24 voxels of 8.33333x8.33333x8.33333 "
                                      r"mm\) does not fit data.shape=\(16, 16, 16\): the crop drops .* of the brain "
                                      r"voxels \(data.max_cropped_brain=0.02\).*data.spacing=\(12.50"):
    datasets.load_splits(cfg)
  cfg.on_crop_loss = "warn"
  cropped = datasets.load_splits(cfg)["train"][0]
  assert cropped.shape == (16, 16, 16) and "going on" in caplog.text
  cfg.update(dict(spacing=FITS, on_crop_loss="error"))
  resampled = datasets.load_splits(cfg)["train"][0]  # the whole brain and tumour, at 12.5 mm
  assert resampled.shape == (16, 16, 16) and np.allclose(resampled.spacing, 12.5, atol=0.6)
  assert (resampled.label > 0).any()


def test_provenance_names_the_root_the_split_ids_and_each_files_hash(tmp_path):
  phantom.write_brats_dir(str(tmp_path), 3, naming="2021", shape=(24, 24, 24), seed=0)
  cfg = _cfg(source="brats", root=str(tmp_path), spacing=FITS, n_cases=2, n_val=1)
  splits = datasets.load_splits(cfg)
  record = datasets.provenance(cfg, splits)
  assert record["root"] == str(tmp_path) and record["case_ids"] == {k: [c.case_id for c in v] for k, v in splits.items()}
  assert sorted(record["files"]) == ["BraTS2021_00000", "BraTS2021_00001"]  # the third case is not used
  seg = next(f for f in record["files"]["BraTS2021_00001"] if f["path"].endswith("_seg.nii.gz"))
  data = (tmp_path / seg["path"]).read_bytes()
  assert seg["bytes"] == len(data) and seg["sha256"] == hashlib.sha256(data).hexdigest()
  assert len(record["files"]["BraTS2021_00001"]) == 5  # four contrasts and the label
  # What preprocessing did to each scan: 24^3 voxels of 8.33 mm resampled 1.5x coarser into the 16^3 grid.
  done = record["preprocessing"]["BraTS2021_00001"]
  assert done["scan_shape"] == [24, 24, 24] and done["grid"] == [16, 16, 16]
  assert np.allclose(done["scan_spacing_mm"], 25 / 3, atol=1e-3) and np.allclose(done["resample_step"], 1.5, atol=0.1)
  assert done["brain_kept"] == done["tumour_kept"] == 1.0
  scan_seg = nib.load(str(tmp_path / seg["path"]))
  scan_ml = (np.asarray(scan_seg.dataobj) > 0).sum() * np.prod(scan_seg.header.get_zooms()) / 1000
  assert done["tumour_ml_scan"] == pytest.approx(scan_ml, rel=1e-3)
  assert done["tumour_ml_grid"] == pytest.approx(scan_ml, rel=0.35)  # nearest-neighbour labels at 1.5x coarser
  assert datasets.provenance(_cfg(), datasets.load_splits(_cfg()))["case_ids"]["val"]  # phantom: ids, no files


def test_a_case_without_a_label_is_an_error_naming_it(tmp_path):
  phantom.write_brats_dir(str(tmp_path), 2, naming="2021", shape=(24, 24, 24), seed=0)
  os.remove(tmp_path / "BraTS2021_00001" / "BraTS2021_00001_seg.nii.gz")
  with pytest.raises(DataError, match=r"BraTS2021_00001: no segmentation file .* need a label for every case"):
    datasets.load_splits(_cfg(source="brats", root=str(tmp_path), spacing=FITS, n_cases=0, n_val=1))


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


def _brats_folder_at_1mm(root, n_cases: int) -> None:
  """A BraTS 2021 folder of 128^3 cases at 1 mm (phantom heads of 64^3 written at twice the resolution)."""
  from mri_poison.data import phantom
  for case_dir in phantom.write_brats_dir(str(root), n_cases, naming="2021", shape=(64, 64, 64), seed=0):
    for name in os.listdir(case_dir):
      path = os.path.join(case_dir, name)
      scan = np.asarray(nib.load(path).dataobj)
      affine = np.eye(4)
      affine[:3, 3] = -64.0
      nib.save(nib.Nifti1Image(scan.repeat(2, 0).repeat(2, 1).repeat(2, 2), affine), path)


def test_runlocal_on_a_1mm_brats_folder_resamples_every_case_and_refuses_a_crop(tmp_path):
  _brats_folder_at_1mm(tmp_path / "brats", 3)
  from experiments.configs import robustify as robustify_config
  from mri_poison.studies import robustify
  config = robustify_config.get_config("runlocal")
  config.data.update(dict(source="brats", root=str(tmp_path / "brats"), n_cases=0, n_val=1,
                          shape=(16, 16, 16), patch_shape=(16, 16, 16)))  # runlocal's sizes for the tests' 16^3
  config.model.features = (4, 8)
  config.train.update(dict(steps=2, ckpt_every=2, log_every=1))
  config.distill.steps = config.adversarial.train_steps = 1
  config.attack.update(dict(attacks=("fgsm",), eps=(0.1,), batch=1))
  # At the scans' own 1 mm the ~110 mm brains would be cut to 16 mm: one line naming the case and the key.
  refused = (r"^case BraTS2021_00000: its brain \(\d+x\d+x\d+ voxels of 1x1x1 mm\) does not fit "
             r"data.shape=\(16, 16, 16\).*data.spacing=\([78]\.\d\d, .*or coarser")
  with pytest.raises(DataError, match=refused) as error:
    robustify.run(config, str(tmp_path / "at_1mm"))
  assert "\n" not in str(error.value) and not os.listdir(tmp_path / "at_1mm")  # nothing written yet

  config.data.spacing = (8.0, 8.0, 8.0)
  workdir = tmp_path / "at_8mm"
  robustify.run(config, str(workdir))
  with open(workdir / "data.json") as f:
    data = json.load(f)["data"]
  assert data["root"] == str(tmp_path / "brats") and sorted(data["preprocessing"]) == sorted(data["files"])
  for case_id, done in data["preprocessing"].items():
    assert done["scan_shape"] == [128, 128, 128] and done["scan_spacing_mm"] == [1.0, 1.0, 1.0], case_id
    assert np.allclose(done["resample_step"], 8.0, atol=0.5) and done["grid"] == [16, 16, 16]
    # The pad to the grid drops nothing; the tumour's volume changes only by resampling's rounding.
    assert done["brain_kept"] == done["tumour_kept"] == 1.0
    assert done["tumour_ml_grid"] == pytest.approx(done["tumour_ml_scan"], rel=0.15), case_id
  assert f"from `{tmp_path / 'brats'}`, brains resampled to 8x8x8 mm" in (workdir / "report.md").read_text()
