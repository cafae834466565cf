"""The stages of the main job: run, reuse or record the failure of each study, then the report."""
from __future__ import annotations

import concurrent.futures
import datetime
import importlib
import json
import multiprocessing
import os
import shutil
import time
import traceback
from typing import Callable

from absl import logging
import jax
import ml_collections

from mri_poison import cellstore
from mri_poison import io_utils
from mri_poison.data.case import DataError
from mri_poison.studies import common
from mri_poison.train import workdir as workdir_lib

# Run order; the report lists the studies by their number instead (STUDY_TITLES in report.py).
STAGES = ("robustify", "poison", "deform", "unlearnable")
# Everything may change between runs of one main-job workdir: each study checks its own sub-config against its
# own config.json, and a stage whose sub-config changed is run again.
RESUMABLE_KEYS = ("variant", "seed", "force", "stages", "concurrent_stages", "report.") + tuple(f"{s}." for s in STAGES)
REPORT_INPUTS = os.path.join("stages", "report_inputs.json")  # the stage records the report shows, the run's time


class StageFailed(RuntimeError):
  """Raised by `run` after the report is written when some stage failed (the report says which and why)."""


def stage_runner(name: str, function: str = "run") -> Callable:
  """The study's `run(config, workdir)` (imported lazily: a stage's imports fail inside that stage only), or
  with function="render" its `render(workdir)`."""
  if name not in STAGES:
    raise ValueError(f"unknown stage {name!r}: expected one of {STAGES}")
  return getattr(importlib.import_module(f"mri_poison.studies.{name}"), function)


def stage_names(config) -> tuple[str, ...]:
  """config.stages; "a,b" elements split, so that --config.stages=poison,deform works on the command line."""
  stages = (config.stages,) if isinstance(config.stages, str) else tuple(config.stages)
  return tuple(s.strip() for item in stages for s in str(item).split(",") if s.strip())


def _check_config(config) -> None:
  concurrent_stages(config)  # a bad value fails here, before any folder is written
  stages = stage_names(config)
  unknown = [s for s in stages if s not in STAGES]
  if unknown or not stages or len(set(stages)) != len(stages):
    raise ValueError(f"config stages={stages}: expected a non-empty subset of {STAGES}, each once")
  missing = [s for s in stages if s not in config]
  if missing:
    raise ValueError(f"config has no sub-config for stage(s) {missing} (config.<stage> = that study's config)")
  # A data folder every stage needs and none has: one error before any stage starts, not one per stage.
  rootless = [s for s in stages if str(config[s].data.get("source", "")) == "brats" and not config[s].data.get("root")]
  if rootless:
    key = "data_root" if "data_root" in config else f"{rootless[0]}.data.root"
    raise DataError(f"config {key}: stage(s) {', '.join(rootless)} read a BraTS folder and none was given "
                    f"(--config.{key}=/path/to/BraTS2021)")
  # Every stage's config and data source, before the first stage runs: not a bad key found after an hour.
  for name in stages:
    try:
      importlib.import_module(f"mri_poison.studies.{name}").check(config[name])
    except ValueError as e:  # DataError included: the message gains the stage, so the key reads config.<stage>.*
      raise type(e)(f"stage {name} (config.{name}.*): {e}") from e


def _record_path(workdir: str, name: str) -> str:
  return os.path.join(workdir, "stages", f"{name}.json")


def _read_record(path: str) -> dict | None:
  try:
    with open(path) as f:
      return json.load(f)
  except (FileNotFoundError, json.JSONDecodeError):
    return None


def _is_log(name: str) -> bool:
  # Grows whenever the study is run again on its folder (a new manifest entry, more metrics): only its
  # presence is checked.
  return name == "manifest.json" or name.endswith(".jsonl") or name.startswith("events.out.tfevents")


def _outputs(stage_dir: str) -> dict[str, str | None]:
  """{path relative to the stage folder: SHA-256 (None for a log)} of every file a finished stage left."""
  out = {}
  for top, _, files in os.walk(stage_dir):
    for f in files:
      full = os.path.join(top, f)
      out[os.path.relpath(full, stage_dir)] = None if _is_log(f) else io_utils.file_sha256(full)
  return out


