"""Study 2: training the compared models (base, undefended, distilled via a teacher, adversarial)."""
from __future__ import annotations

import copy
import os
import time
from typing import Any

import ml_collections
from absl import logging

from mri_poison.defenses import adversarial as adv_lib
from mri_poison.defenses import distillation as distill_lib


MODELS = ("undefended", "distilled", "adversarial")

# ------------------------------------------------------------------------------------------------ training


def _sub_config(config, train_updates: dict | None = None, **extra) -> ml_collections.ConfigDict:
  """The config one `train_model` call sees (its config.json in models/<name> records `extra` too)."""
  sub = ml_collections.ConfigDict()
  sub.data = copy.deepcopy(config.data)
  sub.model = copy.deepcopy(config.model)
  sub.train = copy.deepcopy(config.train)
  if train_updates:
    sub.train.update(train_updates)
  for k, v in extra.items():
    setattr(sub, k, copy.deepcopy(v))
  return sub


def _steps(config) -> dict[str, int]:
  """Training steps of every model (the rules of `train_models`)."""
  warm = str(config.distill.get("init", "scratch")) == "scaled_base"
  fine_tune = str(config.adversarial.init) == "base"
  base = int(config.train.steps)
  distill = int(config.distill.steps) or (max(base // 2, 1) if warm else base)
  adv = int(config.adversarial.train_steps) or (max(base // 2, 1) if fine_tune else base)
  return {"base": base, "distill": distill, "adversarial": adv, "warm": warm, "fine_tune": fine_tune}


def training_budgets(config) -> dict[str, str]:
  """{model folder: its training budget in words} for the report."""
  s = _steps(config)
  adv = config.adversarial
  start = lambda: "from `base`" if s["fine_tune"] else "from scratch"
  dstart = "from `base` with logits x T" if s["warm"] else "from scratch"
  t = float(config.distill.temperature)
  return {
      "base": f"{s['base']} steps from random init, clean",
      "undefended": f"{s['adversarial']} steps {start()}, clean",
      "teacher": f"{s['distill']} steps {dstart}, at T = {t:g}",
      "distilled": f"{s['distill']} steps {dstart}, at T = {t:g} on the teacher's soft labels",
      "adversarial": (f"{s['adversarial']} steps {start()}, {str(adv.attack).upper()} at eps {float(adv.eps):g} "
                      f"on {adv_lib.mix_ratio(adv):.0%} of each batch"),
  }


def trained_models(config, workdir: str) -> dict[str, Any]:
  """{MODELS: params} of models already trained to the end in workdir/models, read without taking any lock
  (array tasks read them side by side); one error naming config eval.cells when one is missing or unfinished."""
  import json
  from mri_poison.train import loop as train_loop
  params = {}
  for name in MODELS:
    path = os.path.join(workdir, "models", name)
    manifest = os.path.join(path, "manifest.json")
    runs = json.load(open(manifest)).get("runs", []) if os.path.exists(manifest) else []
    if not runs or runs[-1].get("status") != "finished":
      raise FileNotFoundError(
          f"config eval.cells={config.eval.cells!r}: model {name} is not trained to the end in {path}; train the "
          "models first (the same command with --config.eval.cells=none, or a full run)")
    params[name] = train_loop.load_model(path)[1]
  return params


def train_models(config, workdir: str, train_cases) -> dict[str, Any]:
  """{"base", "undefended", "teacher", "distilled", "adversarial"} params, trained (or resumed) in models/<name>.

  Every compared model gets the same number of steps: "base" is trained for train.steps, then the undefended
  model, the distillation pair and the adversarial model each continue from it for the same fine-tuning budget
  (with the default warm starts), so a defence's effect is not confounded with extra training.
  """
  from mri_poison.train import loop as train_loop
  from mri_poison.train import state as state_lib
  apply_fn = state_lib.make_apply_fn(state_lib.make_model(config.model))
  models_dir = os.path.join(workdir, "models")
  t = float(config.distill.temperature)
  warm = str(config.distill.get("init", "scratch")) == "scaled_base"
  distill_steps = int(config.distill.steps) or (max(int(config.train.steps) // 2, 1) if warm
                                                 else int(config.train.steps))
  distill_train = dict(steps=distill_steps, warmup_steps=min(int(config.train.warmup_steps), distill_steps // 10))
  adv = config.adversarial
  fine_tune = str(adv.init) == "base"
  adv_steps = int(adv.train_steps) or (max(int(config.train.steps) // 2, 1) if fine_tune else int(config.train.steps))
  adv_train = dict(steps=adv_steps, lr=float(adv.lr) or float(config.train.lr),
                   warmup_steps=min(int(config.train.warmup_steps), adv_steps // 10))

  params = {}
  t0 = time.perf_counter()
  plan = ("base", "undefended", "teacher", "distilled", "adversarial")

  def log_start(name):
    note = (f" (its logged loss is the T^2-scaled distillation loss, T = {t:g}: divide by {t * t:g} to compare)"
            if name == "distilled" else "")
    logging.info("robustify: training %s (%d/%d) in %s; %.0f s so far%s", name, plan.index(name) + 1, len(plan),
                 os.path.join(models_dir, name), time.perf_counter() - t0, note)

  log_start("base")
  params["base"] = train_loop.train_model(_sub_config(config), os.path.join(models_dir, "base"), cases=train_cases)
  log_start("undefended")
  params["undefended"] = train_loop.train_model(
      _sub_config(config, adv_train), os.path.join(models_dir, "undefended"), cases=train_cases,
      init_params=params["base"] if fine_tune else None)
  log_start("teacher")
  params["teacher"] = train_loop.train_model(
      _sub_config(config, distill_train, distill=config.distill), os.path.join(models_dir, "teacher"),
      cases=train_cases, loss_fn=distill_lib.teacher_loss(t, str(config.distill.teacher_loss)),
      init_params=distill_lib.scale_output_layer(params["base"], t) if warm else None)
  log_start("distilled")
  params["distilled"] = train_loop.train_model(
      _sub_config(config, distill_train, distill=config.distill), os.path.join(models_dir, "distilled"),
      cases=train_cases, loss_fn=distill_lib.distillation_loss(t, hard_weight=float(config.distill.hard_weight)),
      batch_transform=distill_lib.distillation_batch_transform(apply_fn, t), hook_params=params["teacher"],
      init_params=distill_lib.scale_output_layer(params["base"], t) if warm else None)
  log_start("adversarial")
  params["adversarial"] = train_loop.train_model(
      _sub_config(config, adv_train, adversarial=adv), os.path.join(models_dir, "adversarial"), cases=train_cases,
      batch_transform=adv_lib.adversarial_batch_transform(apply_fn, adv),
      init_params=params["base"] if fine_tune else None)
  logging.info("robustify: models ready in %.0f s", time.perf_counter() - t0)
  return params
