"""studies.deform: one tiny end-to-end run (2D arm, the deformation threats and the generator), then a rerun and
its report rendered again from the result files alone."""
import csv
import json
import os
import shutil

import numpy as np
import pytest

from experiments.configs import reproduce as reproduce_config
from mri_poison.studies import deform as study
import rerender  # tests/rerender.py, beside this file


def test_tiny_run_writes_cells_report_and_volumes_then_reuses_them(main_job_at_test_size, tmp_path):
  """The study as the main job's `test` run finished it (tests/conftest.py), then a rerun on a copy."""
  config = reproduce_config.get_config("test").deform
  main_workdir, records, _ = main_job_at_test_size
  headline = records["deform"]["headline"]
  workdir = str(tmp_path / "wd")
  shutil.copytree(os.path.join(main_workdir, "deform"), workdir)
  rows = list(csv.DictReader(open(os.path.join(workdir, "results", "cells.csv"))))
  threats = {(r["victim"], r["threat"]) for r in rows}
  assert {("2d/undefended", t) for t in ("deform", "deform_max", "random", "generator")} <= threats
  by = lambda metric: np.asarray([float(r["value"]) for r in rows if r["metric"] == metric])
  assert np.all(by("max_disp") <= config.deform.max_disp + 1e-4)
  assert np.all(by("bias_max") <= 1 + config.deform.bias_range + 1e-5)
  assert np.all(by("folded") == 0.0)
  assert len(headline["primary"]) == 2 and all(0 <= p["p_holm"] <= 1 for p in headline["primary"])
  report = open(os.path.join(workdir, "report.md")).read()
  assert "Findings and caveats" in report and "exploratory" in report
  # The gate on the clean undefended victim, per region; 4 held-out cases, so at most 4 hold a region.
  gate = headline["gate"]["2d"]
  assert [g["region"] for g in gate] == ["WT", "TC", "ET"] and all(0 <= g["n_cases"] <= 4 for g in gate)
  assert "Victim check" in report
  for g in gate:
    assert g["learnt"] == (g["n_cases"] >= 3 and g["dice"] >= 0.3 and g["dice"] > g["baseline"])
    if not g["learnt"]:
      assert f"{g['region']} ({g['reason']})" in report
  assert os.path.exists(os.path.join(workdir, "figures", "achieved_vs_target_2d.png"))
  assert any(f.endswith("_label.nii.gz") for f in os.listdir(os.path.join(workdir, "volumes")))
  # A rerun computes nothing new and gives the same numbers.
  mtime = os.path.getmtime(os.path.join(workdir, "results", "cells.csv"))
  again = study.run(config, workdir)
  assert os.path.getmtime(os.path.join(workdir, "results", "cells.csv")) == mtime
  assert json.dumps(again["primary"], sort_keys=True) == json.dumps(headline["primary"], sort_keys=True)


def test_report_renders_again_from_the_result_files_alone(main_job_at_test_size, tmp_path):
  """render rebuilds report.md from results/ and config.json alone: the same text, with no model or cell table in
  reach (they are left out of the copy); a missing result file is named."""
  finished, workdir = os.path.join(main_job_at_test_size[0], "deform"), str(tmp_path / "wd")
  rerender.check(study.render, finished, workdir, leave_out=shutil.ignore_patterns("models", "cells.csv"),
                 missing="comparisons.csv")


def test_the_generators_claims_are_rows_with_their_statistic_and_verdict():
  import ml_collections
  from mri_poison.studies.deform import evaluation
  config = ml_collections.ConfigDict({"arms": ("arm2d",)})
  gen = lambda drops: [{"victim": "arm2d/undefended", "threat": "generator", "budget": b, "drop": d}
                       for b, d in zip((0.1, 0.2), drops)]
  versus_random = [{"arm": "arm2d", "primary": True, "comparison": "random - generator (Dice)", "p_holm": 0.01,
                    "ci_low": 0.02}]
  flat = {r["claim"]: r for r in evaluation.claim_rows(config, gen((0.030, 0.040)), versus_random)}
  assert flat["generator follows Delta"]["value"] == pytest.approx(0.010)
  assert flat["generator follows Delta"]["threshold"] == pytest.approx(0.05)
  assert not flat["generator follows Delta"]["verdict"] and flat["generator beats random fields"]["verdict"]
  rising = {r["claim"]: r for r in evaluation.claim_rows(config, gen((0.05, 0.15)), [])}
  assert rising["generator follows Delta"]["verdict"] and not rising["generator beats random fields"]["verdict"]
  assert evaluation.claim_rows(config, gen((0.05,)), versus_random) == []  # one Delta: nothing to claim


def test_generator_extra_cases_only_from_the_phantom_and_its_delta_range_checked():
  from mri_poison.studies.deform import study as study_lib
  from mri_poison.studies.deform import training
  config = reproduce_config.get_config("test").deform
  assert training.extra_generator_cases(config) == 2
  config.data.source = "brats"
  assert training.extra_generator_cases(config) == 0 and training.generator_cases(config, config.data) == []
  config.generator.delta_range = (0.3, 0.1)
  with pytest.raises(ValueError, match=r"generator.delta_range=\(0.3, 0.1\)"):
    study_lib._check_config(config)
