"""The main job: the whole pipeline at `test` size, reuse, force and failed stages, and the notebook tour."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from experiments.configs.reproduce import get_config
from mri_poison.data.case import DataError
from mri_poison.studies import reproduce
from mri_poison.studies.reproduce import report as report_lib

_NUMBER = re.compile(r"[-+]?\d+(\.\d+)?")


@pytest.fixture
def finished(main_job_at_test_size):
  return main_job_at_test_size  # tests/conftest.py: one run for this module and the studies 2 and 3 tests


def _tables(text):
  """Markdown tables as lists of body rows (cells), header and separator removed."""
  tables, current = [], []
  for line in text.splitlines() + [""]:
    if line.startswith("|"):
      current.append([c.strip() for c in line.strip().strip("|").split("|")])
    elif current:
      tables.append(current[2:])
      current = []
  return tables


def test_pipeline_writes_every_study_with_numbers_and_figures(finished):
  workdir, records, text = finished
  assert set(records) == set(reproduce.STAGES) and all(r["status"] == "finished" for r in records.values())
  headings = [line for line in text.splitlines() if line.startswith("## ")]
  for expected in ("## Overview", "## Data", "## Study 1", "## Study 2", "## Study 3", "## Study 4",
                   "## Run manifest"):
    assert any(h.startswith(expected) for h in headings), (expected, headings)
  # The studies' own sections come through with their findings, protocols and the paper's numbers.
  assert text.count("### Findings and caveats") == 4 and text.count("### Protocol") == 4
  tables = _tables(text)
  assert len(tables) >= 12
  for rows in tables:
    assert rows and any(_NUMBER.search(c) for row in rows for c in row), rows
  images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
  assert {p.split("/")[0] for p in images} == set(reproduce.STAGES)
  for path in images:
    assert os.path.getsize(os.path.join(workdir, path)) > 1000, path
  assert "git revision" in text and "jax" in text


def test_second_run_reuses_every_stage(finished):
  workdir, records, text = finished
  again = reproduce.run(get_config("test"), workdir)
  assert all(r["reused"] for r in again.values())
  assert {n: r["ended"] for n, r in again.items()} == {n: r["ended"] for n, r in records.items()}
  with open(os.path.join(workdir, "report.md")) as f:
    assert f.read().count("| reused |") == 2 * len(reproduce.STAGES)  # overview and time tables


def test_every_report_renders_again_from_the_files_alone(finished, tmp_path):
  """experiments.render on a main-job workdir writes each study's report.md, then the combined one, again from
  the result files: the same text, with no model, cell table, protected data or volume in reach."""
  workdir, _, _ = finished
  copy = str(tmp_path / "main")
  shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("models", "cells.csv", "protect*", "volumes"))
  reports = {}
  for top, _, files in os.walk(copy):
    if "report.md" in files:
      path = os.path.join(top, "report.md")
      reports[os.path.relpath(path, copy)] = open(path).read()
      os.remove(path)
  assert len(reports) == 1 + len(reproduce.STAGES), sorted(reports)
  out = subprocess.run([sys.executable, "-m", "experiments.render", "--workdir", copy], capture_output=True,
                       text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), check=True)
  assert "report.md" in out.stdout
  for rel, text in reports.items():
    assert open(os.path.join(copy, rel)).read() == text, rel
  os.remove(os.path.join(copy, reproduce.pipeline.REPORT_INPUTS))
  with pytest.raises(FileNotFoundError, match="report_inputs.json"):
    reproduce.render(copy)
  # A report written again with other words is not a reason to run its stage again: render updates the record.
  full = str(tmp_path / "full")
  shutil.copytree(workdir, full)
  record_path = os.path.join(full, "stages", "deform.json")
  with open(record_path) as f:
    record = json.load(f)
  record["outputs"]["report.md"] = "0" * 64  # as if the report's wording changed since the run
  with open(record_path, "w") as f:
    json.dump(record, f)
  reproduce.render(full)
  assert all(r["reused"] for r in reproduce.run(get_config("test"), full).values())


def _fake_config(stages=("poison", "deform")):
  config = get_config("test")
  config.stages = stages
  return config


def _fake_study(calls, fail=False):
  def study(config, workdir):
    calls.append(workdir)
    if fail:
      raise RuntimeError("the GPU caught fire")
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "report.md"), "w") as f:
      f.write("# A study\n\n## Findings and caveats\n\n- it ran\n\n| x |\n|---|\n| 1.5 |\n")
    os.makedirs(os.path.join(workdir, "results"), exist_ok=True)
    with open(os.path.join(workdir, "results", "cells.csv"), "w") as f:
      f.write("victim,value\nm,1.5\n")
    with open(os.path.join(workdir, "manifest.json"), "w") as f:
      f.write("{}")
    return {"value": 1.5}
  return study


def test_failed_stage_is_reported_and_others_still_run(tmp_path):
  calls = []
  runners = {"poison": _fake_study(calls, fail=True), "deform": _fake_study(calls)}
  with pytest.raises(reproduce.StageFailed, match="poison.*GPU caught fire"):
    reproduce.run(_fake_config(), str(tmp_path), runners=runners)
  assert [os.path.basename(c) for c in calls] == ["poison", "deform"]
  text = open(tmp_path / "report.md").read()
  assert "**Failed stages**" in text and "RuntimeError: the GPU caught fire" in text
  assert "## Study 1: `poison` (failed)" in text and "## A study" in text  # deform's own report is embedded
  # Fixed: the failed stage runs again, the finished one is reused.
  calls.clear()
  records = reproduce.run(_fake_config(), str(tmp_path), runners={"poison": _fake_study(calls),
                                                                   "deform": _fake_study(calls)})
  assert [os.path.basename(c) for c in calls] == ["poison"]
  assert records["deform"]["reused"] and not records["poison"]["reused"]


def test_force_and_changed_sub_config_rerun(tmp_path):
  calls = []
  runners = {"poison": _fake_study(calls), "deform": _fake_study(calls)}
  reproduce.run(_fake_config(), str(tmp_path), runners=runners)
  changed = _fake_config()
  changed.deform.attack.deltas = (0.2,)
  calls.clear()
  reproduce.run(changed, str(tmp_path), runners=runners)
  assert [os.path.basename(c) for c in calls] == ["deform"]
  (tmp_path / "poison" / "stale.txt").write_text("old")
  forced = _fake_config()
  forced.force = True
  calls.clear()
  reproduce.run(forced, str(tmp_path), runners=runners)
  assert [os.path.basename(c) for c in calls] == ["poison", "deform"]
  assert not (tmp_path / "poison" / "stale.txt").exists()


def test_a_finished_stage_whose_files_are_gone_runs_again(tmp_path, capsys):
  calls = []
  runners = {"poison": _fake_study(calls), "deform": _fake_study(calls)}
  reproduce.run(_fake_config(), str(tmp_path), runners=runners)
  os.remove(tmp_path / "poison" / "results" / "cells.csv")
  (tmp_path / "deform" / "results" / "extra.csv").write_text("a new file does not matter")
  with open(tmp_path / "deform" / "manifest.json", "a") as f:  # nor a log that grew (the study run again alone)
    f.write("\n")
  calls.clear()
  records = reproduce.run(_fake_config(), str(tmp_path), runners=runners)
  assert [os.path.basename(c) for c in calls] == ["poison"]
  assert not records["poison"]["reused"] and records["deform"]["reused"]
  assert "poison: 1 of its files are gone or changed since it finished (results/cells.csv)" in capsys.readouterr().out
  (tmp_path / "deform" / "report.md").write_text("truncated")
  calls.clear()
  reproduce.run(_fake_config(), str(tmp_path), runners=runners)
  assert [os.path.basename(c) for c in calls] == ["deform"]
  # Same size, other bytes (an edited number): the recorded digest no longer matches.
  (tmp_path / "deform" / "results" / "cells.csv").write_text("victim,value\nm,9.5\n")
  calls.clear()
  reproduce.run(_fake_config(), str(tmp_path), runners=runners)
  assert [os.path.basename(c) for c in calls] == ["deform"]
  calls.clear()
  reproduce.run(_fake_config(), str(tmp_path), runners=runners)
  assert not calls


def test_a_subset_run_keeps_the_other_finished_stages_in_the_report(tmp_path):
  calls = []
  runners = {"poison": _fake_study(calls), "deform": _fake_study(calls)}
  reproduce.run(_fake_config(), str(tmp_path), runners=runners)
  calls.clear()
  records = reproduce.run(_fake_config(("deform",)), str(tmp_path), runners=runners)
  assert set(records) == {"deform"} and not calls  # deform reused, poison not asked for
  text = open(tmp_path / "report.md").read()
  assert "earlier run (not in config.stages)" in text and "(poison/report.md)" in text


def test_bad_stage_name_is_one_clear_error(tmp_path):
  assert reproduce.pipeline.stage_names(_fake_config(("poison,deform",))) == ("poison", "deform")  # CLI form
  with pytest.raises(ValueError, match="config stages=.*'posion'"):
    reproduce.run(_fake_config(("posion",)), str(tmp_path))
  assert not os.listdir(tmp_path)


def test_brats_without_a_folder_is_one_error_before_any_stage(tmp_path):
  workdir = str(tmp_path / "w")
  with pytest.raises(DataError, match=r"config data_root: stage\(s\) robustify, poison, deform, unlearnable read "
                                      r"a BraTS folder and none was given \(--config.data_root=/path"):
    reproduce.run(get_config("brats"), workdir)
  assert not os.path.exists(workdir)


def test_every_stages_config_and_data_are_checked_before_the_first_stage_runs(tmp_path):
  from mri_poison.data import phantom
  calls, workdir = [], str(tmp_path / "w")
  runners = {"poison": _fake_study(calls), "deform": _fake_study(calls)}
  config = _fake_config()
  config.deform.attack.deltas = (0.2, 1.5)  # the second stage's bad key fails before the first stage starts
  with pytest.raises(ValueError, match=r"^stage deform \(config.deform.\*\): config attack.deltas="):
    reproduce.run(config, workdir, runners=runners)
  phantom.write_brats_dir(str(tmp_path / "brats"), 3, naming="2021", shape=(24, 24, 24), seed=0)
  os.remove(tmp_path / "brats" / "BraTS2021_00002" / "BraTS2021_00002_seg.nii.gz")
  config = _fake_config()
  config.deform.arm2d.data.update(dict(source="brats", root=str(tmp_path / "brats"), n_cases=0, n_val=1))
  with pytest.raises(DataError, match=r"^stage deform .*BraTS2021_00002: no segmentation file"):
    reproduce.run(config, workdir, runners=runners)
  config.deform.arm2d.data.n_cases = 2  # the unlabelled third case is not asked for; 5 cases are too many
  phantom.write_brats_dir(str(tmp_path / "two"), 2, naming="2021", shape=(24, 24, 24), seed=0)
  config.poison.data.update(dict(source="brats", root=str(tmp_path / "two"), n_cases=5, n_val=1))
  with pytest.raises(DataError, match=r"^stage poison .*data.n_cases=5, but the brats source at .* holds 2 cases"):
    reproduce.run(config, workdir, runners=runners)
  assert not calls and not os.path.exists(workdir)


def test_concurrent_stages_run_in_their_own_processes_and_report_each_failure(tmp_path):
  """Two stages at once, each in a worker process: a stage's error comes back in its record and the report."""
  from mri_poison.data import phantom
  config = _fake_config()
  config.concurrent_stages = 2
  for name in config.stages:  # folders that pass the up-front check (cases, labels, count) and fail to load
    root = tmp_path / f"bad_{name}"
    for case_dir in phantom.write_brats_dir(str(root), 2, naming="2021", shape=(24, 24, 24), seed=0):
      t1ce = os.path.join(case_dir, os.path.basename(case_dir) + "_t1ce.nii.gz")
      with open(t1ce, "r+b") as f:
        f.truncate(100)
    config[name].data.update(dict(source="brats", root=str(root), n_cases=0, n_val=1))
  with pytest.raises(reproduce.StageFailed) as failed:
    reproduce.run(config, str(tmp_path / "w"))
  for name in config.stages:
    assert f"bad_{name}" in str(failed.value)
    record = json.load(open(tmp_path / "w" / "stages" / f"{name}.json"))
    assert record["status"] == "failed" and record["error"].startswith("DataError") and record["seconds"] > 0
  report = open(tmp_path / "w" / "report.md").read()
  assert report.count("(failed)") == 2 and "2 stages ran at a time, each in its own process" in report
  config.concurrent_stages = -1
  with pytest.raises(ValueError, match="concurrent_stages=-1"):
    reproduce.run(config, str(tmp_path / "v"))
  assert not os.path.exists(tmp_path / "v")


def test_embed_demotes_headings_and_reroots_relative_links():
  text = "# T\n\n![f](figures/a.png) [r](results/x.csv) [w](https://e.org) [a](#s)\n```\n# code\n```\n"
  out = report_lib.embed(text, "poison")
  assert out.startswith("## T\n")
  assert "(poison/figures/a.png)" in out and "(poison/results/x.csv)" in out
  assert "(https://e.org)" in out and "(#s)" in out and "\n# code\n" in out


def test_notebook_tour_runs_headless(finished, monkeypatch):
  """experiments/notebooks/tour.ipynb executes top to bottom (on the pipeline's workdir: the studies reuse it)."""
  nbclient = pytest.importorskip("nbclient")
  nbformat = pytest.importorskip("nbformat")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  nb = nbformat.read(os.path.join(root, "experiments", "notebooks", "tour.ipynb"), as_version=4)
  monkeypatch.setenv("MRI_POISON_TOUR_WORKDIR", finished[0])
  nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": root}}).execute()
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  assert sum("image/png" in o.get("data", {}) for o in outputs) >= 5  # the phantom + one figure per study
  text = "".join(o.get("text", "") for o in outputs)
  assert re.search(r"PGD eps 0.5: whole-tumour Dice per case \[", text)
