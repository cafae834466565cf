"""The workdir record: config checks on resume, the exclusive lock, writability, manifest and metrics repair."""
import json
import os
import platform
import subprocess
import sys
import time

import ml_collections
import numpy as np
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


def test_lock_is_exclusive_and_released(tmp_path):
  lock_file = tmp_path / ".lock"
  with wd.lock(str(tmp_path), command="train a") as info:
    held = json.load(open(lock_file))
    assert (held["pid"], held["host"], held["command"]) == (os.getpid(), platform.node(), "train a")
    assert held["start"] == info["start"]
    with pytest.raises(wd.WorkdirBusy, match=f"pid {os.getpid()}"):  # nested in this process
      with wd.lock(str(tmp_path)):
        pass
  assert not lock_file.exists()

  # A live process of this host holds it: a second run stops at once, naming the holder.
  sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    lock_file.write_text(json.dumps({"pid": sleeper.pid, "host": platform.node(), "start": "2024-05-01T10:00:00",
                                     "command": "other run"}))
    t0 = time.perf_counter()
    with pytest.raises(wd.WorkdirBusy) as e:
      with wd.lock(str(tmp_path)):
        pass
    assert time.perf_counter() - t0 < 2.0
    assert f"pid {sleeper.pid}" in str(e.value) and "2024-05-01T10:00:00" in str(e.value)
    assert json.load(open(lock_file))["pid"] == sleeper.pid  # left alone
  finally:
    sleeper.kill()
    sleeper.wait()

  # Released after an exception in the block.
  lock_file.unlink()
  with pytest.raises(KeyError):
    with wd.lock(str(tmp_path)):
      raise KeyError("boom")
  assert not lock_file.exists()


def test_stale_lock_is_taken_over_but_not_a_foreign_hosts(tmp_path, caplog):
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()  # reaped: its pid no longer runs
  lock_file = tmp_path / ".lock"
  lock_file.write_text(json.dumps({"pid": dead.pid, "host": platform.node(), "start": "2024-05-01T10:00:00",
                                   "command": "killed run"}))
  with wd.lock(str(tmp_path)):
    assert json.load(open(lock_file))["pid"] == os.getpid()
  assert not lock_file.exists()
  assert any("stale lock" in r.getMessage() and str(dead.pid) in r.getMessage() for r in caplog.records)

  lock_file.write_text(json.dumps({"pid": dead.pid, "host": "elsewhere-node-7", "start": "2024-05-01T10:00:00",
                                   "command": "remote run"}))
  with pytest.raises(wd.WorkdirBusy, match="elsewhere-node-7") as e:
    with wd.lock(str(tmp_path)):
      pass
  assert "never broken automatically" in str(e.value) and str(lock_file) in str(e.value)
  assert json.load(open(lock_file))["host"] == "elsewhere-node-7"


def test_check_writable_fails_at_once(tmp_path):
  wd.check_writable(str(tmp_path / "a" / "checkpoints"))  # created
  assert os.listdir(tmp_path / "a" / "checkpoints") == []  # the probe is removed
  blocker = tmp_path / "file"
  blocker.write_text("x")
  t0 = time.perf_counter()
  with pytest.raises(wd.WorkdirError, match="file/ckpt") as e:  # fails for root too
    wd.check_writable(str(blocker / "ckpt"))
  assert "Not a directory" in str(e.value) or "exists" in str(e.value)
  assert time.perf_counter() - t0 < 1.0


def test_check_writable_read_only_folder(tmp_path):
  ro = tmp_path / "ro"
  ro.mkdir()
  os.chmod(ro, 0o500)
  try:
    if os.access(ro, os.W_OK):
      pytest.skip("running as root: chmod does not stop writes")
    t0 = time.perf_counter()
    with pytest.raises(wd.WorkdirError, match="Permission denied") as e:
      wd.check_writable(str(ro))
    assert str(ro) in str(e.value) and time.perf_counter() - t0 < 1.0
  finally:
    os.chmod(ro, 0o700)


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


def test_metrics_repair_and_resume(tmp_path):
  path = tmp_path / "metrics.jsonl"
  rows = "".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (50, 100, 150))
  path.write_text(rows + '{"step": 151, "loss": 1.0')  # killed mid-line
  writer = wd.MetricsWriter(str(tmp_path), resume_step=100)  # the checkpoint at 100 is what resumes
  writer.write(101, {"loss": np.float32(0.5)})
  writer.close()
  assert [r["step"] for r in wd.read_metrics(tmp_path)] == [50, 100, 101]
  assert path.read_text().splitlines()[-1] == '{"step": 101, "loss": 0.5}'

  # A complete last line that only lacks its newline is kept; without resume_step nothing is dropped.
  path.write_text(rows.rstrip("\n"))
  wd.MetricsWriter(str(tmp_path)).write(160, {"loss": 2.0})
  assert [r["step"] for r in wd.read_metrics(path)] == [50, 100, 150, 160]

  # An old swallowed line (written before the repair existed) is skipped by the reader and dropped on resume.
  path.write_text(rows + '{"step": 151, "loss": 1.0{"step": 151, "loss": 3.0}\n')
  assert [r["step"] for r in wd.read_metrics(path)] == [50, 100, 150]
  wd.MetricsWriter(str(tmp_path), resume_step=150)
  assert path.read_text() == rows


