"""Defensive distillation (Papernot et al. 2016) as `train_model` hooks.

1. Teacher: trained with its logits divided by T (`teacher_loss(T)`), i.e. a softmax at temperature T.
2. Student: trained at temperature T on the teacher's soft per-voxel probabilities at T
   (`distillation_batch_transform` adds batch["soft_target"] inside the jitted step; `distillation_loss(T)`
   is T^2 * CE(soft_target, softmax(logits / T)), `mri_poison.losses.distillation`).
3. Deployment: the student at T = 1 (plain `apply_fn(params, x)`), whose logits are ~T times larger than a
   normally trained model's, so its softmax saturates and input gradients shrink (the defence; also why
   attacks on distilled models need care: Carlini & Wagner 2016).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from mri_poison import losses

DEFAULT_TEMPERATURE = 20.0  # default chosen here (Papernot et al. used T up to 100 on images)


def soft_targets(apply_fn, params, image, temperature) -> jax.Array:
  """Teacher probabilities softmax(logits / T) (B, *S, K), gradient-stopped."""
  logits = apply_fn(params, image, temperature=temperature)
  if isinstance(logits, (tuple, list)):
    logits = logits[0]
  return jax.lax.stop_gradient(jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1))


def distillation_batch_transform(teacher_apply: Callable, temperature: float = DEFAULT_TEMPERATURE):
  """`batch_transform(params, batch, key, teacher_params)` adding batch["soft_target"] at temperature T.

  teacher_apply(params, x, *, temperature) -> logits (`train.state.make_apply_fn`). Train the student with
  `train_model(..., batch_transform=this, hook_params=teacher_params)`: the teacher's weights are then an
  argument of the compiled step, not constants baked into it (which at 128^3 would slow compilation).
  """
  t = float(temperature)
  if t <= 0:
    raise ValueError(f"distillation temperature must be > 0, got {temperature}")

  def transform(params, batch, key, teacher_params):
    del params, key
    return dict(batch, soft_target=soft_targets(teacher_apply, teacher_params, batch["image"], t))

  return transform


def distillation_loss(temperature: float = DEFAULT_TEMPERATURE, *, hard_weight: float = 0.0,
                      hard_loss: str = "ce_dice") -> Callable:
  """`loss_fn(logits, batch) -> (B,)`: T^2 CE to batch["soft_target"] at temperature T.

  `hard_weight` > 0 adds hard_weight * `losses.<hard_loss>`(logits / T, labels) (Hinton et al.'s mixed
  objective); 0 (default) is Papernot et al.'s soft-label-only student. A deep-supervision tuple is reduced
  to its full-resolution output.
  """
  t = float(temperature)
  if t <= 0:
    raise ValueError(f"distillation temperature must be > 0, got {temperature}")
  if hard_loss not in losses.TRAINING_LOSSES:
    raise ValueError(f"hard loss {hard_loss!r}: expected one of {losses.TRAINING_LOSSES}")
  hard = getattr(losses, hard_loss)

  def loss_fn(logits, batch):
    if isinstance(logits, (tuple, list)):
      logits = logits[0]
    mask = batch.get("mask")
    loss = losses.distillation(logits, batch["soft_target"], t, mask)
    if hard_weight:
      loss = loss + hard_weight * hard(logits / t, batch["label"], mask)
    return loss

  return loss_fn


def teacher_loss(temperature: float = DEFAULT_TEMPERATURE, base: str = "ce_dice") -> Callable:
  """`loss_fn(logits, batch) -> (B,)`: `losses.<base>` on logits / T (the teacher trained at temperature T)."""
  t = float(temperature)
  if t <= 0:
    raise ValueError(f"distillation temperature must be > 0, got {temperature}")
  if base not in losses.TRAINING_LOSSES:
    raise ValueError(f"teacher loss {base!r}: expected one of {losses.TRAINING_LOSSES}")
  base_fn = getattr(losses, base)

  def loss_fn(logits, batch):
    mask = batch.get("mask")
    if isinstance(logits, (tuple, list)):
      return losses.deep_supervision_loss(base_fn, [l / t for l in logits], batch["label"], mask)
    return base_fn(logits / t, batch["label"], mask)

  return loss_fn


def scale_output_layer(params, factor: float, prefixes=("final_conv", "aux_head")):
  """Params with the output 1x1 conv(s) (kernel and bias) multiplied by `factor`: logits x factor.

  A model trained at T = 1 whose output layer is scaled by T has, at temperature T, exactly the original
  softmax: a warm start for a teacher / student at T. Training from scratch at T = 20 must first grow the
  logits 20-fold, which short runs never finish (the study's `distill.init="scaled_base"`).
  """
  def scale(path, leaf):
    top = getattr(path[0], "key", str(path[0]))
    return leaf * factor if any(str(top).startswith(p) for p in prefixes) else leaf
  return jax.tree_util.tree_map_with_path(scale, params)
