"""What a run leaves in its workdir besides checkpoints: config.json, manifest.json, metrics.jsonl, TB events,
and the `.lock` that keeps a second run out while one is using it.

Only process 0 writes; every file except metrics.jsonl (append-only) is written atomically. A trainer uses
the parts in this order (all on every process; the writes happen on process 0 only):

  with workdir.lock(path):                       # a second run on `path` stops here with WorkdirBusy
    workdir.check_writable(path + "/checkpoints")  # fails at once instead of hanging in orbax
    digest = workdir.write_config(path, config, has_checkpoints=latest is not None)
    manifest = workdir.start_manifest(path, seed=..., config_digest=digest, start_step=start)
    status = "failed"
    try:
      writer = workdir.MetricsWriter(path, resume_step=start)  # drops rows the checkpoint does not cover
      ...; status = "finished"
    finally:
      workdir.end_manifest(path, manifest, end_step=..., status=status)
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from typing import Any, Iterator, Mapping

import jax
import numpy as np
from absl import logging

from mri_poison import io_utils

# Keys that may change between a run and its resumption (logging cadence, other eval). `train.steps` is not
# here: it may change only through `train.schedule_steps`, which keeps the learning-rate schedule continuous
# (see check_config).
RESUMABLE_KEYS = ("train.log_every", "train.ckpt_every", "train.eval_every", "eval.")
# The keys the schedule-horizon rule of check_config governs (they are never compared plainly).
STEPS_KEY, SCHEDULE_STEPS_KEY = "train.steps", "train.schedule_steps"
# Keys added to the configs after workdirs were written, with the value that means what their absence meant:
# an old workdir without the key matches a config that holds this value.
ADDED_KEYS = {"model.name": "unet"}
# end_manifest statuses; a (re)start whose process died without ending its entry is reported as "died".
END_STATUSES = ("finished", "interrupted", "failed", "non-finite")
_STATUS_ALIASES = {"non-finite loss": "non-finite"}  # the name loop.py used before END_STATUSES

LOCK_NAME, METRICS_NAME = ".lock", "metrics.jsonl"


class WorkdirError(ValueError):
  """A workdir that cannot be used as asked (another config, a missing record, an unwritable folder)."""


class WorkdirBusy(RuntimeError):
  """Another live run holds the workdir's lock."""


def is_writer() -> bool:
  return jax.process_index() == 0


# Config fields that choose how a number is computed, never which number (e.g. `model.conv_impl`: the same
# params and outputs within float32 round-off). A run's identity (its hash, the resume check, the reuse of
# stages, models and evaluation cells) leaves them out, so switching one never invalidates a workdir.
IMPLEMENTATION_FIELDS = ("conv_impl",)


def config_dict(config) -> dict:
  """The config as plain JSON types, without IMPLEMENTATION_FIELDS (at any depth)."""
  d = json.loads(json.dumps(config.to_dict() if hasattr(config, "to_dict") else dict(config),
                            default=io_utils._json_default))
  return _without_implementation_fields(d)


def _without_implementation_fields(d):
  if not isinstance(d, dict):
    return d
  return {k: _without_implementation_fields(v) for k, v in d.items() if k not in IMPLEMENTATION_FIELDS}


