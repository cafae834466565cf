"""THE train loop: a pure, jitted, donated train step and the resumable driver around it.

Hooks (how defences and studies change training without forking the loop):
  loss_fn(logits, batch) -> (B,) per-example loss. `logits` is exactly what the model returns in train mode
    (a tuple (final, aux_1, ...) when config.model.deep_supervision); `batch` is the (transformed) batch dict.
  batch_transform(params, batch, key[, hook_params]) -> batch runs INSIDE the jitted step before the forward
    pass, with the current params (not differentiated through) and a per-step key. Frozen weights a hook needs
    (a distillation teacher, a perturbation generator) go in `train_model(..., hook_params=...)`: they reach the
    hook as a jit argument, not as constants baked into the compiled step. It gets the model by closure: build it with
    `apply_fn = state.make_apply_fn(state.make_model(config.model))`, where
    `apply_fn(params, x, *, train=False, temperature=1.0, rngs=None) -> (B, *S, K) f32 logits`, and pass
    `batch_transform=make_my_transform(apply_fn, ...)`. Adversarial training replaces batch["image"];
    distillation adds batch["soft_target"] from a teacher's apply_fn/params closed over the same way. A
    temperature for the student is applied in the loss (`UNet`'s temperature only divides the logits), e.g.
    `loss_fn = lambda logits, b: losses.distillation(logits, b["soft_target"], T)`.
"""
from __future__ import annotations

import functools
import json
import os
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from mri_poison.train import checkpoint as ckpt
from mri_poison.train import mesh as mesh_lib
from mri_poison.train import state as state_lib
from mri_poison.train import workdir as workdir_lib

LossFn = Callable[[Any, Mapping[str, jax.Array]], jax.Array]
BatchTransform = Callable[[Any, dict, jax.Array], dict]


def make_loss_fn(config) -> LossFn:
  """The config's loss (`config.train.loss`, a name in mri_poison.losses) as a `loss_fn(logits, batch)` hook.

  Uses batch["mask"] when present; with deep supervision, the nnU-Net weighted sum over the output heads.
  """
  from mri_poison import losses
  name = str(config.train.get("loss", "ce_dice"))
  base = getattr(losses, name, None)
  if base is None or name.startswith("_"):
    raise ValueError(f"config train.loss={name!r}: not a loss in mri_poison.losses "
                     "(e.g. 'ce_dice', 'cross_entropy', 'soft_dice', 'region_bce_dice')")

  def loss_fn(logits, batch):
    if isinstance(logits, (tuple, list)):
      return losses.deep_supervision_loss(base, logits, batch["label"], batch.get("mask"))
    return base(logits, batch["label"], batch.get("mask"))
  return loss_fn


def make_train_step(model, tx: optax.GradientTransformation, loss_fn: LossFn, *,
                    batch_transform: BatchTransform | None = None, mesh: jax.sharding.Mesh | None = None):
  """Returns `train_step(state, batch) -> (state, metrics)`, jitted once with the state donated.

  state: {"params", "opt_state", "step", "rng"} (see train.state). The step's key is
  fold_in(state["rng"], state["step"]), split into the batch_transform key and the dropout key. If the loss or
  the gradient is not finite, the returned state is the input state unchanged and metrics["finite"] is False,
  so a non-finite step never corrupts what the caller (or a checkpoint) holds.
  With `mesh`, the state comes back replicated and the metrics as replicated scalars.
  """
  def train_step(state, batch, hook_params=None):
    step_key = jax.random.fold_in(state["rng"], state["step"])
    transform_key, dropout_key = jax.random.split(step_key)
    if batch_transform is not None:
      extra = () if hook_params is None else (jax.lax.stop_gradient(hook_params),)
      batch = batch_transform(jax.lax.stop_gradient(state["params"]), dict(batch), transform_key, *extra)

    def objective(params):
      outputs = model.apply({"params": params}, batch["image"], train=True, rngs={"dropout": dropout_key})
      per_example = loss_fn(outputs, batch)
      return jnp.mean(per_example.astype(jnp.float32))

    loss, grads = jax.value_and_grad(objective)(state["params"])
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1, "rng": state["rng"]}
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
    return new_state, {"loss": loss, "grad_norm": grad_norm, "finite": finite}

  if mesh is None:
    return jax.jit(train_step, donate_argnums=0)
  rep = mesh_lib.replicated(mesh)
  return jax.jit(train_step, donate_argnums=0, out_shardings=(rep, rep))


@functools.lru_cache(maxsize=8)
def _cached_train_step(model, train_cfg_json: str, loss_fn, batch_transform, mesh, config_loss: str):
  # Studies train many models with one config (poison sweeps, resumed runs, tests): build and compile the
  # step once per (model, train config, hooks, mesh) instead of once per train_model call.
  import ml_collections
  train_cfg = ml_collections.ConfigDict(json.loads(train_cfg_json))
  tx = state_lib.make_optimizer(train_cfg)
  if loss_fn is None:
    loss_fn = make_loss_fn(ml_collections.ConfigDict({"train": {"loss": config_loss}}))
  return tx, make_train_step(model, tx, loss_fn, batch_transform=batch_transform, mesh=mesh)


def _initial_state(model, tx, config, mesh, init_params):
  seed = int(config.train.seed)
  init_key, train_key = jax.random.split(jax.random.PRNGKey(seed))
  rep = mesh_lib.replicated(mesh)
  if init_params is None:
    shape = state_lib.input_shape(config.data)
    params = jax.device_put(state_lib.init_params(model, init_key, shape), rep)
  else:
    params = mesh_lib.replicate(jax.tree.map(jnp.asarray, init_params), mesh)
  return jax.jit(lambda p, k: state_lib.init_state(p, tx, k), out_shardings=rep)(params, train_key)


