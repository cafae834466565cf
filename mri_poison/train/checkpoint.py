"""Orbax CheckpointManager for the train state plus the grain iterator state (per process).

A checkpoint step directory holds two items: "state" (params, opt_state, step, rng; StandardSave) and "data"
(grain's per-process iterator state, process_{i}-of-{n}.json). Old checkpoints are pruned by a preservation
policy (latest N, plus every `keep_every` steps if asked) rather than the deprecated max_to_keep options.
"""
from __future__ import annotations

import os

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm


def make_manager(directory: str, *, ckpt_every: int, keep: int = 2, keep_every: int = 0,
                 async_save: bool = True) -> ocp.CheckpointManager:
  preserve = [cm.LatestN(n=max(int(keep), 1))]
  if keep_every:
    preserve.append(cm.EveryNSteps(interval_steps=int(keep_every)))
  options = ocp.CheckpointManagerOptions(
      save_decision_policy=cm.FixedIntervalPolicy(max(int(ckpt_every), 1)),
      preservation_policy=preserve[0] if len(preserve) == 1 else cm.AnyPreservationPolicy(preserve),
      enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
  return ocp.CheckpointManager(
      os.path.abspath(directory), options=options,
      item_handlers={"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler()})


def save(manager: ocp.CheckpointManager, step: int, state, data_iterator=None, *, force: bool = False) -> bool:
  """Saves if the policy (or `force`) says so. The host copy of `state` is taken before this returns."""
  items = {"state": ocp.args.StandardSave(state)}
  if data_iterator is not None:
    items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
  return manager.save(int(step), args=ocp.args.Composite(**items), force=force)


def restore_state(manager: ocp.CheckpointManager, step: int, like):
  """The saved state with the shapes, dtypes and shardings of `like` (a concrete or abstract state)."""
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
  restored = manager.restore(int(step), args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
  return restored["state"]


def restore_data(manager: ocp.CheckpointManager, step: int, data_iterator) -> None:
  """Sets `data_iterator` (in place) to where it was at `step`."""
  manager.restore(int(step), args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(data_iterator)))
