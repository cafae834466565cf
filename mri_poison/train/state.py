"""Model / optimiser construction from a config and the plain-dict train state.

The train state is a plain dict (big_vision style), a pytree that orbax saves as is:
  {"params": params, "opt_state": optax state, "step": int32 scalar, "rng": uint32 (2,) base key}
Per-step keys are `fold_in(rng, step)`, so the base key never changes and a resumed run replays the same noise.
"""
from __future__ import annotations

from typing import Any, Callable

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

Params = Any
ApplyFn = Callable[..., jax.Array]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def compute_dtype(name, key: str = "model.dtype") -> Any:
  """The jnp dtype named `name` (a dtype passes through); `key` names the config field in errors."""
  if not isinstance(name, str):
    return name
  if name not in DTYPES:
    raise ValueError(f"config {key}={name!r}: expected one of {sorted(DTYPES)}")
  return DTYPES[name]


def make_model(model_cfg) -> nn.Module:
  """The victim `config.model` names (`mri_poison.models.get_model`; "unet" when it names none), its dtypes
  given by name (e.g. "bfloat16")."""
  from mri_poison import models
  kwargs = dict(model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else model_cfg)
  name = str(kwargs.pop("name", "unet"))
  for key in ("features", "blocks"):
    if key in kwargs:
      kwargs[key] = tuple(int(f) for f in kwargs[key])
  if "dtype" in kwargs:
    kwargs["dtype"] = compute_dtype(kwargs["dtype"])
  if "input_dtype" in kwargs:  # absent in older configs: the model's default (float32 first layer)
    kwargs["input_dtype"] = compute_dtype(kwargs["input_dtype"], "model.input_dtype")
  return models.get_model(name, **kwargs)


@functools.lru_cache(maxsize=32)
def make_apply_fn(model: nn.Module) -> ApplyFn:
  """`apply_fn(params, x, *, train=False, temperature=1.0, rngs=None) -> float32 logits`.

  This is the function hooks close over (attacks, adversarial training, distillation teachers). With deep
  supervision only the full-resolution head is returned (training sees all heads via `model.apply`).
  Cached per (equal) model, so jitted consumers that take it as a static argument compile once.
  """
  def apply_fn(params, x, *, train=False, temperature=1.0, rngs=None):
    out = model.apply({"params": params}, x, train=train, temperature=temperature, rngs=rngs)
    return out[0] if isinstance(out, (tuple, list)) else out
  return apply_fn


def input_shape(data_cfg) -> tuple[int, ...]:
  """(1, *patch, C) for the model's init."""
  return (1, *(int(p) for p in data_cfg.patch_shape), len(tuple(data_cfg.modalities)))


@functools.partial(jax.jit, static_argnums=(0, 2))
def init_params(model: nn.Module, key: jax.Array, shape) -> Params:
  """Float32 params of `model` for inputs of `shape` (jitted: compiled once per model and shape)."""
  variables = model.init({"params": key}, jnp.zeros(shape, jnp.float32), train=False)
  extra = sorted(set(variables) - {"params"})
  if extra:
    raise ValueError(f"model has mutable collections {extra}; the train loop supports stateless norms only "
                     "(config model.norm='instance' / 'group' / 'layer' / 'none')")
  return variables["params"]


def lr_schedule(train_cfg) -> optax.Schedule:
  """Linear warmup to `lr` over `warmup_steps`, then cosine decay to `lr * min_lr_ratio` at the horizon.

  The horizon is `schedule_steps`, or `steps` when that is 0 or absent; a run extended past its horizon
  (more `steps`, same `schedule_steps`) continues at the final learning rate.
  """
  steps, warmup = int(train_cfg.get("schedule_steps", 0) or train_cfg.steps), int(train_cfg.warmup_steps)
  lr = float(train_cfg.lr)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0 if warmup else lr, peak_value=lr, warmup_steps=warmup,
      decay_steps=max(steps, warmup + 1), end_value=lr * float(train_cfg.get("min_lr_ratio", 0.0)))


def make_optimizer(train_cfg) -> optax.GradientTransformation:
  """clip_by_global_norm -> adamw(warmup + cosine); no weight decay on biases and norm scales (ndim <= 1)."""
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
  parts = []
  if float(train_cfg.get("grad_clip", 0.0)) > 0:
    parts.append(optax.clip_by_global_norm(float(train_cfg.grad_clip)))
  parts.append(optax.adamw(lr_schedule(train_cfg), b1=float(train_cfg.get("b1", 0.9)),
                           b2=float(train_cfg.get("b2", 0.999)),
                           weight_decay=float(train_cfg.weight_decay), mask=decay_mask))
  return optax.chain(*parts)


def init_state(params: Params, tx: optax.GradientTransformation, rng: jax.Array) -> dict:
  return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
          "rng": jnp.asarray(rng, jnp.uint32)}
