"""What a run leaves in its workdir besides checkpoints: config.json and manifest.json (the lock is
`train.lock`, metrics.jsonl and TensorBoard events `train.metrics_log`).

Only process 0 writes; every file except metrics.jsonl (append-only) is written atomically. A trainer uses
the parts in this order (all on every process; the writes happen on process 0 only):

  with lock.lock(path):                          # a second run on `path` stops here with WorkdirBusy
    lock.check_writable(path + "/checkpoints")     # fails at once instead of hanging in orbax
    digest = workdir.write_config(path, config, has_checkpoints=latest is not None)
    manifest = workdir.start_manifest(path, seed=..., config_digest=digest, start_step=start)
    status = "failed"
    try:
      writer = metrics_log.MetricsWriter(path, resume_step=start)  # drops rows the checkpoint does not cover
      ...; status = "finished"
    finally:
      workdir.end_manifest(path, manifest, end_step=..., status=status)
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from typing import Any, Mapping

import jax
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


def now() -> str:
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
  manifest.setdefault("runs", []).append({"start": now(), "start_step": int(start_step), "end": None,
                                          "end_step": None, "status": "running"})
  if is_writer():
    io_utils.write_json(path, manifest)
  return manifest


def end_manifest(workdir: str, manifest: dict, *, end_step: int, status: str) -> None:
  """Ends the last entry of start_manifest with one of END_STATUSES."""
  status = _STATUS_ALIASES.get(status, status)
  if status not in END_STATUSES:
    raise ValueError(f"end_manifest status {status!r}: expected one of {END_STATUSES}")
  manifest["runs"][-1].update({"end": now(), "end_step": int(end_step), "status": status})
  if is_writer():
    io_utils.write_json(os.path.join(workdir, "manifest.json"), manifest)
