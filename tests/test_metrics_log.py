"""metrics.jsonl and TensorBoard events: repair on resume, flattening, the table reader, events flushed with the
JSONL."""
import json
import os

import numpy as np
import pytest

from mri_poison.train import metrics_log


def test_metrics_repair_and_resume(tmp_path):
  path = tmp_path / "metrics.jsonl"
  rows = "".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (50, 100, 150))
  path.write_text(rows + '{"step": 151, "loss": 1.0')  # killed mid-line
  writer = metrics_log.MetricsWriter(str(tmp_path), resume_step=100)  # the checkpoint at 100 is what resumes
  writer.write(101, {"loss": np.float32(0.5)})
  writer.close()
  assert [r["step"] for r in metrics_log.read_metrics(tmp_path)] == [50, 100, 101]
  assert path.read_text().splitlines()[-1] == '{"step": 101, "loss": 0.5}'

  # A complete last line that only lacks its newline is kept; without resume_step nothing is dropped.
  path.write_text(rows.rstrip("\n"))
  metrics_log.MetricsWriter(str(tmp_path)).write(160, {"loss": 2.0})
  assert [r["step"] for r in metrics_log.read_metrics(path)] == [50, 100, 150, 160]

  # An old swallowed line (written before the repair existed) is skipped by the reader and dropped on resume.
  path.write_text(rows + '{"step": 151, "loss": 1.0{"step": 151, "loss": 3.0}\n')
  assert [r["step"] for r in metrics_log.read_metrics(path)] == [50, 100, 150]
  metrics_log.MetricsWriter(str(tmp_path), resume_step=150)
  assert path.read_text() == rows


def test_flatten_metrics_and_table(tmp_path):
  row = metrics_log.flatten_metrics({"loss": np.array([0.5, 0.25, 0.125], np.float32), "lr": np.float32(1e-3),
                            "eval": {"dice": 0.75}, "name": "a"})
  assert row == {"loss/0": 0.5, "loss/1": 0.25, "loss/2": 0.125, "lr": pytest.approx(1e-3), "eval/dice": 0.75,
                 "name": "a"}
  assert all(type(v) in (float, str) for v in row.values())
  with pytest.raises(ValueError, match="'x' has shape"):
    metrics_log.flatten_metrics({"x": np.zeros((2, 2))})

  writer = metrics_log.MetricsWriter(str(tmp_path), resume_step=0)
  writer.write(1, {"loss": np.array([1.0, 2.0, 3.0])})
  writer.write(2, {"loss": np.array([0.5, 1.5, 2.5]), "eval/dice": 0.8})
  writer.write(3, {"note": "x"})
  writer.close()
  table = metrics_log.metrics_table(tmp_path)
  assert list(table) == ["step", "loss/0", "loss/1", "loss/2", "eval/dice", "note"]
  assert table["step"].dtype == np.int64 and table["step"].tolist() == [1, 2, 3]
  np.testing.assert_array_equal(table["loss/2"], [3.0, 2.5, np.nan])
  np.testing.assert_array_equal(table["eval/dice"], [np.nan, 0.8, np.nan])
  assert table["note"].tolist() == [None, None, "x"]
  with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
    metrics_log.read_metrics(tmp_path / "missing")


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
  writer = metrics_log.MetricsWriter(str(tmp_path), resume_step=0)
  writer.write(1, {"loss": np.float32(0.5), "lr": 1e-3, "note": "text is JSONL only"})
  writer.write(2, {"loss": np.array([0.25, 0.75]), "eval/dice": 0.8})
  # Readable before close: each write is flushed with its JSONL line.
  tb = _tensorboard_scalars(tmp_path / "tensorboard")
  assert tb == {"loss": [(1, 0.5)], "lr": [(1, pytest.approx(1e-3))], "loss/0": [(2, 0.25)],
                "loss/1": [(2, 0.75)], "eval/dice": [(2, pytest.approx(0.8))]}
  writer.close()
  # A resume from the checkpoint at step 1 rewrites step 2: JSONL and TensorBoard both hold it once.
  writer = metrics_log.MetricsWriter(str(tmp_path), resume_step=1)
  writer.write(2, {"loss": np.array([0.5, 0.5])})
  writer.close()
  tb = _tensorboard_scalars(tmp_path / "tensorboard")
  assert tb["loss/0"] == [(2, 0.5)] and tb["loss"] == [(1, 0.5)] and "eval/dice" not in tb
  assert [r["step"] for r in metrics_log.read_metrics(tmp_path)] == [1, 2]
  # Any process but 0 writes nothing at all.
  monkeypatch.setattr(metrics_log, "is_writer", lambda: False)
  other = tmp_path / "other"
  other.mkdir()
  writer = metrics_log.MetricsWriter(str(other), resume_step=0)
  writer.write(1, {"loss": 1.0})
  writer.close()
  assert os.listdir(other) == []
