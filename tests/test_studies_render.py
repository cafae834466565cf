"""Which study wrote a workdir, read from its config.json (experiments.render dispatches on it)."""
import json

import pytest

from experiments.configs import deform, poison, reproduce, robustify, unlearnable
from mri_poison.studies import render
from mri_poison.train import workdir as workdir_lib


def _workdir(tmp_path, name, config):
  path = tmp_path / name
  path.mkdir()
  (path / "config.json").write_text(json.dumps({"config": workdir_lib.config_dict(config)}))
  return str(path)


@pytest.mark.parametrize("module,study", [(reproduce, "reproduce"), (robustify, "robustify"), (poison, "poison"),
                                          (deform, "deform"), (unlearnable, "unlearnable")])
def test_each_study_is_told_apart_by_its_config(tmp_path, module, study):
  assert render.study_of(_workdir(tmp_path, study, module.get_config(None))) == study


def test_a_workdir_without_a_config_or_of_no_study_is_refused(tmp_path):
  with pytest.raises(FileNotFoundError, match="has no config.json"):
    render.render(str(tmp_path))
  with pytest.raises(ValueError, match="cannot tell which study"):
    render.study_of(_workdir(tmp_path, "other", {"seed": 0, "train": {"steps": 1}}))
