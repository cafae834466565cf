"""Study 1 end to end on a tiny config; the vmapped sweep equals the models trained one by one."""
import csv
import os
import shutil
import sys

import numpy as np
import pytest

from experiments.configs.poison import get_config
from mri_poison import io_utils
from mri_poison.data.datasets import load_splits
from mri_poison.studies import poison
from mri_poison.studies.poison import evaluation, training
from mri_poison.poison import mixing
from mri_poison.train import state as state_lib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_poison_translation import tiny_gan  # pylint: disable=g-import-not-at-top,wrong-import-position
import rerender  # pylint: disable=g-import-not-at-top,wrong-import-position


def tiny_config():
  config = get_config("runlocal")
  config.data.update(dict(n_cases=12, n_val=6, phantom_shape=(24, 24, 24), shape=(16, 16, 16),
                          patch_shape=(16, 16), batch_size=2, prefetch=1))
  config.gan = tiny_gan()
  config.model.features = (4, 8)
  config.train.update(dict(steps=4, warmup_steps=1, log_every=2, ckpt_every=4))
  config.sweep.update(dict(seeds=(0,), modes=("replace",), stacked="true"))
  config.detect.update(dict(steps=5, batch=8, features=(4,), n_boot=20))
  config.eval.update(dict(n_boot=100, n_figure_cases=1))
  return config


@pytest.fixture(scope="module")
def splits():
  return load_splits(tiny_config().data)


def test_vmapped_sweep_equals_sequential(tmp_path, splits):
  config = tiny_config()
  real = training.target_only(splits["train"], 1, "t1ce")
  fake = [-c.image[..., 0] for c in real]  # any synthetic volume will do: the test is about training
  # All six shares, as the study trains them: the stacked program compiled here serves the end-to-end test too.
  sets = [mixing.mix_cases(real, fake, k, seed=0)[0] for k in range(6)]
  sub = training.segmenter_config(config, 0)
  stacked = training.train_sweep(sub, str(tmp_path / "stacked"), sets, stacked=True)
  sequential = training.train_sweep(sub, str(tmp_path / "seq"), sets, stacked=False)
  apply_fn = state_lib.make_apply_fn(state_lib.make_model(sub.model))
  x = np.stack([c.image[:, :, z] for c in real[:2] for z in (6, 8, 10)])
  outs = [np.asarray(apply_fn(p, x)) for p in stacked]
  for a, p in zip(outs, sequential):
    np.testing.assert_allclose(a, apply_fn(p, x), rtol=1e-3, atol=1e-4)
  assert np.max(np.abs(outs[0] - outs[5])) > 1e-3  # the models differ, so the comparison is not vacuous