def train_model(config, workdir: str, *, cases=None, loss_fn: LossFn | None = None,
                batch_transform: BatchTransform | None = None, init_params=None, hook_params=None,
                eval_fn: Callable[[Any, int], Mapping[str, float]] | None = None):
  """Trains `config.model` on `cases` (default: load_splits(config.data)["train"]) and returns the params.

  Resumable: checkpoints (state + grain iterator state) go to workdir/checkpoints every train.ckpt_every steps
  and at the end; re-running on the same workdir resumes at the latest one, and a finished run returns its
  final params at once. `init_params` (e.g. a pretrained model) only seeds a fresh run; `hook_params` is passed
  to batch_transform as its 4th argument (replicated, not trained, not checkpointed). `eval_fn(params, step)`
  runs every train.eval_every steps and its dict is logged. A non-finite loss raises FloatingPointError naming
  the step; nothing non-finite is saved, so the last checkpoint stays the last good state.
  """
  train_cfg = config.train
  total = int(train_cfg.steps)
  log_every, ckpt_every = max(int(train_cfg.log_every), 1), max(int(train_cfg.ckpt_every), 1)
  eval_every = int(train_cfg.get("eval_every", 0) or 0)
  workdir = os.path.abspath(workdir)
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise ValueError(f"workdir {workdir}: cannot create it ({e})") from e
  digest = workdir_lib.write_config(workdir, config)

  mesh = mesh_lib.make_mesh()
  mesh_lib.check_batch_size(config.data.batch_size, mesh)
  model = state_lib.make_model(config.model)
  tx, step_fn = _cached_train_step(model, json.dumps(train_cfg.to_dict(), sort_keys=True), loss_fn,
                                   batch_transform, mesh, str(train_cfg.get("loss", "ce_dice")))
  schedule = state_lib.lr_schedule(train_cfg)

  with jax.set_mesh(mesh):
    state = _initial_state(model, tx, config, mesh, init_params)
    manager = ckpt.make_manager(os.path.join(workdir, "checkpoints"), ckpt_every=ckpt_every,
                                keep=int(train_cfg.get("keep_checkpoints", 2)))
    try:
      latest = manager.latest_step()
      if latest is not None:
        state = ckpt.restore_state(manager, latest, state)
        logging.info("resumed %s at step %d", workdir, latest)
      start = int(jax.device_get(state["step"]))
      if start >= total:
        return state["params"]
      manifest = workdir_lib.start_manifest(workdir, seed=int(train_cfg.seed), config_digest=digest,
                                            start_step=start)
      if cases is None:
        from mri_poison.data.datasets import load_splits
        cases = load_splits(config.data)["train"]
      from mri_poison.data.pipeline import train_iterator
      data = train_iterator(cases, config.data, seed=int(train_cfg.seed))
      if latest is not None:
        ckpt.restore_data(manager, latest, data)
      writer = workdir_lib.MetricsWriter(workdir)
      progress = workdir_lib.Progress(total, start)
      status = "failed"
      try:
        if hook_params is not None:
          hook_params = mesh_lib.replicate(jax.tree.map(jnp.asarray, hook_params), mesh)
        state = _run(functools.partial(step_fn, hook_params=hook_params), state, data, manager, mesh, writer,
                     progress, schedule, eval_fn,
                     start=start, total=total, log_every=log_every, eval_every=eval_every)
        status = "finished"
      except FloatingPointError:
        status = "non-finite loss"
        raise
      except KeyboardInterrupt:
        status = "interrupted"
        raise
      finally:
        manager.wait_until_finished()
        writer.close()
        workdir_lib.end_manifest(workdir, manifest, end_step=manager.latest_step() or start, status=status)
      return state["params"]
    finally:
      manager.wait_until_finished()
      manager.close()


def _run(step_fn, state, data, manager, mesh, writer, progress, schedule, eval_fn, *, start, total, log_every,
         eval_every):
  # Metrics are read one step late (the previous step is done by the time the next one is dispatched), so the
  # host never waits on the device except at log / checkpoint steps.
  window: list[dict] = []
  pending = None  # (step, device metrics) not yet read
  t0 = time.perf_counter()

  def read(step, metrics):
    host = jax.device_get(metrics)
    if not bool(host["finite"]):
      raise FloatingPointError(
          f"non-finite loss at step {step} (loss={float(host['loss'])}, grad_norm={float(host['grad_norm'])}); "
          f"the state was not updated and nothing was saved; last good checkpoint: step {manager.latest_step()} "
          f"in {manager.directory}. Lower config train.lr or check the data.")
    window.append({"loss": float(host["loss"]), "grad_norm": float(host["grad_norm"])})

  for step in range(start + 1, total + 1):
    batch = mesh_lib.shard_batch(next(data), mesh)
    state, metrics = step_fn(state, batch)
    if pending is not None:
      read(*pending)
    pending = (step, metrics)
    must_save = step == total or manager.should_save(step)
    if step % log_every == 0 or must_save or (eval_every and step % eval_every == 0):
      read(*pending)
      pending = None
    if step % log_every == 0 or step == total:
      row = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
      row["lr"] = float(schedule(step - 1))
      row["steps_per_sec"] = progress.report(step, row)
      row["elapsed_s"] = time.perf_counter() - t0
      writer.write(step, row)
      window.clear()
    if must_save:
      ckpt.save(manager, step, state, data, force=step == total)
    if eval_every and step % eval_every == 0 and eval_fn is not None:
      writer.write(step, {f"eval/{k}": v for k, v in eval_fn(state["params"], step).items()})
  return state
