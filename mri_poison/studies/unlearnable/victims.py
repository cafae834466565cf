"""Study 4's parts that its phase map shares: a victim's sub-config, protecting the training slices, the test
arrays and the per-case Dice of a victim on them."""
from __future__ import annotations

import copy
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mri_poison import cellstore
from mri_poison import metrics
from mri_poison.poison import protections
from mri_poison.train import evaluate as evaluate_lib

DICE = ("dice_WT", "dice_TC", "dice_ET", "dice_mean")


def sub_config(config, name: str, train: dict | None = None, data: dict | None = None, **extra):
  """The config one victim's `train_model` sees (its config.json records `extra` too)."""
  sub = ml_collections.ConfigDict()
  sub.victim = name
  sub.data = copy.deepcopy(config.data)
  if data:
    sub.data.update(data)
  sub.model = copy.deepcopy(config.model)
  sub.train = copy.deepcopy(config.train)
  if train:
    sub.train.update(train)
  for k, v in extra.items():
    setattr(sub, k, ml_collections.ConfigDict(v) if isinstance(v, dict) else copy.deepcopy(v))
  return sub


def protection_name(method: str, eps: float, config) -> str:
  """`method` at the study budget, `method@eps=<eps>` at another budget (a budget-sweep protection)."""
  return method if float(eps) == float(config.protect.eps) else f"{method}@eps={float(eps):.4g}"


def protect(method: str, config, workdir: str, data: dict, eps: float | None = None) -> tuple[np.ndarray, dict]:
  """(protected slice images (N, X, Y, C), info) for `method` (`mri_poison.poison.protections`) at `eps`
  (default protect.eps); trained protections are resumable fit runs in workdir/protect/<protection_name>."""
  p = config.protect
  eps = float(p.eps) if eps is None else float(eps)
  run_dir = os.path.join(workdir, "protect", protection_name(method, eps, config))
  return protections.get(method).run(protections.Inputs(config, data, eps, jax.random.PRNGKey(int(p.seed)), run_dir))


def test_arrays(cases) -> dict:
  """Stacked images and labels of `cases`, their ids and the digest a cell's key holds."""
  image = np.stack([c.image for c in cases]).astype(np.float32)
  label = np.stack([c.label for c in cases]).astype(np.int32)
  return {"image": image, "label": label, "case_id": [c.case_id for c in cases],
          "digest": cellstore.tree_digest((image, label))}


def score(apply_fn, params, test: dict, config) -> dict[str, np.ndarray]:
  """Per test case Dice of WT, TC, ET and their mean (whole-slice prediction of every axial slice)."""
  out = {k: [] for k in DICE}
  ev = config.eval
  for image, label in zip(test["image"], test["label"]):
    logits = evaluate_lib.predict_slices(apply_fn, params, image, batch=int(ev.slice_batch),
                                         multiple=int(ev.pad_multiple))
    pred = jnp.argmax(logits, axis=-1)[None]
    d = np.asarray(metrics.dice_from_counts(metrics.region_counts(pred, jnp.asarray(label)[None])))[0]
    for k, v in zip(DICE[:3], d):
      out[k].append(float(v))
    out["dice_mean"].append(float(np.mean(d)))
  return out