def test_flatten_metrics_and_table(tmp_path):
  row = wd.flatten_metrics({"loss": np.array([0.5, 0.25, 0.125], np.float32), "lr": np.float32(1e-3),
                            "eval": {"dice": 0.75}, "name": "a"})
  assert row == {"loss/0": 0.5, "loss/1": 0.25, "loss/2": 0.125, "lr": pytest.approx(1e-3), "eval/dice": 0.75,
                 "name": "a"}
  assert all(type(v) in (float, str) for v in row.values())
  with pytest.raises(ValueError, match="'x' has shape"):
    wd.flatten_metrics({"x": np.zeros((2, 2))})

  writer = wd.MetricsWriter(str(tmp_path), resume_step=0)
  writer.write(1, {"loss": np.array([1.0, 2.0, 3.0])})
  writer.write(2, {"loss": np.array([0.5, 1.5, 2.5]), "eval/dice": 0.8})
  writer.write(3, {"note": "x"})
  writer.close()
  table = wd.metrics_table(tmp_path)
  assert list(table) == ["step", "loss/0", "loss/1", "loss/2", "eval/dice", "note"]
  assert table["step"].dtype == np.int64 and table["step"].tolist() == [1, 2, 3]
  np.testing.assert_array_equal(table["loss/2"], [3.0, 2.5, np.nan])
  np.testing.assert_array_equal(table["eval/dice"], [np.nan, 0.8, np.nan])
  assert table["note"].tolist() == [None, None, "x"]
  with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
    wd.read_metrics(tmp_path / "missing")


def _tensorboard_scalars(directory):
  """{tag: [(step, value), ...]} from the event files in `directory`, read with tensorboardX's protobufs.

  The files are TFRecords: u64 length, u32 masked CRC of it, the Event proto, u32 masked CRC of it. A
  SessionLog START at step s (tensorboardX's purge_step) drops what earlier files logged at steps >= s, as
  TensorBoard does.
  """
  import struct
  from tensorboardX.proto import event_pb2
  scalars = {}
  for name in sorted(os.listdir(directory)):
    with open(os.path.join(directory, name), "rb") as f:
      data = f.read()
    at = 0
    while at < len(data):
      (length,) = struct.unpack("<Q", data[at:at + 8])
      event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
      at += 12 + length + 4
      if event.HasField("session_log") and event.session_log.status == event.session_log.START:
        scalars = {k: [(s, v) for s, v in pts if s < event.step] for k, pts in scalars.items()}
        scalars = {k: pts for k, pts in scalars.items() if pts}
      for value in event.summary.value:
        scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars


def test_metrics_go_to_tensorboard_events_flushed_with_the_jsonl(tmp_path, monkeypatch):
  writer = wd.MetricsWriter(str(tmp_path), resume_step=0)
  writer.write(1, {"loss": np.float32(0.5), "lr": 1e-3, "note": "text is JSONL only"})
  writer.write(2, {"loss": np.array([0.25, 0.75]), "eval/dice": 0.8})
  # Readable before close: each write is flushed with its JSONL line.
  tb = _tensorboard_scalars(tmp_path / "tensorboard")
  assert tb == {"loss": [(1, 0.5)], "lr": [(1, pytest.approx(1e-3))], "loss/0": [(2, 0.25)],
                "loss/1": [(2, 0.75)], "eval/dice": [(2, pytest.approx(0.8))]}
  writer.close()
  # A resume from the checkpoint at step 1 rewrites step 2: JSONL and TensorBoard both hold it once.
  writer = wd.MetricsWriter(str(tmp_path), resume_step=1)
  writer.write(2, {"loss": np.array([0.5, 0.5])})
  writer.close()
  tb = _tensorboard_scalars(tmp_path / "tensorboard")
  assert tb["loss/0"] == [(2, 0.5)] and tb["loss"] == [(1, 0.5)] and "eval/dice" not in tb
  assert [r["step"] for r in wd.read_metrics(tmp_path)] == [1, 2]
  # Any process but 0 writes nothing at all.
  monkeypatch.setattr(wd, "is_writer", lambda: False)
  other = tmp_path / "other"
  other.mkdir()
  writer = wd.MetricsWriter(str(other), resume_step=0)
  writer.write(1, {"loss": 1.0})
  writer.close()
  assert os.listdir(other) == []


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
