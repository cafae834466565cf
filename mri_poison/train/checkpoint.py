"""Orbax CheckpointManager for the train state plus the data iterator's global position.

A checkpoint step directory holds two items: "state" (the whole train state pytree; StandardSave, through
orbax's multi-host path: every process calls save, orbax coordinates) and "data" (data/global_state.json,
written by process 0: {"iterator": the iterator's get_state(), "process_count": P}). The pipeline's iterator
state counts GLOBAL batches and is the same on every process and for every process count (see
mri_poison.data.pipeline), so a checkpoint written by P processes resumes on any number of them. Checkpoints
written before that (grain's per-process data/process_{i}-of-{n}.json) resume when n == 1 (the 1-process
stream did not change); with n > 1 restore_data says why not and what to do. Old checkpoints are pruned by a preservation
policy (latest N, plus every `keep_every` steps if asked) rather than the deprecated max_to_keep options.
Saves are synchronous by default, so a failed save (a full disk, a vanished folder) fails the run at that save
with the OS error; the train states here are small next to the time between checkpoints.
"""
from __future__ import annotations

import glob
import os
import re
import shutil

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm

DATA_ITEM, DATA_FILE = "data", "global_state.json"
_LEGACY_DATA_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json$")


class DataStateError(RuntimeError):
  """A checkpoint's data-iterator state cannot be restored here."""


def make_manager(directory: str, *, ckpt_every: int, keep: int = 2, keep_every: int = 0,
                 async_save: bool = False) -> ocp.CheckpointManager:
  preserve = [cm.LatestN(n=max(int(keep), 1))]
  if keep_every:
    preserve.append(cm.EveryNSteps(interval_steps=int(keep_every)))
  options = ocp.CheckpointManagerOptions(
      save_decision_policy=cm.FixedIntervalPolicy(max(int(ckpt_every), 1)),
      preservation_policy=preserve[0] if len(preserve) == 1 else cm.AnyPreservationPolicy(preserve),
      enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
  return ocp.CheckpointManager(
      os.path.abspath(directory), options=options,
      item_handlers={"state": ocp.StandardCheckpointHandler(),
                     DATA_ITEM: ocp.JsonCheckpointHandler(filename=DATA_FILE)})


def save(manager: ocp.CheckpointManager, step: int, state, data_iterator=None, *, force: bool = False) -> bool:
  """Saves if the policy (or `force`) says so; every process calls it. The host copy of `state` is taken
  before this returns; the data iterator's state (the same on every process) is written once, by process 0."""
  items = {"state": ocp.args.StandardSave(state)}
  if data_iterator is not None:
    items[DATA_ITEM] = ocp.args.JsonSave({"iterator": data_iterator.get_state(),
                                          "process_count": jax.process_count()})
  return manager.save(int(step), args=ocp.args.Composite(**items), force=force)


def restore_state(manager: ocp.CheckpointManager, step: int, like):
  """The saved state with the shapes, dtypes and shardings of `like` (a concrete or abstract state)."""
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
  restored = manager.restore(int(step), args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
  return restored["state"]


def restore_latest(manager: ocp.CheckpointManager, like, *, is_valid=None):
  """(state, skipped) from the newest checkpoint that restores cleanly (and passes `is_valid(state)`), or None.

  skipped: [(step, reason)] for newer checkpoints that failed; each is moved to
  <checkpoints>_skipped/<step> (kept for inspection, out of the manager's way) so training can save that step
  again. Raises RuntimeError naming every reason if none restores.
  """
  skipped = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      state = restore_state(manager, step, like)
      if is_valid is not None and not is_valid(state):
        raise ValueError("restored state has non-finite values")
      break
    except Exception as e:  # pylint: disable=broad-except
      skipped.append((int(step), f"{type(e).__name__}: {e}"[:300]))
      _move_aside(manager, step)
  else:
    if not skipped:
      return None
    raise RuntimeError(f"no checkpoint in {manager.directory} restores: "
                       + "; ".join(f"step {s}: {why}" for s, why in skipped)
                       + ". They were moved to " + f"{manager.directory}_skipped; use a fresh --workdir.")
  if skipped:
    manager.reload()
  return state, skipped


def _move_aside(manager: ocp.CheckpointManager, step: int) -> None:
  src = os.path.join(os.fspath(manager.directory), str(int(step)))
  dst_dir = os.fspath(manager.directory) + "_skipped"
  if jax.process_index() == 0 and os.path.exists(src):
    os.makedirs(dst_dir, exist_ok=True)
    dst = os.path.join(dst_dir, str(int(step)))
    if os.path.exists(dst):
      shutil.rmtree(dst)
    os.replace(src, dst)


def restore_data(manager: ocp.CheckpointManager, step: int, data_iterator) -> None:
  """Sets `data_iterator` (in place) to where it was at `step`, whatever the process count that saved it.

  Raises DataStateError naming the checkpoint when it holds no data state, or per-process states of a
  multi-process run from before the global data stream (those streams cannot be continued on any count).
  """
  folder = os.path.join(os.fspath(manager.directory), str(int(step)), DATA_ITEM)
  if os.path.isfile(os.path.join(folder, DATA_FILE)):
    saved = manager.restore(int(step), args=ocp.args.Composite(**{DATA_ITEM: ocp.args.JsonRestore()}))
    data_iterator.set_state(saved[DATA_ITEM]["iterator"])
    return
  legacy = {}
  for path in glob.glob(os.path.join(folder, "process_*-of-*.json")):
    match = _LEGACY_DATA_FILE.search(path)
    if match:
      legacy[int(match.group(1))] = (int(match.group(2)), path)
  counts = {n for n, _ in legacy.values()}
  if counts == {1} and 0 in legacy:
    import json
    with open(legacy[0][1]) as f:
      data_iterator.set_state(json.load(f))
    return
  if counts:
    raise DataStateError(
        f"checkpoint {folder}: the data-iterator state was saved per process by {max(counts)} processes, in the "
        "format from before the data stream became independent of the process count; each process then read "
        "its own share of the cases, so that stream cannot be continued by this version. Resume it with the "
        "mri_poison version that wrote it (on the same process count), or start a fresh --workdir.")
  raise DataStateError(f"checkpoint {folder}: no data-iterator state ({DATA_FILE}); it was saved without a data "
                       "stream, so a run that reads data cannot resume from it: use a fresh --workdir")
