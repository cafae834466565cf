"""What a run leaves in its workdir besides checkpoints: config.json, manifest.json, metrics.jsonl, TB events.

Only process 0 writes; every file except metrics.jsonl (append-only) is written atomically.
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
import numpy as np
from absl import logging

from mri_poison import io_utils

# Keys that may change between a run and its resumption (more steps, other logging cadence, other eval).
RESUMABLE_KEYS = ("train.steps", "train.log_every", "train.ckpt_every", "train.eval_every", "eval.")


def is_writer() -> bool:
  return jax.process_index() == 0


def config_dict(config) -> dict:
  return json.loads(json.dumps(config.to_dict() if hasattr(config, "to_dict") else dict(config),
                               default=io_utils._json_default))


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


def write_config(workdir: str, config) -> str:
  """Writes config.json {"config", "hash"}; a resumed run must match the old one outside RESUMABLE_KEYS."""
  path = os.path.join(workdir, "config.json")
  new = config_dict(config)
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f).get("config", {})
    a, b = _flatten(old), _flatten(new)
    changed = sorted(k for k in set(a) | set(b)
                     if a.get(k) != b.get(k) and not any(k == r or (r.endswith(".") and k.startswith(r))
                                                         for r in RESUMABLE_KEYS))
    if changed:
      raise ValueError(f"workdir {workdir} holds a run with a different config (keys {changed}); resume it with "
                       "the same config or use a fresh --workdir")
  digest = config_hash(config)
  if is_writer():
    io_utils.write_json(path, {"config": new, "hash": digest})
  return digest


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


def start_manifest(workdir: str, *, seed: int, config_digest: str, start_step: int) -> dict:
  """manifest.json: versions, devices, seed, git revision and one entry per (re)start of the run."""
  path = os.path.join(workdir, "manifest.json")
  manifest = {}
  if os.path.exists(path):
    with open(path) as f:
      manifest = json.load(f)
  devices = jax.devices()
  manifest.update({
      "versions": _versions(), "git_revision": _git_revision(), "seed": int(seed), "config_hash": config_digest,
      "devices": {"platform": devices[0].platform, "kind": devices[0].device_kind, "count": len(devices),
                  "process_count": jax.process_count(), "host": platform.node()},
      "command": " ".join(sys.argv)})
  manifest.setdefault("runs", []).append({"start": _now(), "start_step": int(start_step), "end": None,
                                          "end_step": None, "status": "running"})
  if is_writer():
    io_utils.write_json(path, manifest)
  return manifest


def end_manifest(workdir: str, manifest: dict, *, end_step: int, status: str) -> None:
  manifest["runs"][-1].update({"end": _now(), "end_step": int(end_step), "status": status})
  if is_writer():
    io_utils.write_json(os.path.join(workdir, "manifest.json"), manifest)


class MetricsWriter:
  """metrics.jsonl lines {"step", ...}; TensorBoard events too when tensorboardX is importable (no TF needed)."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if is_writer():
      try:
        from tensorboardX import SummaryWriter  # optional; skipped silently when absent
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      except Exception:  # pylint: disable=broad-except
        self._tb = None

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    if not is_writer():
      return
    row = {"step": int(step), **{k: _scalar(v) for k, v in metrics.items()}}
    io_utils.append_jsonl(self.path, row)
    if self._tb is not None:
      for k, v in row.items():
        if k != "step" and isinstance(v, (int, float)):
          self._tb.add_scalar(k, v, int(step))

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def _scalar(v):
  if isinstance(v, (np.ndarray, np.generic, jax.Array)) and np.ndim(v) == 0:
    return np.asarray(v).item()
  return v


class Progress:
  """The progress line: step/total, steps/s since the last report, ETA, and the given metrics."""

  def __init__(self, total_steps: int, start_step: int):
    self.total = int(total_steps)
    self._t, self._step = time.perf_counter(), int(start_step)

  def report(self, step: int, metrics: Mapping[str, float]) -> float:
    now = time.perf_counter()
    rate = (step - self._step) / max(now - self._t, 1e-9)
    self._t, self._step = now, int(step)
    eta = (self.total - step) / rate if rate > 0 else float("inf")
    text = " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float)))
    logging.info("step %d/%d  %.2f steps/s  ETA %s  %s", step, self.total, rate, _hms(eta), text)
    return rate


def _hms(seconds: float) -> str:
  if not np.isfinite(seconds):
    return "?"
  return str(datetime.timedelta(seconds=int(seconds)))
