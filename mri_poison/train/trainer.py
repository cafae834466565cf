"""THE trainer: `fit` drives any train state with any step, and owns everything around the step.

A study supplies three things and gets checkpoints, resume, metrics, progress and the non-finite guard:
  init_state: a pytree holding "step" (int32 scalar) and "rng" (a base key; per-step keys are
    fold_in(rng, step), so a resumed run replays the same noise), plus trainable parts under names of the
    caller's choice, each a `parts.make_part(params, tx)` dict {"params", "opt_state"}:
    {"model": ...} for a U-Net, {"gen": ..., "disc": ...} for a GAN, {"surrogate": ..., "noise": ...} for min-min.
  step_fn(state, batch, *step_args) -> (state, metrics): pure and traceable; fit jits it once with the state
    donated. Metrics are scalars, or (M,) arrays for stacked models (`parts.stacked_step`), logged per index.
  data: a grain-style iterator of process-local numpy batches (with get_state/set_state, checkpointed with the
    state), a zero-argument callable returning one (built only if there is training left to do), or None.
    Process p yields rows [p*B/P, (p+1)*B/P) of each global batch of B (mri_poison.data.pipeline does), and its
    state is the same on every process, so the run and its checkpoints do not depend on the process count.

Multi-process (after jax.distributed.initialize()): every process calls fit with the same arguments; only
process 0 writes config.json, manifest.json, metrics.jsonl and TensorBoard events; checkpoints go through
orbax's multi-host path. eval_fn runs on every process and its dict is logged by process 0: a process that
evaluates only its share of the cases reduces its sums and counts with `process_sum` before dividing.

Every step is guarded: if any float metric or any float leaf of the new state is not finite, the state is
kept as it was (`guard_finite`) and fit raises FloatingPointError naming the step (and the model index of a
stacked run). So every checkpoint holds a finite state.
"""
from __future__ import annotations

import functools
import os
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from mri_poison import progress as progress_lib
from mri_poison.train import checkpoint as ckpt
from mri_poison.train import mesh as mesh_lib
from mri_poison.train import lock as lock_lib
from mri_poison.train import metrics_log
from mri_poison.train import workdir as workdir_lib

State = Any
StepFn = Callable[..., tuple[State, Mapping[str, jax.Array]]]
NOT_GUARDED = ("step", "rng")


