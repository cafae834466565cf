"""studies.common: cached stages and the study workdir."""
import json
import os

import ml_collections
import pytest

from mri_poison.studies import common
from mri_poison.train import workdir as workdir_lib


def test_cached_stage_reuses_until_its_inputs_or_files_change(tmp_path):
  path = str(tmp_path / "stages" / "example.json")
  calls = []

  def compute():
    calls.append(1)
    return {"figure": "fig.png", "values": (1, 2)}

  first = common.cached_stage(path, {"eps": 0.1}, compute)
  assert first == {"figure": "fig.png", "values": [1, 2]}  # the JSON form, fresh or reused
  assert common.cached_stage(path, {"eps": 0.1}, compute) == first and len(calls) == 1
  common.cached_stage(path, {"eps": 0.2}, compute)
  assert len(calls) == 2
  exists = lambda r: os.path.exists(tmp_path / r["figure"])
  common.cached_stage(path, {"eps": 0.2}, compute, valid=exists)  # the figure is missing: recompute
  assert len(calls) == 3
  (tmp_path / "fig.png").write_bytes(b"")
  common.cached_stage(path, {"eps": 0.2}, compute, valid=exists)
  assert len(calls) == 3


def _config(lr=1e-3, eps=(0.1,)):
  return ml_collections.ConfigDict({"train": {"lr": lr, "steps": 10}, "attack": {"eps": eps}})


def test_study_workdir_checks_before_writing(tmp_path):
  workdir = str(tmp_path / "study")
  with common.study_workdir(workdir, _config(), resumable_keys=("attack.",)) as (path, digest):
    assert path == workdir and os.path.exists(os.path.join(workdir, ".lock"))
  assert not os.path.exists(os.path.join(workdir, ".lock"))
  saved = json.load(open(os.path.join(workdir, "config.json")))
  assert saved["hash"] == digest and saved["config"]["train"]["lr"] == 1e-3
  assert json.load(open(os.path.join(workdir, "manifest.json")))["runs"][-1]["status"] == "finished"

  # A resumable key may change (config.json records the new value) ...
  with common.study_workdir(workdir, _config(eps=(0.1, 0.2)), resumable_keys=("attack.",)):
    pass
  assert json.load(open(os.path.join(workdir, "config.json")))["config"]["attack"]["eps"] == [0.1, 0.2]
  # ... any other is refused before anything is written, naming the key.
  files = {f: open(os.path.join(workdir, f), "rb").read() for f in ("config.json", "manifest.json")}
  with pytest.raises(workdir_lib.WorkdirError, match="train.lr"):
    with common.study_workdir(workdir, _config(lr=1e-2), resumable_keys=("attack.",)):
      pass
  assert files == {f: open(os.path.join(workdir, f), "rb").read() for f in files}

  with pytest.raises(RuntimeError):
    with common.study_workdir(workdir, _config(eps=(0.1, 0.2)), resumable_keys=("attack.",)):
      raise RuntimeError("boom")
  assert json.load(open(os.path.join(workdir, "manifest.json")))["runs"][-1]["status"] == "failed"


def test_unusable_workdir_is_named(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("")
  with pytest.raises(workdir_lib.WorkdirError, match="file"):
    common.check_workdir(str(blocker / "study"), _config(), resumable_keys=())
