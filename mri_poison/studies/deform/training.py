"""Study 3: the arms' configs, held-out data, and the trained models (victims, defended victims, generators)."""
from __future__ import annotations

import copy
import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from mri_poison import cellstore
from mri_poison.attacks import deform
from mri_poison.defenses import deform_augment
from mri_poison.models import deform as deform_models

ARMS = ("2d", "3d")
VICTIMS = ("undefended", "augmented")


def arm_config(config, arm: str) -> ml_collections.ConfigDict:
  """The config one arm trains with: config.data/model/train updated by config.arm<arm>."""
  a = config[f"arm{arm}"]
  sub = ml_collections.ConfigDict()
  sub.data = copy.deepcopy(config.data)
  sub.data.update(dict(a.data))
  for key in ("n_cases", "n_val"):
    if int(a.get(key, 0) or 0):
      sub.data[key] = int(a[key])
  sub.model = copy.deepcopy(config.model)
  sub.model.update(dict(a.model))
  sub.train = copy.deepcopy(config.train)
  sub.train.update(dict(a.train))
  return sub


def eval_data(cases, arm: str) -> dict:
  """Held-out arrays: 3d = whole volumes; 2d = each case's axial slice with the most tumour (one per case, so
  cases stay independent for the paired tests). Also each case's affine and the split's digest."""
  images, labels = [], []
  for c in cases:
    if c.label is None:
      raise ValueError(f"held-out case {c.case_id} has no label")
    if arm == "2d":
      z = int(np.argmax((c.label > 0).sum(axis=(0, 1))))
      images.append(c.image[:, :, z])
      labels.append(c.label[:, :, z])
    else:
      images.append(c.image)
      labels.append(c.label)
  shapes = {i.shape for i in images}
  if len(shapes) != 1:
    raise ValueError(f"held-out cases must share one grid (config data.shape); got {sorted(shapes)}")
  image, label = np.stack(images).astype(np.float32), np.stack(labels).astype(np.int32)
  return {"image": image, "label": label, "case_id": [c.case_id for c in cases],
          "affine": [np.asarray(c.affine) for c in cases], "modalities": tuple(cases[0].modalities),
          "digest": cellstore.tree_digest((image, label))}


@functools.lru_cache(maxsize=8)
def augment_transform(apply_fn, aug_json: str, deform_json: str):
  # One transform object per (model, settings): train_model's compiled step is cached by the hook's identity.
  import json
  return deform_augment.deform_batch_transform(apply_fn, json.loads(aug_json), json.loads(deform_json))


def train_victims(config, workdir: str, arm: str, train_cases) -> dict:
  """{"undefended": params[, "augmented": params]} of one arm, trained (or reused) in models/<arm>_<victim>."""
  import json
  from mri_poison.train import loop as train_loop
  from mri_poison.train import state as state_lib
  sub = arm_config(config, arm)
  out = {}
  path = lambda v: os.path.join(workdir, "models", f"{arm}_{v}")
  logging.info("deform: training %s/undefended in %s", arm, path("undefended"))
  out["undefended"] = train_loop.train_model(sub, path("undefended"), cases=train_cases)
  if arm in tuple(config.defence.arms):
    apply_fn = state_lib.make_apply_fn(state_lib.make_model(sub.model))
    aug = {k: v for k, v in config.defence.to_dict().items() if k != "arms"}
    transform = augment_transform(apply_fn, json.dumps(aug, sort_keys=True),
                                  json.dumps(config.deform.to_dict(), sort_keys=True))
    sub_aug = copy.deepcopy(sub)
    sub_aug.defence = copy.deepcopy(config.defence)
    sub_aug.deform = copy.deepcopy(config.deform)
    logging.info("deform: training %s/augmented in %s", arm, path("augmented"))
    out["augmented"] = train_loop.train_model(sub_aug, path("augmented"), cases=train_cases,
                                              batch_transform=transform)
  return out


@functools.lru_cache(maxsize=8)
def _generator_step(gen_model, seg_apply, s: deform.Settings, deltas: tuple, lr: float):
  tx = optax.adam(lr)
  return tx, deform.generator_step(lambda p, x, d: gen_model.apply({"params": p}, x, d), seg_apply, tx, s, deltas)


def generator_delta_range(config) -> tuple[float, float]:
  """(low, high) of the Deltas the generator trains on: generator.delta_range, () = the range of attack.deltas."""
  rng = tuple(float(d) for d in (config.generator.get("delta_range") or config.attack.deltas))
  return min(rng), max(rng)


def extra_generator_cases(config) -> int:
  """How many phantom cases of the attacker's own the generator also trains on: config generator.extra_cases when
  the study's data is the phantom (other data has no such supply: 0, and the report's protocol says so)."""
  return int(config.generator.get("extra_cases", 0)) if str(config.data.source) == "phantom" else 0


def generator_cases(config, data_cfg) -> list:
  """The extra cases (`extra_generator_cases`), built from seeds data.seed + generator.extra_seed + i: disjoint
  from the study's cases. Why: trained on the 12 training cases alone, the generator's Delta-dependence did not
  transfer to unseen cases (RESULTS.md 2026-12-08)."""
  n = extra_generator_cases(config)
  if not n:
    return []
  from mri_poison.data.datasets import load_splits
  extra = copy.deepcopy(data_cfg)
  extra.update(dict(seed=int(data_cfg.seed) + int(config.generator.extra_seed), n_cases=n, n_val=0))
  return list(load_splits(extra)["train"])


def train_generator(config, workdir: str, arm: str, train_cases, seg_params):
  """G(x, Delta) of one arm trained with `train.fit` against the frozen undefended model; returns its params."""
  from mri_poison.data.pipeline import train_iterator
  from mri_poison.train import parts
  from mri_poison.train import state as state_lib
  from mri_poison.train.trainer import fit
  sub = arm_config(config, arm)
  s = deform.settings(config.deform)
  n_channels = len(tuple(sub.data.modalities))
  gen_model = deform_models.make_generator(config.generator, s, n_channels)
  seg_apply = state_lib.make_apply_fn(state_lib.make_model(sub.model))
  deltas = generator_delta_range(config)
  tx, step = _generator_step(gen_model, seg_apply, s, deltas, float(config.generator.lr))
  steps = int(config[f"arm{arm}"].generator_steps)
  fit_cfg = ml_collections.ConfigDict()
  fit_cfg.data, fit_cfg.model = sub.data, sub.model
  fit_cfg.train = copy.deepcopy(sub.train)
  fit_cfg.train.update(dict(steps=steps, lr=float(config.generator.lr), ckpt_every=max(steps, 1)))
  fit_cfg.generator = copy.deepcopy(config.generator)
  fit_cfg.deform = copy.deepcopy(config.deform)
  fit_cfg.deltas = deltas
  init_key, rng = jax.random.split(jax.random.PRNGKey(int(config.seed) + 7))
  shape = (1, *(int(p) for p in sub.data.patch_shape), n_channels)
  params = gen_model.init(init_key, jnp.zeros(shape, jnp.float32), jnp.zeros((1,)))["params"]
  state = parts.init_state({"gen": parts.make_part(params, tx)}, rng)
  path = os.path.join(workdir, "models", f"{arm}_generator")
  logging.info("deform: training the %s generator in %s", arm, path)
  cases = list(train_cases) + generator_cases(config, sub.data)
  data = lambda: train_iterator(cases, sub.data, seed=int(sub.train.seed) + 1)
  final = fit(fit_cfg, path, init_state=state, step_fn=step, data=data, step_args=(seg_params,))
  return gen_model, final["gen"]["params"]
