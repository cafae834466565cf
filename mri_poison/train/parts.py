"""Trainable parts of a train state, and stacks of models trained as one vmapped program.

A part is {"params": pytree, "opt_state": optax state}; a state holds any number of them under names of the
caller's choice plus "step" and "rng" (see `fit`). Two networks with their own optimisers (a GAN) are two
parts updated in one step:

  state = {"gen": make_part(g_params, g_tx), "disc": make_part(d_params, d_tx), "step": 0, "rng": key}
  def step(state, batch):
    d_grads = jax.grad(d_loss)(state["disc"]["params"], state["gen"]["params"], batch)
    disc = apply_gradients(state["disc"], d_grads, d_tx)
    ...
    return {**state, "gen": gen, "disc": disc, "step": state["step"] + 1}, metrics

A stack is M models with the same structure trained in lock-step, e.g. one U-Net per poisoning ratio: every
trainable leaf gets a leading model axis, "step" and "rng" stay shared, and `stacked_step` vmaps a one-model
step over that axis (same batch for all, or a (B, M, ...) batch with one slice per model).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from mri_poison.train.trainer import guard_finite

SHARED = ("step", "rng")


def make_part(params, tx: optax.GradientTransformation) -> dict:
  """{"params": params, "opt_state": tx.init(params)}."""
  return {"params": params, "opt_state": tx.init(params)}


def apply_gradients(part: dict, grads, tx: optax.GradientTransformation) -> dict:
  """The part after one optimiser update with `grads` (any other keys of the part are kept)."""
  updates, opt_state = tx.update(grads, part["opt_state"], part["params"])
  return {**part, "params": optax.apply_updates(part["params"], updates), "opt_state": opt_state}


def init_state(parts: dict, rng) -> dict:
  """A train state from named parts: {**parts, "step": 0 (int32), "rng": uint32 key data}."""
  clash = set(parts) & set(SHARED)
  if clash:
    raise ValueError(f"part names {sorted(clash)} are reserved for the state's counters")
  rng = jnp.asarray(jax.random.key_data(rng) if jnp.issubdtype(jnp.result_type(rng), jax.dtypes.prng_key)
                    else rng, jnp.uint32)
  return {**parts, "step": jnp.zeros((), jnp.int32), "rng": rng}


def stack(state: dict, n: int) -> dict:
  """`n` identical copies of every trainable leaf along a new leading axis; "step" and "rng" stay shared."""
  if int(n) < 1:
    raise ValueError(f"stack: need n >= 1 models, got {n}")
  return {k: v if k in SHARED else jax.tree.map(lambda x: jnp.broadcast_to(x, (int(n),) + jnp.shape(x)), v)
          for k, v in state.items()}


def unstack(state: dict, index: int) -> dict:
  """Model `index` of a stacked state, as a one-model state."""
  return {k: v if k in SHARED else jax.tree.map(lambda x: x[index], v) for k, v in state.items()}


def stacked_step(step_fn: Callable, *, batch_axis: int | None = None) -> Callable:
  """A step over a stacked state: `step_fn(state, batch, *args)` vmapped over the model axis.

  batch_axis None: every model sees the same batch; 1: the batch is laid out (B, M, ...) and model m sees
  batch[:, m]. Extra args are shared. Each model is guarded on its own: a model whose step is not finite keeps
  its parts, and metrics["finite"] is (M,), so `fit` can name it. Metrics come back as (M,) arrays.
  """
  one = guard_finite(step_fn, keep=SHARED)

  def step(state, batch, *args):
    axes = {k: None if k in SHARED else 0 for k in state}
    return jax.vmap(one, in_axes=(axes, batch_axis) + (None,) * len(args), out_axes=(axes, 0))(
        state, batch, *args)
  return step


def n_models(state: dict) -> int:
  """The model axis length of a stacked state."""
  leaves = [x for k, v in state.items() if k not in SHARED for x in jax.tree.leaves(v)]
  return int(jnp.shape(leaves[0])[0])

