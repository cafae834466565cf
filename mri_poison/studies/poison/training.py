"""Study 1: the segmenters of a sweep (one per synthetic share), trained as ONE vmapped program or one by one.

Every model of a sweep has the same seed, init, schedule and data stream (the same records in the same order,
the same slices and patches: synthetic cases keep the real case's head mask and labels), so the synthetic
share is the only variable. `train_sweep` stacks the M models (`train.parts.stack`) and steps them with
`train.parts.stacked_step` on (B, M, ...) batches from `data.stack_datasets`; the sequential fallback trains
each with `train.train_model` (same init, same stream) and gives the same models up to float rounding.
"""
from __future__ import annotations

import copy
import functools
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from mri_poison import losses
from mri_poison.data.case import Case
from mri_poison.train import loop
from mri_poison.train import parts
from mri_poison.train import state as state_lib
from mri_poison.train import trainer

ET_LABEL = 3  # enhancing tumour in the data contract


def et_bce_dice(logits, batch):
  """Binary enhancing-tumour loss: sigmoid BCE + soft Dice of the 1-channel logits vs label == 3 -> (B,)."""
  logits = jnp.asarray(logits, jnp.float32)
  if logits.shape[-1] != 1:
    raise ValueError(f"the ET segmenter needs 1 output channel (config model.out_channels=1), got {logits.shape}")
  target = (batch["label"] == ET_LABEL).astype(jnp.float32)[..., None]
  bce = losses.masked_mean((jax.nn.softplus(logits) - logits * target)[..., 0])
  return bce + losses.soft_dice_loss(jax.nn.sigmoid(logits), target)


def target_only(cases, channel: int, name: str) -> list[Case]:
  """The cases reduced to one image channel (the segmenter's input contrast)."""
  return [c.replace(image=np.ascontiguousarray(c.image[..., channel:channel + 1]), modalities=(name,))
          for c in cases]


def segmenter_config(config, seed: int, **extra) -> ml_collections.ConfigDict:
  """The config one sweep's training sees: 2D whole slices of the target contrast, config.model/train, `seed`."""
  sub = ml_collections.ConfigDict()
  sub.data = copy.deepcopy(config.data)
  sub.data.modalities = (str(config.gan.target),)
  sub.data.mode = "2d"
  sub.model = copy.deepcopy(config.model)
  sub.train = copy.deepcopy(config.train)
  sub.train.seed = int(seed)
  for k, v in extra.items():
    setattr(sub, k, copy.deepcopy(v))
  return sub


@functools.lru_cache(maxsize=8)
def _steps(model, train_json: str):
  # One step object per (model, train config): fit's jit cache is keyed by the step, so every seed and mode
  # of a study reuses one compiled stacked program.
  train_cfg = ml_collections.ConfigDict(json.loads(train_json))
  tx = state_lib.make_optimizer(train_cfg)
  step = loop.train_step_fn(model, tx, et_bce_dice, schedule=state_lib.lr_schedule(train_cfg))
  return tx, parts.stacked_step(step, batch_axis=1)


def initial_state(sub) -> dict:
  """The one-model initial state of a sweep: init and stream keys from config train.seed (as train_model)."""
  model = state_lib.make_model(sub.model)
  tx, _ = _steps(model, json.dumps(sub.train.to_dict(), sort_keys=True))
  init_key, train_key = jax.random.split(jax.random.PRNGKey(int(sub.train.seed)))
  params = state_lib.init_params(model, init_key, state_lib.input_shape(sub.data))
  return state_lib.init_state(params, tx, train_key)


def train_stacked(sub, workdir: str, case_sets) -> list:
  """Params of M models (one per case set) trained as one vmapped program with `fit` in `workdir`."""
  from mri_poison.data.pipeline import stack_datasets, train_dataset
  model = state_lib.make_model(sub.model)
  _, step = _steps(model, json.dumps(sub.train.to_dict(), sort_keys=True))
  seed = int(sub.train.seed)
  data = lambda: iter(stack_datasets([train_dataset(c, sub.data, seed=seed) for c in case_sets]))
  final = trainer.fit(sub, workdir, init_state=parts.stack(initial_state(sub), len(case_sets)), step_fn=step,
                      data=data)
  final = jax.device_get(final)
  return [parts.unstack(final, m)["params"] for m in range(len(case_sets))]


def train_sequential(sub, workdir: str, case_sets) -> list:
  """The fallback: the same M models trained one by one with `train.train_model` in workdir/model_<m>."""
  return [jax.device_get(loop.train_model(sub, os.path.join(workdir, f"model_{m}"), cases=cases,
                                          loss_fn=et_bce_dice))
          for m, cases in enumerate(case_sets)]


def stacked_fits(sub, n_models: int) -> bool:
  """Whether M stacked models fit in device memory (a rough activation estimate; always True without stats)."""
  try:
    stats = jax.local_devices()[0].memory_stats() or {}
  except Exception:  # pylint: disable=broad-except  (backends without memory stats)
    stats = {}
  limit = stats.get("bytes_limit")
  if not limit:
    return True
  pixels = float(np.prod([int(p) for p in sub.data.patch_shape]))
  per_model = int(sub.data.batch_size) * pixels * sum(int(f) for f in sub.model.features) * 4 * 24
  return n_models * per_model < 0.5 * float(limit)


def train_sweep(sub, workdir: str, case_sets, *, stacked: str | bool = "auto") -> list:
  """Params per case set: vmapped (stacked True / "true"), sequential (False / "false") or by memory ("auto")."""
  stacked = {"true": True, "false": False}.get(stacked, stacked) if isinstance(stacked, str) else stacked
  if stacked == "auto":
    stacked = stacked_fits(sub, len(case_sets))
    if not stacked:
      logging.warning("poison sweep: %d stacked models would not fit in device memory; training them one by one",
                      len(case_sets))
  if stacked not in (True, False):
    raise ValueError(f"config sweep.stacked={stacked!r}: expected 'auto', 'true' or 'false'")
  return (train_stacked if stacked else train_sequential)(sub, workdir, case_sets)
