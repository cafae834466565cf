"""What every study repeats: its workdir, its data record, its up-front checks and cached stages.

Workdir: `study_workdir(workdir, config, resumable_keys=...)` creates the folder, proves it writable, checks the
config against an existing config.json through the train core BEFORE writing anything (`check_workdir`), then
holds the workdir's lock, writes config.json and brackets the run in manifest.json. A study names the config keys that
may change between runs of one workdir: those that only add results (for robustify the attack and evaluation
settings), never those that would change a trained model.

Stages: `cached_stage(path, depends_on, compute)` stores a finished stage's JSON result beside the digest of
what it depends on, and returns the stored result while that digest matches.

Digests, evaluation cells, shares and multi-process batches live in `mri_poison.cellstore`.
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Callable, Iterator, Sequence

from absl import logging
import ml_collections

from mri_poison import cellstore
from mri_poison import io_utils
from mri_poison.progress import Progress  # noqa: F401  (the one progress line of every study)
from mri_poison.train import lock as lock_lib
from mri_poison.train import workdir as workdir_lib

# ------------------------------------------------------------------------------------------------ workdir


def check_workdir(workdir: str, config, *, resumable_keys: Sequence[str]) -> str:
  """The absolute workdir, created and proven writable, whose config.json (if any) matches `config`.

  Writes nothing but the folder: a run with another config outside `resumable_keys` (keys, or prefixes ending
  in ".") raises a WorkdirError naming the changed keys and leaves the workdir as it was.
  """
  workdir = os.path.abspath(os.fspath(workdir))
  lock_lib.check_writable(workdir)
  workdir_lib.check_config(workdir, config, resumable_keys=tuple(resumable_keys))
  return workdir


@contextlib.contextmanager
def study_workdir(workdir: str, config, *, resumable_keys: Sequence[str], seed: int = 0) -> Iterator[tuple[str, str]]:
  """Holds `workdir` for one run of a study; yields (absolute workdir, config digest).

  `check_workdir` first (nothing is written when the config does not match), then the workdir's lock is
  taken (a second run on the same workdir raises WorkdirBusy), config.json written and the run recorded in
  manifest.json with its end status ("finished", "interrupted" or "failed").
  """
  workdir = check_workdir(workdir, config, resumable_keys=resumable_keys)
  with lock_lib.lock(workdir):
    # write_config checks again: another run may have written config.json before we held the lock.
    digest = workdir_lib.write_config(workdir, config, resumable_keys=tuple(resumable_keys))
    manifest = workdir_lib.start_manifest(workdir, seed=int(seed), config_digest=digest, start_step=0,
                                          data=workdir_lib.data_provenance(config))
    status = "failed"
    try:
      yield workdir, digest
      status = "finished"
    except KeyboardInterrupt:
      status = "interrupted"
      raise
    except FloatingPointError:
      status = "non-finite"
      raise
    finally:
      workdir_lib.end_manifest(workdir, manifest, end_step=0, status=status)


def train_and_held_out(data_config, splits: dict | None, what: str = "validation cases") -> tuple[list, list]:
  """(train cases, held-out cases) of `splits` ({"train", "val"}), or of load_splits(data_config) if None.

  Raises one error naming config data.n_val when there is nothing to evaluate on.
  """
  if splits is None:
    from mri_poison.data.datasets import load_splits  # pylint: disable=import-outside-toplevel
    splits = load_splits(data_config)
  train, held_out = list(splits["train"]), list(splits["val"])
  if not held_out:
    raise ValueError(f"config data.n_val: the study needs {what}")
  return train, held_out


def check_study(config, check_config, data_configs) -> None:
  """What a study's `run` checks before it writes anything, reading no image: `check_config(config)`, then each
  data source it reads (`datasets.check_source`: a folder's cases, labels and count). The main job calls every
  stage's `check` before the first stage starts."""
  from mri_poison.data.datasets import check_source  # pylint: disable=import-outside-toplevel
  check_config(config)
  for data_config in data_configs:
    check_source(data_config)


def finished_workdir(workdir: str, study: str, needed: Sequence[str] = (),
                     more: Callable[[Any], Sequence[str]] | None = None) -> tuple[str, ml_collections.ConfigDict]:
  """(absolute path, config) of a finished run's workdir, for `render`: config.json, results/headline.json,
  `needed` and `more(config)` (paths relative to the workdir) must all exist, else one FileNotFoundError names
  every missing file."""
  workdir = os.path.abspath(os.fspath(workdir))
  config_path = os.path.join(workdir, "config.json")
  config = (ml_collections.ConfigDict(workdir_lib.read_json(config_path, workdir)["config"])
            if os.path.isfile(config_path) else None)
  files = ["config.json", os.path.join("results", "headline.json"), *needed]
  files += list(more(config)) if more and config is not None else []
  missing = [os.path.join(workdir, f) for f in dict.fromkeys(files) if not os.path.isfile(os.path.join(workdir, f))]
  if missing:
    raise FileNotFoundError(f"{workdir} is not a finished {study} workdir: missing {missing}")
  return workdir, config


def record_data(workdir: str, data_config, splits: dict, name: str = "data") -> None:
  """`datasets.write_provenance` from the writing process only."""
  from mri_poison.data.datasets import write_provenance  # pylint: disable=import-outside-toplevel
  if workdir_lib.is_writer():
    write_provenance(workdir, data_config, splits, name)


# ------------------------------------------------------------------------------------------------ stages


def cached_stage(path: str, depends_on: Any, compute: Callable[[], Any], *,
                 valid: Callable[[Any], bool] | None = None) -> Any:
  """compute()'s JSON-able result, stored in `path` with the digest of `depends_on`; reused while it matches.

  A stored result is reused only when its digest equals `digest(depends_on)` and `valid(result)` holds (e.g.
  the files it names still exist). The returned value is always the JSON form (tuples become lists), fresh or
  reused, so callers see one type.
  """
  key = cellstore.digest(depends_on)
  if os.path.exists(path):
    try:
      with open(path) as f:
        stored = json.load(f)
    except (OSError, ValueError):
      stored = None  # unreadable: recompute and overwrite
    if isinstance(stored, dict) and stored.get("key") == key and (valid is None or valid(stored.get("result"))):
      logging.info("reusing the finished stage %s", path)
      return stored["result"]
  result = json.loads(json.dumps(compute(), default=io_utils._json_default))  # pylint: disable=protected-access
  if workdir_lib.is_writer():
    io_utils.write_json(path, {"key": key, "depends_on": depends_on, "result": result})
  return result
