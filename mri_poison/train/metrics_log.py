"""metrics.jsonl (append-only, repaired on resume to the rows the checkpoint covers) and TensorBoard event files:
the per-step metrics a run leaves in its workdir, and readers for them."""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Mapping

import jax
import numpy as np
from absl import logging

from mri_poison import io_utils
from mri_poison.train.workdir import is_writer

METRICS_NAME = "metrics.jsonl"



def _to_json_value(v):
  if isinstance(v, (np.ndarray, np.generic, jax.Array)):
    return np.asarray(v).item()
  return v


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict:
  """One flat row of JSON scalars: an array of length M under "name" becomes "name/0" .. "name/{M-1}" (one
  value per stacked model); a nested mapping becomes "name/key"; scalars (also 0-d arrays) stay as they are.
  """
  out = {}
  for k, v in metrics.items():
    name = f"{prefix}{k}"
    if isinstance(v, Mapping):
      out.update(flatten_metrics(v, f"{name}/"))
    elif isinstance(v, (np.ndarray, np.generic, jax.Array, list, tuple)) and np.ndim(v) > 0:
      if np.ndim(v) > 1:
        raise ValueError(f"metric {name!r} has shape {np.shape(v)}: expected a scalar or one value per model")
      out.update({f"{name}/{i}": _to_json_value(x) for i, x in enumerate(np.asarray(v))})
    else:
      out[name] = _to_json_value(v)
  return out


def _parse_lines(text: str, path: str) -> tuple[list[dict], int]:
  rows, bad = [], 0
  for line in text.splitlines():
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except ValueError:
      bad += 1
      continue
    if isinstance(row, dict):
      rows.append(row)
    else:
      bad += 1
  if bad:
    logging.warning("%s: skipped %d unreadable line(s)", path, bad)
  return rows, bad


def _repair_metrics(path: str, resume_step: int | None) -> None:
  """Makes metrics.jsonl one clean run: a partial last line gets its newline (when it parses) or is dropped;
  rows past `resume_step` (written after the checkpoint being resumed) are dropped. Atomic rewrite."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    text = f.read()
  fixed = text
  if text and not text.endswith("\n"):
    head, _, last = text.rpartition("\n")
    try:
      json.loads(last)
      fixed = text + "\n"
    except ValueError:
      logging.warning("%s: dropped a partial last line (a crash mid-write): %r", path, last[:200])
      fixed = head + "\n" if head else ""
  if resume_step is not None:
    rows, bad = _parse_lines(fixed, path)
    keep = [r for r in rows if not isinstance(r.get("step"), (int, float)) or r["step"] <= resume_step]
    if len(keep) < len(rows) or bad:
      logging.info("%s: dropped %d row(s) past the resumed step %d", path, len(rows) - len(keep), resume_step)
      fixed = "".join(json.dumps(r) + "\n" for r in keep)
  if fixed != text:
    io_utils.write_text(path, fixed)


class MetricsWriter:
  """metrics.jsonl lines {"step", ...} and the same scalars as TensorBoard events in <workdir>/tensorboard/.

  Only process 0 writes (the others' calls do nothing). Events go through tensorboardX (no TensorFlow); each
  write is flushed together with its JSONL line, so `tensorboard --logdir runs/` shows what metrics.jsonl
  holds. Without tensorboardX only the JSONL is written (a warning says so once).
  On opening (process 0) the file is repaired so it reads as one clean run: a line cut by a crash is dropped
  (or given its newline if it is complete) and, with `resume_step` (the step of the restored checkpoint, 0 for
  a fresh start), rows past that step are dropped, since the resumed run writes them again (TensorBoard hides
  its own stale events past the resumed step: purge_step).
  """

  def __init__(self, workdir: str, *, resume_step: int | None = None):
    self.path = os.path.join(workdir, METRICS_NAME)
    self.tb_dir = os.path.join(workdir, TENSORBOARD_NAME)
    self._tb = None
    if is_writer():
      _repair_metrics(self.path, None if resume_step is None else int(resume_step))
      self._tb = _tensorboard_writer(self.tb_dir, None if resume_step is None else int(resume_step) + 1)

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    if not is_writer():
      return
    row = {"step": int(step), **flatten_metrics(metrics)}
    io_utils.append_jsonl(self.path, row)
    if self._tb is not None:
      self._tb.add_scalars(step, {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))})
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None


TENSORBOARD_NAME = "tensorboard"
_WARNED_NO_TENSORBOARD = []


class _TensorBoardEvents:
  """A synchronous TensorBoard event file (tensorboardX's record writer and protos; no TensorFlow).

  SummaryWriter queues events for a background thread and its flush() does not wait for the queue; writing
  here, in the caller's thread, makes `flush` mean the events are in the file.
  """

  def __init__(self, directory: str, purge_step: int | None):
    from tensorboardX.event_file_writer import EventsWriter
    os.makedirs(directory, exist_ok=True)
    # A unique suffix: the file name's timestamp has whole seconds, and a resumed run may reopen within one.
    self._writer = EventsWriter(os.path.join(directory, "events"), f".{os.getpid()}.{time.time_ns()}")
    if purge_step is not None:  # TensorBoard then hides older files' events at steps >= purge_step
      from tensorboardX.proto import event_pb2
      self._write(event_pb2.Event(step=int(purge_step),
                                  session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))

  def _write(self, event) -> None:
    event.wall_time = time.time()
    self._writer.write_event(event)

  def add_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    from tensorboardX.proto import event_pb2, summary_pb2
    values = [summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in scalars.items()]
    if values:
      self._write(event_pb2.Event(step=int(step), summary=summary_pb2.Summary(value=values)))

  def flush(self) -> None:
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


def _tensorboard_writer(directory: str, purge_step: int | None) -> _TensorBoardEvents | None:
  try:
    import tensorboardX  # noqa: F401  a dependency; tolerated missing (metrics.jsonl is the record)
  except ImportError:
    if not _WARNED_NO_TENSORBOARD:
      _WARNED_NO_TENSORBOARD.append(True)
      logging.warning("tensorboardX is not installed: metrics go to metrics.jsonl only (pip install tensorboardX)")
    return None
  return _TensorBoardEvents(directory, purge_step)


def _metrics_path(path_or_workdir) -> str:
  path = os.fspath(path_or_workdir)
  is_file = os.path.isfile(path) or (not os.path.isdir(path) and path.endswith(".jsonl"))
  return path if is_file else os.path.join(path, METRICS_NAME)


def read_metrics(path_or_workdir) -> list[dict]:
  """The rows of a metrics.jsonl (or of a workdir's), in order; unreadable lines are skipped with a warning."""
  path = _metrics_path(path_or_workdir)
  if not os.path.exists(path):
    raise FileNotFoundError(f"no metrics file {path}")
  with open(path) as f:
    return _parse_lines(f.read(), path)[0]


def metrics_table(path_or_workdir) -> dict[str, np.ndarray]:
  """read_metrics as columns, one entry per row: float64 with NaN where a row lacks the key ("step" is int64
  when every row has one); a column holding non-numbers is an object array with None for missing."""
  rows = read_metrics(path_or_workdir)
  keys = list(dict.fromkeys(k for r in rows for k in r))
  table = {}
  for k in keys:
    values = [r.get(k) for r in rows]
    present = [v for v in values if v is not None]
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
      column = np.array([math.nan if v is None else v for v in values], np.float64)
      if k == "step" and len(present) == len(values):
        column = column.astype(np.int64)
      table[k] = column
    else:
      table[k] = np.array(values, dtype=object)
  return table