def tree_finite(tree) -> jax.Array:
  """True when every inexact (float/complex) leaf of `tree` is finite everywhere."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def guard_finite(step_fn: StepFn, *, keep: tuple[str, ...] = ()) -> StepFn:
  """`step_fn` that returns its input state unchanged (but for the keys in `keep`) when the step is not finite.

  Not finite: any float metric, or any float leaf of the new state, is NaN/inf; or the step's own
  metrics["finite"] says so. metrics["finite"] is set (the step's own flags, e.g. (M,) per stacked model,
  else the guard's scalar verdict).
  """
  def guarded(state, batch, *args):
    new, metrics = step_fn(state, batch, *args)
    metrics = dict(metrics)
    own = metrics.pop("finite", None)
    flags = tree_finite(metrics) & tree_finite({k: v for k, v in new.items() if k not in keep})
    if own is not None:
      flags = own & flags
    ok = jnp.all(flags)
    new = {k: v if k in keep else jax.tree.map(lambda n, o: jnp.where(ok, n, o), v, state[k])
           for k, v in new.items()}
    metrics["finite"] = flags
    return new, metrics
  return guarded


@functools.lru_cache(maxsize=16)
def _compiled_step(step_fn: StepFn, mesh) -> Callable:
  # One jit per (step, mesh): a study that trains several models with one step function compiles it once.
  rep = mesh_lib.replicated(mesh)
  return jax.jit(guard_finite(step_fn), donate_argnums=0, out_shardings=(rep, rep))


def process_sum(tree):
  """Every leaf summed over all processes (numpy, on every process): per-process sums and counts in, global ones
  out, e.g. {"tp": (3,), "fp": (3,), "fn": (3,), "voxels": ()} of this process's cases. A collective: every
  process must call it, with the same tree structure, shapes and dtypes."""
  tree = jax.tree.map(np.asarray, tree)
  if jax.process_count() == 1:
    return tree
  from jax.experimental import multihost_utils
  gathered = multihost_utils.process_allgather(tree)  # a leading process axis on every leaf
  return jax.tree.map(lambda x: np.asarray(x).sum(axis=0), gathered)


def check_process_blocks(mesh) -> None:
  """Raises ValueError unless process p's devices hold the p-th contiguous block of the mesh's "data" axis,
  which is where the pipeline's rows [p*B/P, (p+1)*B/P) of each global batch must land."""
  n, p, count = mesh.size, jax.process_index(), jax.process_count()
  if n % count:
    raise ValueError(f"mesh of {n} devices over {count} processes: every process needs the same device count")
  if mesh_lib.process_rows(n, mesh) != (p * n // count, (p + 1) * n // count):
    raise ValueError(f"process {p}'s devices are not block {p} of the mesh's data axis, so its rows of each "
                     "global batch would land elsewhere: build the mesh with train.mesh.make_mesh")


def _open_data(data):
  if data is None:
    return None
  if callable(data) and not hasattr(data, "__next__"):
    return data()
  return data


def fit(config, workdir: str, *, init_state: State, step_fn: StepFn, data=None, step_args: tuple = (),
        eval_fn: Callable[[State, int], Mapping[str, float]] | None = None, mesh=None) -> State:
  """Trains `init_state` with `step_fn` for config.train.steps steps in `workdir`; returns the final state.

  Reads config.train.{steps, log_every, ckpt_every, eval_every, keep_checkpoints, seed}. In order, before any
  file is written: the workdir is created and proved writable, locked (a second run on it stops at once), and
  the config checked against workdir/config.json (a resumed run must match; see workdir.check_config). Then the
  latest checkpoint that restores cleanly is loaded (skipped ones are reported and moved aside, not deleted); a
  finished run returns its final state at once. Metrics go to metrics.jsonl (rows past the restored step are
  dropped first), progress to the log with rate and ETA, manifest.json records every start and how it ended.
  `step_args` (e.g. frozen teacher weights) are replicated and passed to every step as jit arguments.
  `eval_fn(state, step)` runs every train.eval_every steps; its dict is logged.
  """
  train_cfg = config.train
  total = int(train_cfg.steps)
  log_every, ckpt_every = max(int(train_cfg.log_every), 1), max(int(train_cfg.ckpt_every), 1)
  eval_every = int(train_cfg.get("eval_every", 0) or 0)
  if not isinstance(init_state, Mapping) or "step" not in init_state or "rng" not in init_state:
    raise ValueError("fit: init_state must be a dict holding 'step' and 'rng' besides its trainable parts")
  workdir = os.path.abspath(workdir)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  lock_lib.check_writable(workdir)
  lock_lib.check_writable(ckpt_dir)
  mesh = mesh or mesh_lib.make_mesh()
  if jax.process_count() > 1:
    check_process_blocks(mesh)

  with lock_lib.lock(workdir), jax.set_mesh(mesh):
    manager = ckpt.make_manager(ckpt_dir, ckpt_every=ckpt_every, keep=int(train_cfg.get("keep_checkpoints", 2)))
    try:
      has_ckpt = bool(manager.all_steps())
      digest = workdir_lib.write_config(workdir, config, has_checkpoints=has_ckpt)
      # A copy: the step donates its state, and the caller's init_state must stay usable.
      state = jax.device_put(init_state, mesh_lib.replicated(mesh), may_alias=False)
      if not bool(tree_finite(state)):
        raise FloatingPointError("fit: init_state has non-finite values (check the initial params)")
      restored = (ckpt.restore_latest(manager, state, is_valid=lambda s: bool(tree_finite(s))) if has_ckpt
                  else None)
      if restored is not None:
        state, skipped = restored
        for step, why in skipped:
          logging.warning("%s: checkpoint %d did not restore (%s); moved aside, resumed from an earlier one",
                          workdir, step, why)
      start = int(jax.device_get(state["step"]))
      if start >= total:
        return state
      manifest = workdir_lib.start_manifest(workdir, seed=int(train_cfg.get("seed", 0)), config_digest=digest,
                                            start_step=start, data=workdir_lib.data_provenance(config))
      status, writer = "failed", None
      try:
        iterator = _open_data(data)
        if restored is not None and iterator is not None and start > 0:
          ckpt.restore_data(manager, start, iterator)
        writer = metrics_log.MetricsWriter(workdir, resume_step=start)
        args = tuple(mesh_lib.replicate(jax.tree.map(jnp.asarray, a), mesh) if a is not None else None
                     for a in step_args)
        step = _compiled_step(step_fn, mesh)
        progress = progress_lib.Progress(total, name=os.path.basename(workdir), done=start)
        state = _run(step, args, state, iterator, manager, mesh, writer, progress, eval_fn,
                     start=start, total=total, log_every=log_every, eval_every=eval_every)
        status = "finished"
        return state
      except FloatingPointError:
        status = "non-finite"
        raise
      except KeyboardInterrupt:
        status = "interrupted"
        raise
      finally:
        if writer is not None:
          writer.close()
        workdir_lib.end_manifest(workdir, manifest, end_step=manager.latest_step() or start, status=status)
    finally:
      manager.close()


def _host_metrics(metrics) -> dict[str, np.ndarray]:
  return {k: np.asarray(v) for k, v in jax.device_get(metrics).items()}


def _describe(host: Mapping[str, np.ndarray]) -> str:
  return ", ".join(f"{k}={np.array2string(v, precision=4) if v.ndim else f'{float(v):.4g}'}"
                   for k, v in host.items() if k != "finite")


def _run(step_fn, args, state, data, manager, mesh, writer, progress, eval_fn, *, start, total, log_every,
         eval_every):
  # Metrics are read one step late (the previous step is done by the time the next one is dispatched), so the
  # host never waits on the device except at log / checkpoint / eval steps.
  window: list[dict] = []
  pending = None  # (step, device metrics) not yet read
  t0 = time.perf_counter()

  def read(step, metrics):
    host = _host_metrics(metrics)
    finite = host.pop("finite")
    if not finite.all():
      which = f" in model(s) {np.flatnonzero(~finite).tolist()} of the stack" if finite.ndim else ""
      raise FloatingPointError(
          f"non-finite step {step}{which} ({_describe(host)}): the state was not updated and nothing was saved; "
          f"last good checkpoint: step {manager.latest_step()} in {manager.directory}. Lower the learning rate "
          "(config train.lr) or check the data, then use a fresh --workdir or re-run to resume from it.")
    window.append(host)

  for step in range(start + 1, total + 1):
    batch = {} if data is None else mesh_lib.shard_batch(next(data), mesh)
    state, metrics = step_fn(state, batch, *args)
    if pending is not None:
      read(*pending)
    pending = (step, metrics)
    must_save = step == total or manager.should_save(step)
    do_eval = bool(eval_every and eval_fn is not None and step % eval_every == 0)
    if step % log_every == 0 or must_save or do_eval:
      read(*pending)
      pending = None
    if step % log_every == 0 or step == total:
      row = {k: np.mean([w[k] for w in window], axis=0) for k in window[0]}
      shown = {k: float(np.mean(v)) for k, v in row.items()}
      row["steps_per_sec"] = progress.update(step, metrics=shown)
      row["elapsed_s"] = time.perf_counter() - t0
      writer.write(step, row)
      window.clear()
    if must_save:
      ckpt.save(manager, step, state, data, force=step == total)
    if do_eval:
      evaluated = eval_fn(state, step)
      if evaluated:
        writer.write(step, {f"eval/{k}": v for k, v in evaluated.items()})
  return state
