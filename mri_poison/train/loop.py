"""The U-Net's train step and `train_model`, the U-Net case of the general trainer `train.fit`.

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
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from mri_poison.train import trainer
from mri_poison.train import mesh as mesh_lib
from mri_poison.train import parts
from mri_poison.train import state as state_lib

LossFn = Callable[[Any, Mapping[str, jax.Array]], jax.Array]
BatchTransform = Callable[[Any, dict, jax.Array], dict]


def make_loss_fn(config) -> LossFn:
  """The config's loss (`config.train.loss`, a name in mri_poison.losses) as a `loss_fn(logits, batch)` hook.

  Uses batch["mask"] when present; with deep supervision, the nnU-Net weighted sum over the output heads.
  """
  from mri_poison import losses
  name = str(config.train.get("loss", "ce_dice"))
  if name not in losses.TRAINING_LOSSES:
    raise ValueError(f"config train.loss={name!r}: expected one of {losses.TRAINING_LOSSES}")
  base = getattr(losses, name)

  def loss_fn(logits, batch):
    if isinstance(logits, (tuple, list)):
      return losses.deep_supervision_loss(base, logits, batch["label"], batch.get("mask"))
    return base(logits, batch["label"], batch.get("mask"))
  return loss_fn


def train_step_fn(model, tx: optax.GradientTransformation, loss_fn: LossFn, *,
                  batch_transform: BatchTransform | None = None, schedule: optax.Schedule | None = None):
  """The U-Net's `train_step(state, batch, hook_params=None) -> (state, metrics)`, pure (for `fit`, vmap, jit).

  state: {"params", "opt_state", "step", "rng"} (see train.state). The step's key is
  fold_in(state["rng"], state["step"]), split into the batch_transform key and the dropout key. With
  `schedule`, metrics["lr"] is the learning rate the step used. Unguarded: `fit`, `make_train_step` and
  `parts.stacked_step` add the finite guard.
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
    new_state = {**parts.apply_gradients(state, grads, tx), "step": state["step"] + 1}
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
    if schedule is not None:
      metrics["lr"] = schedule(state["step"])
    return new_state, metrics

  return train_step


def make_train_step(model, tx: optax.GradientTransformation, loss_fn: LossFn, *,
                    batch_transform: BatchTransform | None = None, mesh: jax.sharding.Mesh | None = None):
  """`train_step_fn` with the finite guard, jitted once with the state donated.

  If the loss, the gradient, the new params or the new optimiser state is not finite, the returned state is
  the input state unchanged and metrics["finite"] is False, so a non-finite step never corrupts what the caller
  (or a checkpoint) holds. With `mesh`, state and metrics come back replicated.
  """
  step = trainer.guard_finite(train_step_fn(model, tx, loss_fn, batch_transform=batch_transform))
  if mesh is None:
    return jax.jit(step, donate_argnums=0)
  rep = mesh_lib.replicated(mesh)
  return jax.jit(step, donate_argnums=0, out_shardings=(rep, rep))


@functools.lru_cache(maxsize=8)
def _cached_train_step(model, train_cfg_json: str, loss_fn, batch_transform, config_loss: str):
  # Studies train many models with one config (poison sweeps, resumed runs, tests): build the step once per
  # (model, train config, hooks), so `fit` (whose jit cache is keyed by the step function) compiles it once.
  import ml_collections
  train_cfg = ml_collections.ConfigDict(json.loads(train_cfg_json))
  tx = state_lib.make_optimizer(train_cfg)
  if loss_fn is None:
    loss_fn = make_loss_fn(ml_collections.ConfigDict({"train": {"loss": config_loss}}))
  step = train_step_fn(model, tx, loss_fn, batch_transform=batch_transform,
                       schedule=state_lib.lr_schedule(train_cfg))
  return tx, step


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
  """Trains `config.model` on `cases` (default: load_splits(config.data)["train"]) with `fit`; returns the params.

  Resumable: checkpoints (state + grain iterator state) go to workdir/checkpoints every train.ckpt_every steps
  and at the end; re-running on the same workdir resumes at the latest one, and a finished run returns its
  final params at once. `init_params` (e.g. a pretrained model) only seeds a fresh run; `hook_params` is passed
  to batch_transform as its 4th argument (replicated, not trained, not checkpointed). `eval_fn(params, step)`
  runs every train.eval_every steps and its dict is logged. A non-finite step raises FloatingPointError naming
  the step; nothing non-finite is saved, so the last checkpoint stays the last good state.
  """
  mesh = mesh_lib.make_mesh()
  mesh_lib.check_batch_size(config.data.batch_size, mesh)
  model = state_lib.make_model(config.model)
  tx, step_fn = _cached_train_step(model, json.dumps(config.train.to_dict(), sort_keys=True), loss_fn,
                                   batch_transform, str(config.train.get("loss", "ce_dice")))
  with jax.set_mesh(mesh):
    init_state = _initial_state(model, tx, config, mesh, init_params)

  def data():
    from mri_poison.data.datasets import load_splits
    from mri_poison.data.pipeline import train_iterator
    source = load_splits(config.data)["train"] if cases is None else cases
    return train_iterator(source, config.data, seed=int(config.train.seed))

  state = trainer.fit(config, workdir, init_state=init_state, step_fn=step_fn, data=data,
                      step_args=(hook_params,), mesh=mesh,
                      eval_fn=None if eval_fn is None else (lambda s, step: eval_fn(s["params"], step)))
  return state["params"]


def load_model(path: str, name: str | None = None):
  """(apply_fn, params, config) of a U-Net trained by `train_model`, from its workdir or a study's workdir.

  `path` is a model folder (config.json + checkpoints/) or a study workdir holding models/<name>/ (e.g.
  runs/robustify: name "undefended", "distilled", ...; the error lists the names when `name` is missing).
  The params are those of the latest checkpoint that restores; `apply_fn(params, x) -> logits`.
  """
  import ml_collections

  from mri_poison.train import checkpoint as ckpt
  from mri_poison.train import workdir as workdir_lib
  path = os.path.abspath(os.fspath(path))
  models = os.path.join(path, "models")
  if os.path.isdir(models) and not os.path.isdir(os.path.join(path, "checkpoints")):
    names = sorted(n for n in os.listdir(models) if os.path.isdir(os.path.join(models, n, "checkpoints")))
    if name is None and len(names) != 1:
      raise ValueError(f"{path} holds several models {names}: pass name= (experiments.segment: --model)")
    path = os.path.join(models, name or names[0])
  elif name is not None:
    path = os.path.join(path, "models", name)
  config_path = os.path.join(path, "config.json")
  if not os.path.isfile(config_path) or not os.path.isdir(os.path.join(path, "checkpoints")):
    raise FileNotFoundError(f"{path}: not a trained model folder (expected config.json and checkpoints/)")
  config = ml_collections.ConfigDict(workdir_lib.read_json(config_path, path)["config"])
  model = state_lib.make_model(config.model)
  tx = state_lib.make_optimizer(config.train)
  like = _initial_state(model, tx, config, mesh_lib.make_mesh(), None)
  manager = ckpt.make_manager(os.path.join(path, "checkpoints"), ckpt_every=1)
  try:
    restored = ckpt.restore_latest(manager, like)
  finally:
    manager.close()
  if restored is None:
    raise FileNotFoundError(f"{path}/checkpoints: no checkpoint")
  return state_lib.make_apply_fn(model), restored[0]["params"], config