def config_hash(config) -> str:
  text = json.dumps(config_dict(config), sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def _flatten(d: Mapping, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


# ---------------------------------------------------------------------------------------------------- config


def schedule_horizon(flat: Mapping[str, Any]) -> int | None:
  """The learning-rate schedule's horizon of a flattened config: train.schedule_steps, or train.steps when that
  is 0 or missing; None when the config has no train.steps."""
  if flat.get(STEPS_KEY) is None:
    return None
  return int(flat.get(SCHEDULE_STEPS_KEY) or 0) or int(flat[STEPS_KEY])


def _check_schedule_steps(workdir: str, flat: Mapping[str, Any]) -> None:
  value = flat.get(SCHEDULE_STEPS_KEY)
  if value is None:
    return
  if isinstance(value, bool) or not isinstance(value, int) or value < 0:
    raise WorkdirError(f"workdir {workdir}: config {SCHEDULE_STEPS_KEY}={value!r} must be an integer >= 0 "
                       f"(0 = the schedule ends at {STEPS_KEY})")


def _horizon_error(workdir: str, old: Mapping[str, Any], new: Mapping[str, Any]) -> str | None:
  """Why the resumed config `new` breaks the schedule of `old` (None when the horizon is unchanged)."""
  h_old, h_new = schedule_horizon(old), schedule_horizon(new)
  if h_old == h_new:
    return None
  if h_old is None or h_new is None:
    return (f"workdir {workdir} holds a run whose config {'has' if h_old else 'lacks'} {STEPS_KEY}; "
            "resume it with the same config or use a fresh --workdir")
  steps = int(new[STEPS_KEY])
  final_lr = float(old.get("train.lr") or 0.0) * float(old.get("train.min_lr_ratio") or 0.0)
  after = (f"the learning rate then stays at its final value lr * min_lr_ratio = {final_lr:.3g} past step "
           f"{h_old}")
  if final_lr == 0.0:
    after += " (0 here, so steps past the horizon would not change the weights)"
  return (f"workdir {workdir} holds a run whose learning-rate schedule ends at step {h_old} "
          f"({STEPS_KEY}={old.get(STEPS_KEY)}, {SCHEDULE_STEPS_KEY}={old.get(SCHEDULE_STEPS_KEY) or 0}); the new "
          f"config ({STEPS_KEY}={steps}, {SCHEDULE_STEPS_KEY}={new.get(SCHEDULE_STEPS_KEY) or 0}) would end it at "
          f"step {h_new}, a jump in the learning rate. To change {STEPS_KEY} on resume keep the horizon: "
          f"--config.{SCHEDULE_STEPS_KEY}={h_old} --config.{STEPS_KEY}={steps} ({after}); for a new schedule use "
          "a fresh --workdir")


def read_json(path: str, workdir: str) -> dict:
  """A JSON file of the workdir; an unreadable one is a WorkdirError naming it."""
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise WorkdirError(f"workdir {workdir}: cannot read {path} ({e}); restore it or use a fresh --workdir") from e


def check_config(workdir: str, config, *, resumable_keys=RESUMABLE_KEYS, has_checkpoints: bool = False) -> str:
  """The config's digest, after checking it against workdir/config.json; writes nothing.

  A workdir that already holds a run must have the same config outside `resumable_keys` (a key, or a prefix
  ending in "."). `train.steps` may change only if the schedule's horizon (`train.schedule_steps`, or
  `train.steps` when that is 0 or missing) stays the same: `--config.train.schedule_steps=200
  --config.train.steps=250` extends a 200-step run with the learning rate held at its final value. A workdir
  with checkpoints (`has_checkpoints`) but no config.json is refused: the checkpoints' config is unknown.
  Every refusal is a WorkdirError naming the workdir and the key(s).
  """
  path = os.path.join(workdir, "config.json")
  new = _flatten(config_dict(config))
  _check_schedule_steps(workdir, new)
  if os.path.exists(path):
    old = _flatten(read_json(path, workdir).get("config", {}))
    skip = (STEPS_KEY, SCHEDULE_STEPS_KEY)
    old = {**{k: v for k, v in ADDED_KEYS.items() if k in new}, **old}
    changed = sorted(k for k in set(old) | set(new)
                     if k not in skip and old.get(k) != new.get(k)
                     and not any(k == r or (r.endswith(".") and k.startswith(r)) for r in resumable_keys))
    if changed:
      raise WorkdirError(f"workdir {workdir} holds a run with a different config (keys {changed}); resume it "
                         "with the same config or use a fresh --workdir")
    message = _horizon_error(workdir, old, new)
    if message:
      raise WorkdirError(message)
  elif has_checkpoints:
    raise WorkdirError(
        f"workdir {workdir} has checkpoints but no config.json, so the config they were trained with is unknown "
        "and resuming could silently train on another one. Restore config.json (a copy of the run's config "
        "file {\"config\": ..., \"hash\": ...}) to resume, or use a fresh --workdir.")
  return config_hash(config)


def write_config(workdir: str, config, *, resumable_keys=RESUMABLE_KEYS, has_checkpoints: bool = False) -> str:
  """check_config, then writes config.json {"config", "hash"} (process 0, atomically)."""
  digest = check_config(workdir, config, resumable_keys=resumable_keys, has_checkpoints=has_checkpoints)
  if is_writer():
    io_utils.write_json(os.path.join(workdir, "config.json"), {"config": config_dict(config), "hash": digest})
  return digest


# ------------------------------------------------------------------------------------------ lock, writability


def check_writable(directory: str) -> None:
  """Creates `directory` if needed and proves it writable (a temp file created and removed).

  Raises a WorkdirError naming the folder and the OS error at once, where orbax would hang for minutes.
  Remote paths ("gs://...") go through etils.epath.
  """
  directory = os.fspath(directory)
  try:
    if "://" in directory:
      from etils import epath
      folder = epath.Path(directory)
      folder.mkdir(parents=True, exist_ok=True)
      probe = folder / f".write_probe.{os.getpid()}.{time.time_ns()}"
      probe.write_text("")
      probe.unlink()
      return
    os.makedirs(directory, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=".write_probe.", dir=directory)
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    raise WorkdirError(f"folder {directory} is not writable ({e}); fix its permissions or use another "
                       "--workdir") from e


def _process_start(pid: int) -> str | None:
  """The kernel's start time of `pid` (clock ticks since boot; Linux only): tells a reused pid apart."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _boot_id() -> str | None:
  try:
    with open("/proc/sys/kernel/random/boot_id") as f:
      return f.read().strip()
  except OSError:
    return None


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, owned by another user
    return True
  return True


def _holder_is_dead(info: Mapping[str, Any]) -> bool:
  """True only for a lock of this host whose process is certainly gone (dead, rebooted, or pid reused)."""
  if info.get("host") != platform.node():
    return False
  pid = info.get("pid")
  if not isinstance(pid, int) or pid <= 0:
    return False
  if info.get("boot_id") and _boot_id() and info["boot_id"] != _boot_id():
    return True
  if not _pid_alive(pid):
    return True
  started = _process_start(pid)
  return bool(info.get("pid_start") and started and started != info["pid_start"])


def _read_lock(path: str) -> dict | None:
  """The lock's JSON; None when it is gone. A lock being written (empty for microseconds) is re-read."""
  for _ in range(20):
    try:
      with open(path) as f:
        text = f.read()
    except FileNotFoundError:
      return None
    try:
      return json.loads(text)
    except ValueError:
      time.sleep(0.05)
  return {"unreadable": text[:200]}


_HELD: set[str] = set()  # lock paths this process holds (a nested lock of the same workdir is refused)


def _busy_message(workdir: str, path: str, info: Mapping[str, Any]) -> str:
  if "unreadable" in info:
    return (f"workdir {workdir} is locked by {path}, which is not a readable lock ({info['unreadable']!r}); if "
            f"you are sure no run uses this workdir, delete {path}")
  who = (f"pid {info.get('pid')} on host {info.get('host')} since {info.get('start')} "
         f"(command: {info.get('command')})")
  if info.get("host") == platform.node():
    why = "that process is still running"
  else:
    why = (f"a lock from another host is never broken automatically; if you are sure that run is over, "
           f"delete {path}")
  return f"workdir {workdir} is in use by {who}: {why}. Wait for it to end or use another --workdir."


def _take_stale(path: str, info: Mapping[str, Any]) -> bool:
  """Removes the stale lock `info` at `path` under a short-lived guard; False if another process is at it."""
  guard = path + ".takeover"
  try:
    os.close(os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
  except FileExistsError:
    with contextlib.suppress(OSError):
      if time.time() - os.path.getmtime(guard) > 30:  # left by a process killed during a takeover
        os.remove(guard)
    return False
  try:
    if _read_lock(path) == info:  # still the stale lock we judged, not a fresh one
      os.remove(path)
    return True
  finally:
    os.remove(guard)


@contextlib.contextmanager
def lock(workdir: str, *, command: str | None = None) -> Iterator[dict | None]:
  """Holds `<workdir>/.lock` (created atomically with O_CREAT|O_EXCL) for the block; yields its JSON.

  The lock records {pid, host, start, command}. A second run on the same workdir raises WorkdirBusy naming
  the holder. A lock of this host whose process is gone (killed with -9, machine rebooted) is stale and taken
  over with a warning; a lock from another host is never broken automatically. Released on exit, also on an
  exception. Only process 0 locks (the others yield None).
  """
  if not is_writer():
    yield None
    return
  workdir = os.path.abspath(os.fspath(workdir))
  path = os.path.join(workdir, LOCK_NAME)
  if path in _HELD:
    raise WorkdirBusy(f"workdir {workdir} is already locked by this process (pid {os.getpid()}): a nested run "
                      "on the same workdir; use another --workdir for the inner one")
  check_writable(workdir)
  info = {"pid": os.getpid(), "host": platform.node(), "start": _now(),
          "command": command if command is not None else " ".join(sys.argv),
          "pid_start": _process_start(os.getpid()), "boot_id": _boot_id(), "token": os.urandom(8).hex()}
  text = json.dumps(info, indent=2) + "\n"
  deadline = time.monotonic() + 10.0
  while True:
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      held = _read_lock(path)
      if held is None:  # released between our open and our read
        continue
      if "unreadable" in held or not _holder_is_dead(held):
        raise WorkdirBusy(_busy_message(workdir, path, held)) from None
      logging.warning("workdir %s: taking over the stale lock of pid %s on %s (since %s, command: %s): that "
                      "process is no longer running", workdir, held.get("pid"), held.get("host"),
                      held.get("start"), held.get("command"))
      if not _take_stale(path, held):
        if time.monotonic() > deadline:
          raise WorkdirBusy(f"workdir {workdir}: another process keeps taking over the stale lock {path}") from None
        time.sleep(0.1)
      continue
    except OSError as e:
      raise WorkdirError(f"workdir {workdir}: cannot create the lock {path} ({e})") from e
    with os.fdopen(fd, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    break
  _HELD.add(path)
  try:
    yield info
  finally:
    _HELD.discard(path)
    if (_read_lock(path) or {}).get("token") == info["token"]:  # never remove a lock that is not ours
      with contextlib.suppress(FileNotFoundError):
        os.remove(path)
    else:
      logging.warning("workdir %s: the lock %s was replaced or removed by someone else while this run held it",
                      workdir, path)


# ---------------------------------------------------------------------------------------------------- manifest


def _git_revision() -> str | None:
  here = os.path.dirname(os.path.abspath(__file__))
  try:
    out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
    rev = out.stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True, timeout=5)
    return (rev + ("+dirty" if dirty.stdout.strip() else "")) if out.returncode == 0 and rev else None
  except (OSError, subprocess.SubprocessError):
    return None


def _versions() -> dict:
  import importlib.metadata as md
  out = {"python": platform.python_version()}
  for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy", "ml-collections"):
    try:
      out[name] = md.version(name)
    except md.PackageNotFoundError:
      out[name] = None
  return out


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _load_manifest(path: str) -> dict:
  if not os.path.exists(path):
    return {}
  try:
    with open(path) as f:
      return json.load(f)
  except ValueError as e:
    # Not lost: kept beside the new one for whoever wants the old record.
    aside = f"{path}.unreadable-{time.strftime('%Y%m%dT%H%M%S')}"
    os.replace(path, aside)
    logging.warning("%s is not valid JSON (%s); moved it to %s and started a new manifest", path, e, aside)
    return {}


def data_provenance(config) -> dict | None:
  """What a run's data is, for manifest.json: source, and for the phantom its version and generator options;
  for a folder its root and spacing. The case ids of every split and the files' hashes go to data.json."""
  data = config.get("data") if hasattr(config, "get") else None
  if data is None or "source" not in data:
    return None
  out = {"source": str(data.source)}
  if out["source"] == "brats":
    out.update(root=os.path.abspath(str(data.get("root") or "")), spacing=list(data.get("spacing", ())),
               splits="data.json")
  if out["source"] == "tfds":
    out.update(tfds_name=str(data.get("tfds_name")), splits="data.json")
  if out["source"] in ("phantom", "tfds"):
    out["phantom_version"] = str(data.get("phantom_version", "v1"))
    if out["phantom_version"] != "v1" and data.get("phantom") is not None:
      out["phantom"] = data.phantom.to_dict() if hasattr(data.phantom, "to_dict") else dict(data.phantom)
  return out


def start_manifest(workdir: str, *, seed: int, config_digest: str, start_step: int, data: dict | None = None) -> dict:
  """manifest.json: versions, devices, seed, git revision, the data (`data_provenance`) and one entry per
  (re)start of the run.

  Call it while holding lock(workdir): an earlier entry still "running" then belongs to a process that died
  without ending it (kill -9, power loss); it is rewritten as "died", with a warning.
  """
  path = os.path.join(workdir, "manifest.json")
  manifest = _load_manifest(path)
  for run in manifest.get("runs", []):
    if run.get("status") == "running":
      logging.warning("workdir %s: the run started %s at step %s never ended (killed?); marking it \"died\"",
                      workdir, run.get("start"), run.get("start_step"))
      run["status"] = "died"
  devices = jax.devices()
  manifest.update({
      "versions": _versions(), "git_revision": _git_revision(), "seed": int(seed), "config_hash": config_digest,
      "devices": {"platform": devices[0].platform, "kind": devices[0].device_kind, "count": len(devices),
                  "process_count": jax.process_count(), "host": platform.node()},
      "command": " ".join(sys.argv)})
  if data is not None:
    manifest["data"] = data
  manifest.setdefault("runs", []).append({"start": _now(), "start_step": int(start_step), "end": None,
                                          "end_step": None, "status": "running"})
  if is_writer():
    io_utils.write_json(path, manifest)
  return manifest


def end_manifest(workdir: str, manifest: dict, *, end_step: int, status: str) -> None:
  """Ends the last entry of start_manifest with one of END_STATUSES."""
  status = _STATUS_ALIASES.get(status, status)
  if status not in END_STATUSES:
    raise ValueError(f"end_manifest status {status!r}: expected one of {END_STATUSES}")
  manifest["runs"][-1].update({"end": _now(), "end_step": int(end_step), "status": status})
  if is_writer():
    io_utils.write_json(os.path.join(workdir, "manifest.json"), manifest)


# ----------------------------------------------------------------------------------------------------- metrics


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