def _changed_outputs(record: dict, stage_dir: str) -> list[str]:
  """Files the finished stage wrote that are gone or whose bytes changed since (a deleted model, an edited CSV)."""
  expected = record.get("outputs") or {"report.md": None}  # records written before outputs were kept
  changed = []
  for path in sorted(expected):
    full, recorded = os.path.join(stage_dir, path), expected[path]
    if not os.path.isfile(full):
      changed.append(path)
    elif isinstance(recorded, int):  # records of 2026-12-07 kept sizes, not digests
      changed += [path] if os.path.getsize(full) != recorded else []
    elif recorded is not None and io_utils.file_sha256(full) != recorded:
      changed.append(path)
  return changed


def _error_text(e: BaseException) -> str:
  return f"{type(e).__name__}: {str(e).strip() or repr(e)}"


def _run_stage(name: str, sub_config, workdir: str, *, force: bool, index: int, total: int,
               runner: Callable | None = None) -> dict:
  stage_dir = os.path.join(workdir, name)
  digest = cellstore.digest(workdir_lib.config_dict(sub_config))
  path = _record_path(workdir, name)
  record = _read_record(path)
  tag = f"[{index}/{total}] {name}"
  finished = record is not None and record.get("status") == "finished" and record.get("config_digest") == digest
  gone = _changed_outputs(record, stage_dir) if finished and not force else []  # hashes every output once
  if finished and not force and not gone:
    logging.info("%s: reused (finished %s, config unchanged)", tag, record["ended"])
    print(f"{tag}: reused (finished earlier in {record['seconds']:.0f} s)", flush=True)
    return dict(record, reused=True)
  if gone:
    print(f"{tag}: {len(gone)} of its files are gone or changed since it finished ({', '.join(gone[:3])}"
          f"{', ...' if len(gone) > 3 else ''}): running it again (it reuses what is still there)", flush=True)
  if force and os.path.isdir(stage_dir):
    shutil.rmtree(stage_dir)
  print(f"{tag}: start", flush=True)
  started, t0 = _now(), time.time()
  record = {"stage": name, "config_digest": digest, "started": started, "workdir": name}
  io_utils.write_json(path, dict(record, status="running"))
  try:
    headline = (runner or stage_runner(name))(sub_config, stage_dir)
    record.update(status="finished", headline=headline, outputs=_outputs(stage_dir))
  except KeyboardInterrupt:
    io_utils.write_json(path, dict(record, status="interrupted", ended=_now(), seconds=time.time() - t0))
    raise
  except Exception as e:  # pylint: disable=broad-except  (one failed study must not stop the others)
    logging.exception("%s failed", tag)
    record.update(status="failed", error=_error_text(e),
                  traceback="".join(traceback.format_exception(e)[-6:]))
  record.update(ended=_now(), seconds=time.time() - t0)
  io_utils.write_json(path, record)
  outcome = "finished" if record["status"] == "finished" else f"FAILED ({record['error']})"
  print(f"{tag}: {outcome} in {record['seconds']:.0f} s", flush=True)
  return dict(record, reused=False)


def _log_settings() -> tuple:
  return logging.get_verbosity(), tuple(logging.get_absl_handler().filters)


def _stage_in_process(name: str, sub_config, workdir: str, log_settings: tuple, **kwargs) -> dict:
  """`_run_stage` in a worker process of its own, logging as the parent does (its verbosity and filters)."""
  verbosity, filters = log_settings
  logging.use_absl_handler()
  handler = logging.get_absl_handler()
  for f in filters:
    if not any(type(g) is type(f) for g in handler.filters):  # a worker runs several stages
      handler.addFilter(f)
  logging.set_verbosity(verbosity)
  return _run_stage(name, sub_config, workdir, **kwargs)


def concurrent_stages(config) -> int:
  """How many stages run at once: config.concurrent_stages, where 0 means 2 on one CPU-only process, else 1.

  Why 2 on CPU: a study spends much of its time in XLA compilation, which runs on one core, so one study at a
  time kept a 2-core machine 145 % busy (the main job of 2026-12-07); two at a time fill both cores. A GPU or a
  multi-process job runs one stage at a time (the stages would share one accelerator; hosts run in lockstep).
  """
  n = int(config.get("concurrent_stages", 1))
  if n < 0:
    raise ValueError(f"config concurrent_stages={n}: expected 0 (auto) or a positive number of stages")
  if n == 0:
    n = 2 if jax.default_backend() == "cpu" and jax.process_count() == 1 else 1
  return n


