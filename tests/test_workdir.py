"""The workdir record: config checks on resume (keys added later included) and the manifest."""
import json

import ml_collections
import pytest

from mri_poison.train import workdir as wd


def make_config(steps=200, schedule_steps=None, lr=1e-3):
  config = ml_collections.ConfigDict()
  config.model = ml_collections.ConfigDict(dict(features=8))
  config.train = ml_collections.ConfigDict(dict(steps=steps, lr=lr, warmup_steps=10, min_lr_ratio=0.01,
                                                log_every=10, ckpt_every=50))
  if schedule_steps is not None:
    config.train.schedule_steps = schedule_steps
  return config



def test_conv_impl_is_not_part_of_a_runs_identity(tmp_path):
  """Switching how convolutions are computed (same params and outputs) keeps the workdir, hash and all."""
  config = make_config()
  config.model.conv_impl = "folded"
  digest = wd.write_config(str(tmp_path), config)
  other = make_config()
  other.model.conv_impl = "xla"
  assert wd.check_config(str(tmp_path), other, has_checkpoints=True) == digest == wd.config_hash(make_config())
  assert "conv_impl" not in json.load(open(tmp_path / "config.json"))["config"]["model"]

def test_a_key_added_later_matches_old_workdirs_only_at_its_old_meaning(tmp_path):
  """model.name came after workdirs were written without it: "unet" (what its absence meant) resumes them."""
  wd.write_config(str(tmp_path), make_config())
  named = make_config()
  named.model.name = "unet"
  wd.check_config(str(tmp_path), named, has_checkpoints=True)
  named.model.name = "resenc_unet"
  with pytest.raises(wd.WorkdirError, match=r"model\.name"):
    wd.check_config(str(tmp_path), named, has_checkpoints=True)


def test_resume_config_rules(tmp_path):
  path = str(tmp_path)
  digest = wd.write_config(path, make_config())
  assert json.load(open(tmp_path / "config.json"))["hash"] == digest == wd.config_hash(make_config())
  # Same config, or only logging cadence changed: accepted; a hyper-parameter change names the key.
  cadence = make_config()
  cadence.train.log_every = 5
  wd.check_config(path, cadence, has_checkpoints=True)
  other = make_config(lr=0.5)
  with pytest.raises(wd.WorkdirError, match=r"train\.lr") as e:
    wd.check_config(path, other, has_checkpoints=True)
  assert path in str(e.value) and isinstance(e.value, ValueError)

  # A plain steps change would move the schedule's end: refused, with the extension spelled out.
  with pytest.raises(wd.WorkdirError) as e:
    wd.check_config(path, make_config(steps=250), has_checkpoints=True)
  message = str(e.value)
  assert path in message and "train.steps" in message
  assert "--config.train.schedule_steps=200 --config.train.steps=250" in message
  assert "1e-05" in message  # the final learning rate held past step 200: lr * min_lr_ratio

  # The explicit extension keeps the horizon at 200: accepted, recorded, and extended again later.
  wd.write_config(path, make_config(steps=250, schedule_steps=200), has_checkpoints=True)
  assert json.load(open(tmp_path / "config.json"))["config"]["train"]["schedule_steps"] == 200
  wd.check_config(path, make_config(steps=300, schedule_steps=200), has_checkpoints=True)
  with pytest.raises(wd.WorkdirError, match="schedule_steps=200 --config.train.steps=300"):
    wd.check_config(path, make_config(steps=300), has_checkpoints=True)  # dropping schedule_steps moves it
  with pytest.raises(wd.WorkdirError, match="train.schedule_steps"):
    wd.check_config(str(tmp_path / "fresh"), make_config(schedule_steps=-1))


def test_missing_config_with_checkpoints_is_refused(tmp_path):
  with pytest.raises(wd.WorkdirError, match="no config.json") as e:
    wd.write_config(str(tmp_path), make_config(), has_checkpoints=True)
  assert str(tmp_path) in str(e.value) and "Restore config.json" in str(e.value)
  assert not (tmp_path / "config.json").exists()  # the record is not overwritten with a guess
  wd.write_config(str(tmp_path), make_config(), has_checkpoints=False)  # a fresh run starts normally
  (tmp_path / "config.json").write_text('{"config": {"train": ')  # a corrupt record names the file
  with pytest.raises(wd.WorkdirError, match="config.json"):
    wd.check_config(str(tmp_path), make_config(), has_checkpoints=True)


def test_manifest_marks_a_killed_run_died(tmp_path):
  path = str(tmp_path)
  first = wd.start_manifest(path, seed=0, config_digest="abc", start_step=0)
  assert first["runs"][-1]["status"] == "running"
  # Killed here (no end_manifest); the restart reports that entry as died.
  second = wd.start_manifest(path, seed=0, config_digest="abc", start_step=100)
  wd.end_manifest(path, second, end_step=200, status="finished")
  runs = json.load(open(tmp_path / "manifest.json"))["runs"]
  assert [(r["status"], r["start_step"], r["end_step"]) for r in runs] == [("died", 0, None),
                                                                          ("finished", 100, 200)]
  third = wd.start_manifest(path, seed=0, config_digest="abc", start_step=200)
  wd.end_manifest(path, third, end_step=200, status="non-finite loss")  # the old name maps to the new one
  assert json.load(open(tmp_path / "manifest.json"))["runs"][-1]["status"] == "non-finite"
  with pytest.raises(ValueError, match="end_manifest status 'done'"):
    wd.end_manifest(path, third, end_step=200, status="done")


def test_manifest_records_the_phantom_version_and_options(tmp_path):
  from mri_poison.data.datasets import default_data_config
  config = ml_collections.ConfigDict({"data": default_data_config()})
  config.data.phantom.tumour_contrast = 0.4
  path = str(tmp_path)
  wd.start_manifest(path, seed=0, config_digest="abc", start_step=0, data=wd.data_provenance(config))
  data = json.load(open(tmp_path / "manifest.json"))["data"]
  assert data["source"] == "phantom" and data["phantom_version"] == "v2"
  assert data["phantom"]["tumour_contrast"] == 0.4 and data["phantom"]["anatomy"] == "mni152"
  config.data.phantom_version = "v1"
  assert wd.data_provenance(config) == {"source": "phantom", "phantom_version": "v1"}
  config.data.update(dict(source="brats", root=str(tmp_path / "BraTS2021"), spacing=(1.5, 1.5, 1.5)))
  assert wd.data_provenance(config) == {"source": "brats", "root": str(tmp_path / "BraTS2021"),
                                        "spacing": [1.5, 1.5, 1.5], "splits": "data.json"}
