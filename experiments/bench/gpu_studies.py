"""Part 5 of gpu_check: a few training steps of what each study trains, at its `brats` size, on the phantom.

Each study's `brats` config (experiments/configs/<study>.py:brats) is read as it is, with data.source switched
to "phantom" (the embedded phantom at the variant's full grid: no BraTS folder on the GPU machine), a handful
of cases, and every training stage cut to a few steps. The stages are the study's own entry points (the same
functions its `run(config, workdir)` calls), so the compiled programs, batch sizes, grids and dtypes are the
study's. What a stage reports comes from its own metrics.jsonl (`fit` logs steps/s with log_every = 1): the
first row holds the compile, the median of the later rows is the steady rate (data pipeline included).

A whole `run()` (evaluation, attacks, report) is not smoked here: at full size its many compiles alone take
longer than a short GPU loan; part 6 covers the sliding-window evaluation and attack at BraTS size.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import os
import statistics
import time

import ml_collections

STUDIES = ("robustify", "poison", "deform", "unlearnable")


def _rates(workdir: str) -> dict:
  path = os.path.join(workdir, "metrics.jsonl")
  rows = [json.loads(line) for line in open(path) if line.strip()] if os.path.exists(path) else []
  rows = [r for r in rows if "steps_per_sec" in r]
  if not rows:
    return {"steps": 0}
  later = [float(r["steps_per_sec"]) for r in rows[1:]]
  return {"steps": int(rows[-1]["step"]), "first_step_s": float(rows[0]["elapsed_s"]),
          "steps_per_s": statistics.median(later) if later else None}


def _stage(name: str, workdir: str, fn, report) -> dict:
  t = time.perf_counter()
  fn()
  out = {**_rates(workdir), "wall_s": time.perf_counter() - t}
  rate = f"{out['steps_per_s']:.2f} steps/s" if out.get("steps_per_s") else "no steady rate"
  report(f"  {name}: {out['steps']} steps, first step (compile) {out.get('first_step_s', float('nan')):.1f} s, "
         f"{rate}, stage {out['wall_s']:.1f} s")
  return out


def _train_cfg(train, steps: int):
  train.update(dict(steps=int(steps), log_every=1, ckpt_every=int(steps), keep_checkpoints=1, eval_every=0))


def _model_cfg(model, features, dtype):
  """CPU rehearsals: narrower models (features) and float32 (bfloat16 is emulated, slowly, on CPU)."""
  if features:
    model.features = tuple(int(f) for f in features)
  if dtype:
    model.dtype = str(dtype)


def _phantom_data(d, *, n_cases: int, edge, threads):
  """data.source = phantom with n_cases (1 held out); with `edge`, every grid shrunk to edge (CPU rehearsals)."""
  d.update(dict(source="phantom", root="", n_cases=int(n_cases), n_val=1))
  # The GPU machine gets no nilearn (its wheels with scikit-learn and pandas would not fit the 64 MiB carried
  # there, see gpu_prepare.sh): the v2 phantom then draws its procedural head; the grids are the same.
  if "phantom" in d and importlib.util.find_spec("nilearn") is None:
    d.phantom.anatomy = "procedural"
  if edge:
    d.phantom_shape = (int(edge),) * 3
    d.shape = (int(edge),) * 3
    d.patch_shape = (int(edge),) * len(tuple(d.patch_shape))
  if threads:
    d.update(dict(read_threads=int(threads), prefetch=2))


def _sub(config, **extra) -> ml_collections.ConfigDict:
  """The {data, model, train (+ extra)} config one `train_model` call sees, as the studies build it."""
  sub = ml_collections.ConfigDict()
  for key in ("data", "model", "train"):
    setattr(sub, key, copy.deepcopy(config[key]))
  for key, value in extra.items():
    setattr(sub, key, copy.deepcopy(value))
  return sub


def robustify(workdir, *, steps, n_cases, edge=None, features=None, threads=None, dtype=None,
              report=print) -> dict:
  """The base model (clean) and adversarial training (PGD inside the step), 3D, as train_models trains them."""
  from experiments.configs import robustify as cfg_lib
  from mri_poison.data.datasets import load_splits
  from mri_poison.defenses import adversarial as adv_lib
  from mri_poison.train import loop, state as state_lib
  config = cfg_lib.get_config("brats")
  _phantom_data(config.data, n_cases=n_cases, edge=edge, threads=threads)
  _model_cfg(config.model, features, dtype)
  _train_cfg(config.train, steps)
  cases = load_splits(config.data)["train"]
  apply_fn = state_lib.make_apply_fn(state_lib.make_model(config.model))
  adv = config.adversarial
  report(f"robustify brats: grid {tuple(config.data.shape)}, patch {tuple(config.data.patch_shape)}, batch "
         f"{config.data.batch_size}, features {tuple(config.model.features)}, {config.model.dtype}; adversarial "
         f"{adv.attack} eps {adv.eps} x {adv.steps} steps")
  out = {}
  base_dir, adv_dir = os.path.join(workdir, "base"), os.path.join(workdir, "adversarial")
  out["base"] = _stage("base (clean)", base_dir, lambda: loop.train_model(_sub(config), base_dir, cases=cases), report)
  out["adversarial"] = _stage(
      "adversarial training", adv_dir,
      lambda: loop.train_model(_sub(config, adversarial=adv), adv_dir, cases=cases,
                               batch_transform=adv_lib.adversarial_batch_transform(apply_fn, adv)), report)
  return out


def poison(workdir, *, steps, n_cases, edge=None, features=None, threads=None, dtype=None,
           report=print) -> dict:
  """The translation GAN and one stacked sweep of the six segmenters (real slices for all), 2D slices."""
  from experiments.configs import poison as cfg_lib
  from mri_poison.data.datasets import load_splits
  from mri_poison.poison import translation
  from mri_poison.studies.poison import training, translator
  config = cfg_lib.get_config("brats")
  _phantom_data(config.data, n_cases=n_cases, edge=edge, threads=threads)
  _model_cfg(config.model, features, dtype)
  if features:
    config.gan.model.update(dict(features=int(features[0]), n_res=1, disc_features=int(features[0])))
  _train_cfg(config.train, steps)
  _train_cfg(config.gan.train, steps)
  cases = load_splits(config.data)["train"]
  _, target = translation.channels(config.gan, config.data.modalities)
  m = len(tuple(config.sweep.ks))
  report(f"poison brats: slices {tuple(config.data.patch_shape)}, GAN batch {config.gan.train.batch_size} (width "
         f"{config.gan.model.features}), {m} segmenters batch {config.data.batch_size}, features "
         f"{tuple(config.model.features)}, {config.model.dtype}")
  out = {}
  gan_dir = os.path.join(workdir, "models", "gan")
  out["gan"] = _stage("translation GAN", gan_dir, lambda: translator.train(config, workdir, cases), report)
  sub = training.segmenter_config(config, 0)
  real = training.target_only(cases, target, str(config.gan.target))
  sweep_dir = os.path.join(workdir, "sweep")
  out["segmenters_stacked"] = _stage(f"{m} segmenters (vmapped)", sweep_dir,
                                     lambda: training.train_sweep(sub, sweep_dir, [real] * m, stacked=True), report)
  return out


def deform(workdir, *, steps, n_cases, edge=None, features=None, threads=None, dtype=None,
           report=print) -> dict:
  """The 3D arm's victims: undefended, and augmented with adversarial deformations (a batch_transform)."""
  from experiments.configs import deform as cfg_lib
  from mri_poison.data.datasets import load_splits
  from mri_poison.studies.deform import training
  config = cfg_lib.get_config("brats")
  arm = config.arm3d
  _phantom_data(config.data, n_cases=n_cases, edge=edge, threads=threads)
  arm.update(dict(n_cases=int(n_cases), n_val=1))
  if edge:
    arm.data.update(dict(shape=(int(edge),) * 3, patch_shape=(int(edge),) * 3))
  _model_cfg(config.model, None, dtype)
  _model_cfg(arm.model, features, dtype)
  _train_cfg(arm.train, steps)
  config.defence.arms = ("3d",)
  sub = training.arm_config(config, "3d")
  cases = load_splits(sub.data)["train"]
  report(f"deform brats, 3D arm: grid {tuple(sub.data.shape)}, patch {tuple(sub.data.patch_shape)}, batch "
         f"{sub.data.batch_size}, features {tuple(sub.model.features)}, {sub.model.dtype}")
  out, t = {}, time.perf_counter()
  training.train_victims(config, workdir, "3d", cases)
  for victim in ("undefended", "augmented"):
    out[victim] = _rates(os.path.join(workdir, "models", f"3d_{victim}"))
  out["wall_s"] = time.perf_counter() - t
  for victim in ("undefended", "augmented"):
    o = out[victim]
    report(f"  3d/{victim}: {o['steps']} steps, first step (compile) {o.get('first_step_s', float('nan')):.1f} s, "
           f"{o.get('steps_per_s') or float('nan'):.2f} steps/s")
  return out


