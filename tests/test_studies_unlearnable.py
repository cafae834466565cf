"""Study 4 end to end on a tiny phantom: protect -> train victims -> clean test; rerun reuses everything."""
import csv
import json
import os

import numpy as np
import pytest

from experiments.configs import unlearnable as config_lib
from mri_poison import io_utils
from mri_poison.data.case import REGIONS
from mri_poison.data.datasets import phantom_cases
from mri_poison.studies import unlearnable
import rerender  # tests/rerender.py, beside this file


def _tiny_config():
  config = config_lib.get_config("runlocal")
  config.data.update(dict(n_cases=5, n_val=2, shape=(16, 16, 6), patch_shape=(16, 16), batch_size=4))
  config.model.features = (4, 8)
  config.surrogate.features = (4, 8)
  config.train.update(dict(steps=6, log_every=6, ckpt_every=6, warmup_steps=1))
  # UMed and min-min are trained in tests/test_poison_unlearnable.py; here the study's plumbing, on random noise.
  config.protect.update(dict(methods=("none", "random"), fractions=(0.5, 1.0), batch=4, partial_method="random"))
  config.counter.update(dict(regimes=("standard", "purify", "transfer"), methods=("random",)))
  config.counter.transfer.features = (6,)
  config.protect.sweep_eps = ()  # the budget sweep's and the seed replicates' plan: tested in test_victim_plan
  config.replicates.methods = ()
  config.eval.update(dict(write_cases=1, slice_batch=4))
  return config


def test_config_variants_resolve():
  for v in config_lib.VARIANTS:
    c = config_lib.get_config(v)
    assert c.protect.eps == pytest.approx(16 / 255 if v == "countered" else 4 / 255)
    assert c.protect.umed.k == 5 and c.protect.umed.width == 7
    assert c.protect.methods[0] == "none" and c.counter.regimes[0] == "standard"
    assert "classpattern" in c.protect.methods and "classpattern" in c.phase_map.methods  # the positive control
    assert c.protect.umed.surrogate_warmup == 0
  assert config_lib.get_config("phantom").data.n_val >= 20
  with pytest.raises(ValueError, match="variant"):
    config_lib.get_config("nope")


def test_victim_plan():
  from mri_poison.studies.unlearnable import study
  config = config_lib.get_config("phantom")
  plan = study._victim_plan(config)
  names = [n for n, *_ in plan]
  assert len(names) == len(set(names))
  # counter-measure regimes only against the clean reference and counter.methods; the sweep at its budgets
  assert {n for n in names if n.endswith("/adversarial")} == {"none/adversarial", "minmin/adversarial",
                                                               "umed/adversarial"}
  sweep = [(n, e) for n, m, r, f, e in plan if "@eps=" in n]
  assert [e for _, e in sweep] == pytest.approx([16 / 255, 64 / 255])
  assert all(n.startswith("classpattern@eps=") for n, _ in sweep)
  assert ("umed@0.5/standard", "umed", "standard", 0.5, 4 / 255) in plan
  # training-seed replicates of the clean reference and of UMed
  assert {n for n in names if "@seed=" in n} == {"none/standard@seed=1", "none/standard@seed=2",
                                                 "umed/standard@seed=1", "umed/standard@seed=2"}
  config.protect.sweep_eps = (4 / 255,)
  with pytest.raises(ValueError, match="sweep_eps"):
    study._check_config(config)


