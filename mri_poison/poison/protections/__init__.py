"""The protections of study 4 (unlearnable examples), chosen by name from config (`protect.methods`).

A protection is one `Protection` entry, registered by a module of this package (all of them are imported on
first use): adding one is a new module here plus its name in a config. `run(inputs)` returns the protected
training slices (N, X, Y, C) and a dict of what it measured (e.g. a trained protection's convergence);
trained protections keep a resumable `trainer.fit` run in `inputs.run_dir`.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from mri_poison.poison import unlearnable as ul
from mri_poison.registry import Registry
from mri_poison.train import state as state_lib

NONE = "none"  # the clean training data: every study's reference


@dataclasses.dataclass(frozen=True)
class Inputs:
  """config: the study's config (protect.*, surrogate, model, data); data: the training slices {"image",
  "label", ...} (numpy); eps: the L-inf budget; key: jax.random.PRNGKey(protect.seed); run_dir: the folder of
  a trained protection's resumable run."""
  config: Any
  data: dict
  eps: float
  key: jax.Array
  run_dir: str

  def stream(self, number: int) -> jax.Array:
    return jax.random.fold_in(self.key, number)

  @property
  def n_classes(self) -> int:
    return int(self.config.model.out_channels)


@dataclasses.dataclass(frozen=True)
class Protection:
  """name: its config name; order: where reports list it (the clean reference first); text: one line for
  reports; run: see the module doc; trained: whether it fits a surrogate (its info then has the hallmark)."""
  name: str
  order: int
  text: str
  run: Callable[[Inputs], tuple[np.ndarray, dict]]
  trained: bool = False


def surrogate(config, shape):
  """(the surrogate model of config.surrogate, init(key) -> its params for slices of `shape`)."""
  model = state_lib.make_model(config.surrogate)
  return model, (lambda key: state_lib.init_params(model, key, (1,) + tuple(shape)))


def fit_config(config, name: str, steps: int, **extra) -> ml_collections.ConfigDict:
  """The config of a trained protection's `trainer.fit` run (its config.json records what it depends on)."""
  sub = ml_collections.ConfigDict()
  sub.protect = copy.deepcopy(config.protect)
  sub.surrogate = copy.deepcopy(config.surrogate)
  sub.data = copy.deepcopy(config.data)
  sub.method = name
  sub.train = ml_collections.ConfigDict(dict(steps=int(steps), log_every=max(int(steps) // 5, 1),
                                             ckpt_every=int(steps), keep_checkpoints=1, seed=int(config.protect.seed)))
  for k, v in extra.items():
    setattr(sub, k, v)
  return sub


def fitted(apply_fn, params, images, data: dict, hallmark_max: float) -> dict:
  """The hallmark of a working protection: did the surrogate fit the protected data far better than the clean?"""
  ce_p = ul.surrogate_ce(apply_fn, params, images, data["label"])
  ce_c = ul.surrogate_ce(apply_fn, params, data["image"], data["label"])
  ratio = ce_p / max(ce_c, 1e-12)
  return {"surrogate_ce_protected": ce_p, "surrogate_ce_clean": ce_c, "hallmark": ratio,
          "converged": bool(ratio <= float(hallmark_max))}


_REGISTRY: Registry[Protection] = Registry(__name__, "protection", lambda p: (p.order, p.name))


def register(protection: Protection) -> Protection:
  return _REGISTRY.add(protection)


def names() -> tuple[str, ...]:
  """Every registered protection, the clean reference first."""
  return _REGISTRY.names()


def get(name: str) -> Protection:
  return _REGISTRY.get(name)
