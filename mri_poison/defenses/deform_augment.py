"""Adversarial deformation augmentation (study 3's defence): a `batch_transform` for `train.loop.train_model`.

A share `ratio` of every training batch is replaced by deformed-and-re-lit copies of its examples, made inside
the jitted train step with the current weights: mode "adversarial" runs `steps` normalised sign steps of the
deformation attack (`attacks.deform`; minimising the soft region Dice of the warped labels, with its
regularisers) from a random start inside the budgets; mode "random" draws random fields at a uniform random
fraction of the budgets. Image and label are warped by the same field, so the labels stay the ground truth.
No gradient flows through the augmentation (the attack sees stop-gradient params).
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections

from mri_poison.attacks import deform
from mri_poison.attacks.optimize import optimize, sign_step

MODES = ("adversarial", "random")


def default_config() -> ml_collections.ConfigDict:
  """Defaults chosen here: half of every batch, 3 sign steps of half the budget from a random start."""
  return ml_collections.ConfigDict(dict(
      mode="adversarial",  # "adversarial" | "random"
      ratio=0.5,  # share of each batch replaced
      steps=3,  # adversarial: sign steps on the normalised variables
      step_size=0.5,  # per step, in budget units (1 = the whole budget)
      init_scale=0.5,  # random start (and "random" mode's largest) size, in budget units
  ))


def _count(ratio: float, b: int) -> tuple[int, int, float]:
  """(examples that may be replaced, surely replaced, probability of the next one) for an expected share."""
  n_sure = math.floor(ratio * b + 1e-9)
  extra = ratio * b - n_sure
  return min(b, n_sure + (1 if extra > 1e-9 else 0)), n_sure, extra


def deform_batch_transform(apply_fn: Callable, aug_cfg=None, deform_cfg=None) -> Callable[[object, dict, jax.Array], dict]:
  """`batch_transform(params, batch, key) -> batch` with `ratio` of batch["image"] and batch["label"] deformed.

  apply_fn(params, x) -> logits; aug_cfg: fields of `default_config()`; deform_cfg: the attack's budgets and
  regularisers (`attacks.deform.default_config()` fields). With B examples the first floor(ratio B) are always
  replaced and the next with probability frac(ratio B).
  """
  c = default_config()
  c.update(dict(aug_cfg.items()) if aug_cfg is not None else {})
  mode, ratio, steps = str(c.mode), float(c.ratio), int(c.steps)
  step_size, init_scale = float(c.step_size), float(c.init_scale)
  if mode not in MODES:
    raise ValueError(f"config defence.mode={mode!r}: expected one of {MODES}")
  if not 0.0 <= ratio <= 1.0:
    raise ValueError(f"config defence.ratio={ratio}: expected a fraction in [0, 1]")
  s = deform.settings(deform_cfg, loss="hinge", stop="none")

  def transform(params, batch, key):
    image, label = batch["image"], batch["label"]
    n_attack, n_sure, extra = _count(ratio, image.shape[0])
    if n_attack == 0:
      return batch
    init_key, scale_key, coin_key = jax.random.split(key, 3)
    x, y = image[:n_attack], label[:n_attack]
    if mode == "random":
      scale = jax.random.uniform(scale_key, (n_attack,) + (1,) * (x.ndim - 1), maxval=init_scale)
      z = deform.random_variables(init_key, x.shape, s)
      z = jax.tree.map(lambda v: v * scale.reshape((-1,) + (1,) * (v.ndim - 1)), z)
    else:
      z0 = deform.random_variables(init_key, x.shape, s, init_scale)
      # Hinge to target 0: push the soft Dice of the warped labels down as far as the budget allows.
      objective = deform.objective_fn(apply_fn, params, x, y, jnp.zeros(x.shape[:1]), s)
      z, _ = optimize(objective, z0, update=sign_step(step_size), steps=steps, project=deform.project)
    out = deform.transform(x, y, jax.lax.stop_gradient(z), s)
    index = jnp.arange(n_attack)
    keep = (index < n_sure) | ((index == n_sure) & (jax.random.uniform(coin_key) < extra))
    pick = lambda new, old: jnp.where(keep.reshape((-1,) + (1,) * (old.ndim - 1)), new.astype(old.dtype), old)
    return dict(batch, image=image.at[:n_attack].set(pick(jax.lax.stop_gradient(out["image"]), x)),
                label=label.at[:n_attack].set(pick(out["label"], y)))

  return transform