def test_tiny_study_end_to_end(tmp_path):
  config = _tiny_config()
  cases = phantom_cases(5, seed=0, phantom_shape=(24, 24, 24), shape=(16, 16, 6))
  splits = {"train": cases[:3], "val": cases[3:]}
  workdir = str(tmp_path / "study")
  headline = unlearnable.run(config, workdir, splits=splits)
  assert os.path.exists(os.path.join(workdir, "report.md"))
  for f in ("dice_vs_method.png", "example.png", "partial.png"):
    assert os.path.getsize(os.path.join(workdir, "figures", f)) > 1000
  victims = {"none/standard", "random/standard", "none/purify", "random/purify", "random@0.5/standard",
             "none/transfer", "random/transfer"}
  assert set(headline["dice"]) == victims
  # The gate on the clean-trained victim: at most 2 test cases hold a region, below gate.min_cases = 3, so no
  # region counts as learnt and the findings claim nothing.
  held = [int(np.isin(c.label, labels).any()) for labels in ((1, 2, 3), (1, 3), (3,)) for c in splits["val"]]
  assert [(g["region"], g["n_cases"], g["learnt"]) for g in headline["gate"]] == [
      (r, sum(held[2 * i:2 * i + 2]), False) for i, r in enumerate(REGIONS)]
  report = open(os.path.join(workdir, "report.md")).read()
  assert "No region was learnt: no protection effect is claimed" in report and "survives it" not in report
  for d in headline["dice"].values():
    assert 0.0 <= d["ci"][0] <= d["mean"] <= d["ci"][1] <= 1.0
  # the transfer victim is trained and scored as counter.transfer's architecture, not the surrogate's
  from mri_poison.train import loop as train_loop
  apply_fn, params, vcfg = train_loop.load_model(workdir, "none_transfer")
  assert tuple(vcfg.model.features) == (6,) and tuple(config.model.features) != (6,)
  assert apply_fn(params, np.zeros((1, 16, 16, 4), np.float32)).shape == (1, 16, 16, 4)
  assert headline["psnr_db"]["none"] == 200.0  # identical images (capped)
  with open(os.path.join(workdir, "results", "quality.csv")) as f:
    quality = {r["method"]: r for r in csv.DictReader(f)}
  # random sign noise at 4/255 on every brain voxel: PSNR about -20 log10(4/255) diluted by the background
  assert 36.0 < headline["psnr_db"]["random"] < 45.0
  assert float(quality["random"]["linf_scaled_mean"]) == pytest.approx(4 / 255, rel=1e-4)
  assert 0.0 < float(quality["random"]["share_roi_mean"]) < 1.0  # on the whole brain, not only the ROI
  with open(os.path.join(workdir, "results", "comparisons.csv")) as f:
    primary = [r for r in csv.DictReader(f) if r["family"] == "primary"]
  assert len(primary) == 1 and all(float(r["p_holm"]) >= float(r["p_value"]) for r in primary)
  assert os.path.isdir(os.path.join(workdir, "protected", "random", cases[0].case_id))
  # the whole protected split also as TFDS, read back through load_splits (same voxels as the NIfTI copy)
  from mri_poison.data import datasets
  from mri_poison.data.loaders import load_case
  cfg = datasets.default_data_config()
  cfg.update(dict(source="tfds", tfds_name="brats_protected/random", data_dir=os.path.join(workdir, "protected_tfds"),
                  n_cases=0, n_val=0, shape=(16, 16, 6)))
  via_tfds = {c.case_id: c for c in datasets.load_splits(cfg)["train"]}
  assert sorted(via_tfds) == sorted(c.case_id for c in cases[:3])
  nifti = load_case(os.path.join(workdir, "protected", "random", cases[0].case_id))
  np.testing.assert_allclose(via_tfds[cases[0].case_id].image, nifti.image, atol=1e-6)
  shortcut = {r["victim"]: r for r in io_utils.read_csv(os.path.join(workdir, "results", "shortcut.csv"))}
  assert set(shortcut) == {"none/standard", "random/standard"} and shortcut["random/standard"]["train_clean_dice"] >= 0
  text = open(os.path.join(workdir, "report.md")).read()
  assert "Findings and caveats" in text and "50.03" in text and "exploratory" in text
  # A rerun reuses every model and cell (the table is unchanged, nothing is retrained).
  before = open(os.path.join(workdir, "results", "cells.csv")).read()
  again = unlearnable.run(config, workdir, splits=splits)
  assert open(os.path.join(workdir, "results", "cells.csv")).read() == before
  assert again["dice"] == headline["dice"]
  # report.md again from the result files alone: no model, protected data, protection run or cell table in reach.
  copy = str(tmp_path / "rendered")
  rerender.check(unlearnable.render, workdir, copy, missing="quality.csv",
                 leave_out=lambda d, names: [n for n in names if n == "cells.csv" or (
                     d == workdir and (n in ("models", "protect") or n.startswith("protected")))])
  assert not os.path.exists(os.path.join(copy, "models")) and os.path.exists(os.path.join(copy, "results", "victims.csv"))
  # A changed protection budget is refused before anything is written.
  config.protect.eps = 8 / 255
  with pytest.raises(Exception, match="protect.eps"):
    unlearnable.run(config, workdir, splits=splits)