def test_study_end_to_end_writes_metrics_per_ratio_and_reuses_on_rerun(tmp_path, splits):
  config = tiny_config()
  workdir = tmp_path / "study"
  headline = poison.run(config, str(workdir), splits=splits)
  with open(workdir / "results" / "poison_sweep.csv") as f:
    rows = list(csv.DictReader(f))
  ks = sorted({int(r["k"]) for r in rows})
  assert ks == [0, 1, 2, 3, 4, 5]
  # Every statistic is over the validation cases that contain ET (the primary metric), all 6 are in per_case.csv.
  with open(workdir / "results" / "per_case.csv") as f:
    per_case = list(csv.DictReader(f))
  with_et = {r["case"] for r in per_case if r["et_present"] == "True"}
  assert len({r["case"] for r in per_case}) == 6 and 0 < len(with_et) < 6
  assert with_et == {c.case_id for c in splits["val"] if (c.label == 3).any()}
  assert headline["n_val"] == len(with_et) and headline["n_val_all"] == 6
  for r in rows:
    assert r["mode"] == "replace" and int(r["n_cases"]) == len(with_et)
    for m in evaluation.METRICS:
      assert 0.0 <= float(r[f"{m}_mean"]) <= 1.0
  shares = {int(r["k"]): float(r["share"]) for r in rows if r["seed"] == "all"}
  np.testing.assert_allclose([shares[k] for k in ks], [k / 6 for k in ks])
  with open(workdir / "results" / "cells.csv") as f:
    cells = list(csv.DictReader(f))
  assert len(cells) == 6 * 6 * len(evaluation.METRICS)  # 6 models x 6 cases x 5 metrics
  assert {c["victim"] for c in cells} == {f"replace/k{k}/seed0" for k in ks}
  assert 0.0 <= headline["detect_auc"]["cnn"]["auc"] <= 1.0
  # The gate: ET judged on the k = 0 models' Dice over those cases (a few toy steps do not learn it).
  gate = headline["gate"]
  assert [g["region"] for g in gate] == ["ET"] and gate[0]["n_cases"] == len(with_et)
  k0 = np.mean([float(r["dice"]) for r in per_case if r["k"] == "0" and r["et_present"] == "True"])
  np.testing.assert_allclose(gate[0]["dice"], k0, atol=1e-9)
  assert headline["et_learnt"] == (k0 >= config.gate.floor and k0 > gate[0]["baseline"])
  report = open(workdir / "report.md").read()
  assert "0.8937" in report and "Findings and caveats" in report and "paper" in report
  # The ET contrast (ET minus the rest of the brain, z) of the real T1-Ce, computed again from the cases: ET is
  # bright on T1-Ce; cases without ET have none (NaN).
  real = {c.case_id: c for c in splits["val"]}
  quality = io_utils.read_csv(workdir / "results" / "gan_quality.csv")
  target = list(config.data.modalities).index(config.gan.target)
  for row in quality:
    c = real[row["case"]]
    et, rest = c.label == 3, (c.image != 0).any(-1) & (c.label == 0)
    if et.any():
      np.testing.assert_allclose(row["et_contrast_real"], c.image[..., target][et].mean()
                                 - c.image[..., target][rest].mean(), rtol=1e-6)
      assert row["et_contrast_real"] > 0
    else:
      assert np.isnan(row["et_contrast_real"]) and np.isnan(row["et_contrast_synthetic"])
  for t in io_utils.read_csv(workdir / "results" / "comparisons.csv"):  # a claim needs the test and the CI
    assert t["claimed"] == (t["p_holm"] < 0.05 and (t["ci_low"] > 0 or t["ci_high"] < 0))
  assert "ET contrast, real t1ce (z)" in report and "enhancing tumour minus the rest of the brain is" in report
  if not headline["et_learnt"]:
    assert "ET not learnt" in report and "No effect is claimed" in report and "monotone" not in report
  for fig in ("dice_vs_share.png", "gan_grid.png"):
    assert os.path.getsize(workdir / "figures" / fig) > 0
  mtime = os.path.getmtime(workdir / "results" / "cells.csv")
  again = poison.run(config, str(workdir), splits=splits)  # everything reused: same numbers, no new cell
  assert again["replace"]["dice"] == headline["replace"]["dice"]
  assert os.path.getmtime(workdir / "results" / "cells.csv") == mtime
  # report.md again from the result files alone: no model, cell table or training in reach (not copied).
  rerender.check(poison.render, str(workdir), str(tmp_path / "copy"),
                 leave_out=shutil.ignore_patterns("models", "cells.csv"), missing="comparisons.csv")


def test_grid_slice_is_never_blank():
  from mri_poison.data.case import Case
  from mri_poison.studies.poison import translator
  image = np.zeros((8, 8, 6, 2), np.float32)
  image[2:6, 2:6, 1:5] = 1.0  # brain on slices 1-4, most of it everywhere there
  label = np.zeros((8, 8, 6), np.int32)
  case = Case(case_id="c", image=image, label=label, affine=np.eye(4), spacing=(1.0, 1.0, 1.0),
              modalities=("ct", "t1ce"))
  assert translator._figure_slice(case) == 1  # no tumour: the first slice with the most brain, not slice 0
  label[3, 3, 3] = 2
  label[3:5, 3:5, 2] = 1
  assert translator._figure_slice(case.replace(label=label)) == 2  # no ET: the most tumour
  label[3, 3, 4] = 3
  assert translator._figure_slice(case.replace(label=label)) == 4  # the most ET


@pytest.mark.parametrize("study", ["poison", "deform", "unlearnable"])
def test_an_unlabelled_training_case_fails_before_the_workdir_is_written(study, tmp_path):
  import importlib
  from mri_poison.data import phantom
  from mri_poison.data.case import DataError
  config = importlib.import_module(f"experiments.configs.{study}").get_config("runlocal")
  phantom.write_brats_dir(str(tmp_path / "brats"), 3, naming="2021", shape=(24, 24, 24), seed=0,
                          modalities=tuple(config.data.modalities))
  os.remove(tmp_path / "brats" / "BraTS2021_00002" / "BraTS2021_00002_seg.nii.gz")
  for data in [config.data] + [config[f"arm{a}"].data for a in config.get("arms", ())]:
    data.update(dict(source="brats", root=str(tmp_path / "brats"), n_cases=0, n_val=1))
  workdir = tmp_path / "wd"
  with pytest.raises(DataError, match="BraTS2021_00002: no segmentation file"):
    importlib.import_module(f"mri_poison.studies.{study}").run(config, str(workdir))
  assert not workdir.exists() or not os.listdir(workdir)