def _run_stages(config, wd: str, stages, runners, workers: int) -> dict:
  """{stage: record}, the stages run one at a time or, each in a fresh process, `workers` at a time."""
  kwargs = lambda i: dict(force=bool(config.force), index=i, total=len(stages))
  if workers <= 1:
    return {name: _run_stage(name, config[name], wd, runner=(runners or {}).get(name), **kwargs(i))
            for i, name in enumerate(stages, 1)}
  # "spawn": a fresh interpreter per worker (a forked JAX runtime is unsafe). Stages start in run order, so the
  # longest (study 2) starts first and the others share the second worker.
  context = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
    futures = {name: pool.submit(_stage_in_process, name, config[name], wd, _log_settings(), **kwargs(i))
               for i, name in enumerate(stages, 1)}
    return {name: future.result() for name, future in futures.items()}


def _now() -> str:
  return datetime.datetime.now().isoformat(timespec="seconds")


def run(config, workdir: str, *, runners: dict[str, Callable] | None = None) -> dict:
  """Runs every stage of `config.stages` in `workdir`, writes report.md; returns {stage: record}.

  Raises StageFailed (after the report is written) if any stage failed. `runners` replaces a stage's study
  function (tests use it to make a stage fail).
  """
  _check_config(config)
  stages = stage_names(config)
  t0 = time.time()
  with common.study_workdir(workdir, config, resumable_keys=RESUMABLE_KEYS, seed=int(config.seed)) as (wd, _):
    # Test runners replace a study in this process only.
    workers = 1 if runners else min(concurrent_stages(config), len(stages))
    records = _run_stages(config, wd, stages, runners, workers)
    # Stages not asked for this time keep their place in the combined report when they finished earlier here.
    shown = dict(records)
    for name in STAGES:
      earlier = None if name in records else _read_record(_record_path(wd, name))
      if earlier and earlier.get("status") == "finished" and not _changed_outputs(earlier, os.path.join(wd, name)):
        shown[name] = dict(earlier, reused=True, earlier=True)
    # What the report needs beyond the stages' folders, kept so that `render` writes the same report again.
    inputs_path = os.path.join(wd, REPORT_INPUTS)
    io_utils.write_json(inputs_path, {"records": shown, "wall_seconds": time.time() - t0, "concurrent": workers})
    _write_report(config, wd, workdir_lib.read_json(inputs_path, wd))
  failed = [n for n, r in records.items() if r["status"] != "finished"]
  if failed:
    raise StageFailed(f"stage(s) {', '.join(failed)} failed: " + "; ".join(records[n]["error"] for n in failed)
                      + f" (details in {os.path.join(wd, 'report.md')})")
  return records


def render(workdir: str) -> str:
  """report.md of a finished main-job workdir written again from files alone: each finished stage's own report
  first (its study's `render`), then the combined one. Nothing is trained or computed. Returns its path."""
  workdir = os.path.abspath(os.fspath(workdir))
  needed = [os.path.join(workdir, f) for f in ("config.json", REPORT_INPUTS)]
  missing = [p for p in needed if not os.path.isfile(p)]
  if missing:
    raise FileNotFoundError(f"{workdir} is not a finished main-job workdir: missing {missing}")
  config = ml_collections.ConfigDict(workdir_lib.read_json(needed[0], workdir)["config"])
  inputs = workdir_lib.read_json(needed[1], workdir)
  for name, record in inputs["records"].items():
    if record["status"] == "finished":
      report_path = stage_runner(name, "render")(os.path.join(workdir, name))
      # The stage's record keeps the digest of every output; its report was written again on purpose, so that a
      # later run reuses the stage instead of running it again for a changed report.md.
      stage = _read_record(_record_path(workdir, name))
      if stage and "report.md" in (stage.get("outputs") or {}):
        stage["outputs"]["report.md"] = io_utils.file_sha256(report_path)
        io_utils.write_json(_record_path(workdir, name), stage)
  return _write_report(config, workdir, inputs)


def _write_report(config, workdir: str, inputs: dict) -> str:
  from mri_poison.studies.reproduce import report  # pylint: disable=import-outside-toplevel
  return report.write_report(config, workdir, inputs["records"], wall_seconds=inputs["wall_seconds"],
                             concurrent=inputs["concurrent"])