def test_phase_map_on_a_2x2_grid(tmp_path):
  from mri_poison.studies.unlearnable import phase_map
  config = _tiny_config()
  config.train.update(dict(steps=4, log_every=4, ckpt_every=4))
  config.phase_map.update(dict(axis="data.phantom.tumour_contrast", levels=(0.3, 1.0), eps=(8 / 255, 64 / 255),
                               methods=("random", "classpattern")))
  out = phase_map.run(config, str(tmp_path))
  assert len(out["points"]) == 8
  for p in out["points"]:
    assert p["n_test"] == 2 and p["drop_low"] <= p["drop"] <= p["drop_high"]
    assert np.isfinite([p["drop"], p["psnr"], p["clean_dice"]]).all() and p["hallmark"] is None
  by = {(p["value"], p["eps"], p["method"]): p for p in out["points"]}
  # a larger budget is a louder perturbation
  assert by[(1.0, 64 / 255, "random")]["psnr"] < by[(1.0, 8 / 255, "random")]["psnr"] - 10
  # the clean victim differs between data points (the axis really changed the data)
  assert by[(0.3, 8 / 255, "random")]["clean_dice"] != by[(1.0, 8 / 255, "random")]["clean_dice"]
  assert set(out["boundary"]) == {"classpattern", "random"}
  # 2 test cases < gate.min_cases: no region counts as learnt, so the drops are over all three and no point
  # enters the boundary.
  assert all(p["learnt_regions"] == [] for p in out["points"])
  assert all(e is None for per in out["boundary"].values() for e in per.values())
  assert os.path.exists(tmp_path / "figures" / "phase_map.png") and os.path.exists(tmp_path / "results" / "phase_map.json")
  # report.md's section reads the same from results/phase_map.json (whose keys are sorted) as from the run
  from mri_poison.studies.unlearnable import report
  with open(tmp_path / "results" / "phase_map.json") as f:
    assert report.phase_map_section(json.load(f)) == report.phase_map_section(out)
  assert "- `random`: no point" in report.phase_map_section(out)[-2]
  with pytest.raises(ValueError, match="phase_map.axis"):
    config.phase_map.axis = "data.phantom.tumor_contrast"
    phase_map.run(config, str(tmp_path / "bad"))


def test_umed_findings_say_no_result_when_umed_did_not_converge():
  """The findings judge UMed only when its surrogate fitted (hallmark <= protect.hallmark_max): the verdict rows
  (analysis.claim_rows) say so, and the report words them."""
  from mri_poison.studies.unlearnable import analysis, report
  config = config_lib.get_config("runlocal")
  vrows = [{"victim": "none/standard", "dice_mean_mean": 0.50}, {"victim": "umed/standard", "dice_mean_mean": 0.47}]
  qrows = [{"method": "umed", "psnr_mean": 49.1, "psnr_sd": 2.4, "contrast_alignment": 0.1}]
  comp = [{"family": "primary", "a": "none/standard", "b": "umed/standard", "mean_diff": 0.03, "ci_low": -0.01,
           "ci_high": 0.08, "p_holm": 0.59, "p_value": 0.3, "n_effective": 20},
          {"family": "seed-averaged", "comparison": "clean-trained minus umed-trained", "a": "none/standard x2 seeds",
           "b": "umed/standard x2 seeds", "mean_diff": 0.03, "ci_low": 0.003, "ci_high": 0.058, "p_value": 0.019}]
  gate = [{"region": r, "learnt": True, "reason": ""} for r in ("WT", "TC", "ET")]

  def lines(hallmark):
    info = {"umed": {"surrogate_ce_protected": hallmark, "surrogate_ce_clean": 1.0, "hallmark": hallmark}}
    headline = {"n_test": 20, "learnt_regions": ["WT", "TC", "ET"], "gate": gate, "protection_info": info}
    res = dict(victims=vrows, quality=qrows, comparisons=comp, shortcut=[], sweep=[])
    res["claims"] = analysis.claim_rows(config, res, headline)
    return res["claims"], report.findings(config, res, headline)

  (unfit_claims, unfit), (fit_claims, fit) = lines(1.0), lines(0.1)
  verdict = lambda claims, claim: next(r["verdict"] for r in claims if r["subject"] == "umed" and r["claim"] == claim)
  assert verdict(unfit_claims, "the protection converged") == "no"
  assert verdict(fit_claims, "the protection converged") == "yes"
  target = "UMed makes the data unlearnable (the paper's claim)"
  assert verdict(unfit_claims, target) == "no result" and verdict(fit_claims, target) == "not met"
  assert verdict(fit_claims, "protected-data victim differs from the clean-trained one") == "no clear difference"
  assert "NO RESULT" in unfit[0] and "hallmark 1.00" in unfit[0]
  assert "NOT MET" in fit[0] and "NO RESULT" not in fit[0]
  # The seed-averaged comparison is flagged the same way.
  seed_line = lambda out: next(x for x in out if x.startswith("Seed-averaged"))
  assert "did not converge" in seed_line(unfit) and "did not converge" not in seed_line(fit)