def unlearnable(workdir, *, steps, n_cases, edge=None, features=None, threads=None, dtype=None,
                report=print) -> dict:
  """Min-min protection of the training slices (surrogate + noise, one fit) and one victim on them, 2D."""
  import numpy as np
  from experiments.configs import unlearnable as cfg_lib
  from mri_poison.data.datasets import load_splits
  from mri_poison.poison import unlearnable as ul
  from mri_poison.studies.unlearnable import victims
  from mri_poison.train import loop
  config = cfg_lib.get_config("brats")
  _phantom_data(config.data, n_cases=n_cases, edge=edge, threads=threads)
  _model_cfg(config.model, features, dtype)
  _model_cfg(config.surrogate, features, dtype)
  _train_cfg(config.train, steps)
  config.protect.minmin.update(dict(steps=int(steps), train_steps=2))  # `steps` rounds of 2 surrogate steps
  cases = load_splits(config.data)["train"]
  data = ul.slice_set(cases, width=int(config.protect.umed.width))
  report(f"unlearnable brats: {len(data['image'])} training slices {tuple(np.shape(data['image'])[1:])}, protect "
         f"batch {config.protect.batch}, victim batch {config.data.batch_size}, features "
         f"{tuple(config.model.features)}, {config.model.dtype}")
  out = {}
  protect_dir = os.path.join(workdir, "protect", "minmin")
  holder = {}

  def protect():
    holder["images"], _ = victims.protect("minmin", config, workdir, data)
  out["minmin"] = _stage("min-min protection", protect_dir, protect, report)
  protected = ul.to_volumes(cases, data, holder["images"])
  victim_dir = os.path.join(workdir, "victim")
  out["victim"] = _stage("victim on protected data", victim_dir,
                         lambda: loop.train_model(_sub(config), victim_dir, cases=protected), report)
  return out
