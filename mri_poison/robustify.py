"""Study 2: gradient attacks on a 3D U-Net and two defences (arXiv 1908.00656, J Digit Imaging 2021).

`run(config, workdir)` trains (or reuses, from workdir/models/*) three 3D U-Nets on 4 contrasts -> 4 labels:
an undefended one ("undefended"), a defensively distilled student ("distilled", its teacher in models/teacher)
and an adversarially trained one ("adversarial"); evaluates each on whole validation volumes, clean and under
FGSM, i-FGSM, targeted i-FGSM, PGD, SegPGD, CosPGD and random sign noise over an eps grid (z-score units, brain
voxels only; each attack's eps grid is one compiled call), and writes per-case Dice, summaries, Wilcoxon
signed-rank tests, the 3D AutoAttack-style robust fraction, sanity checks, figures, a few adversarial NIfTI
volumes and report.md. Every file is written atomically; a rerun reuses finished models and evaluations.
"""
from __future__ import annotations

import copy
import datetime
import json
import os
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from mri_poison import io_utils
from mri_poison import metrics
from mri_poison.attacks import gradient
from mri_poison.attacks import losses as attack_losses
from mri_poison.attacks import sanity
from mri_poison.attacks.eps_sweep import sweep
from mri_poison.data.case import REGIONS
from mri_poison.defenses import adversarial as adv_lib
from mri_poison.defenses import distillation as distill_lib
from mri_poison.report import figures
from mri_poison.report import markdown
from mri_poison.report import nifti
from mri_poison.report import tables

MODELS = ("undefended", "distilled", "adversarial")
ATTACKS = ("fgsm", "ifgsm", "ifgsm_targeted", "pgd", "segpgd", "cospgd")
NOISE = "random_sign"  # same-eps random sign noise: the baseline every attack must beat
TARGETS = ("erase_tumour", "et_to_oedema", "least_likely")
DICE_COLUMNS = tuple(f"dice_{r}" for r in REGIONS) + ("dice_mean",)
ATTACK_TEXT = {
    "fgsm": "FGSM: x + eps sign(grad CE) (one step)",
    "ifgsm": "i-FGSM / BIM: N sign steps of alpha, projected on the eps-ball",
    "ifgsm_targeted": "targeted i-FGSM: N sign steps decreasing CE to the target map",
    "pgd": "PGD: i-FGSM from a uniform random start in the eps-ball",
    "segpgd": "SegPGD: PGD on CE re-weighted from correct to wrong voxels, lambda_t = (t-1)/(2N)",
    "cospgd": "CosPGD: PGD on CE weighted by stop-grad cos(softmax, one-hot label)",
    NOISE: "random sign noise: x + eps * random signs (baseline)",
}


# ------------------------------------------------------------------------------------------------ config


def _check_config(config) -> None:
  attacks = tuple(config.attack.attacks)
  unknown = [a for a in attacks if a not in ATTACKS]
  if unknown or not attacks:
    raise ValueError(f"config attack.attacks={attacks}: expected a non-empty subset of {ATTACKS}")
  eps = tuple(float(e) for e in config.attack.eps)
  if not eps or min(eps) <= 0:
    raise ValueError(f"config attack.eps={eps}: expected positive budgets (z-score units)")
  if str(config.attack.target) not in TARGETS:
    raise ValueError(f"config attack.target={config.attack.target!r}: expected one of {TARGETS}")
  if int(config.attack.steps) < 1 or int(config.attack.restarts) < 1 or int(config.attack.batch) < 1:
    raise ValueError("config attack.steps, attack.restarts and attack.batch must be >= 1")
  if str(config.distill.get("init", "scratch")) not in ("scaled_base", "scratch"):
    raise ValueError(f"config distill.init={config.distill.init!r}: expected 'scaled_base' or 'scratch'")
  if str(config.adversarial.init) not in ("base", "scratch"):
    raise ValueError(f"config adversarial.init={config.adversarial.init!r}: expected 'base' or 'scratch'")
  if float(config.distill.temperature) <= 0:
    raise ValueError(f"config distill.temperature={config.distill.temperature}: expected > 0")
  if str(config.eval.example_attack) not in ATTACKS:
    raise ValueError(f"config eval.example_attack={config.eval.example_attack!r}: expected one of {ATTACKS}")


def _config_dict(config) -> dict:
  return json.loads(json.dumps(config.to_dict(), default=io_utils._json_default))  # pylint: disable=protected-access


def _digest(obj) -> str:
  import hashlib
  text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=io_utils._json_default)  # pylint: disable=protected-access
  return hashlib.sha256(text.encode()).hexdigest()[:16]


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


def train_models(config, workdir: str, train_cases) -> dict[str, Any]:
  """{"base", "undefended", "teacher", "distilled", "adversarial"} params, trained (or resumed) in workdir/models/<name>.

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
    logging.info("robustify: training %s (%d/%d) in %s; %.0f s so far", name, plan.index(name) + 1, len(plan),
                 os.path.join(models_dir, name), time.perf_counter() - t0)

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


# ------------------------------------------------------------------------------------------------ attacks


def make_target(kind: str, apply_fn, params, x, labels):
  if kind == "erase_tumour":
    return attack_losses.target_erase_tumour(labels)
  if kind == "et_to_oedema":
    return attack_losses.target_et_to_oedema(labels)
  if kind == "least_likely":
    return attack_losses.target_least_likely(apply_fn, params, x)
  raise ValueError(f"config attack.target={kind!r}: expected one of {TARGETS}")


def attack_volumes(name: str, apply_fn, params, x, labels, brain, eps, attack_cfg, key, target=None):
  """x_adv (E, B, *S, C) for every eps of `eps` (E,) in one compiled call, and the loop's loss history or None.

  Untargeted attacks increase CE to `labels` over brain voxels; "ifgsm_targeted" decreases CE to `target`.
  """
  steps, frac = int(attack_cfg.steps), float(attack_cfg.step_frac)
  chunk = int(attack_cfg.get("eps_chunk", 0)) or None
  eps = jnp.asarray(eps, jnp.float32)
  common = dict(eps=eps, mask=brain, chunk_size=chunk)
  ce = attack_losses.cross_entropy(apply_fn, params, labels, brain)
  if name == "fgsm":
    return sweep(gradient.fgsm, ce, x, **common), None
  if name == NOISE:
    return _noise_sweep(x, eps, key, brain), None
  if name in ("ifgsm", "ifgsm_targeted"):
    targeted = name == "ifgsm_targeted"
    loss = attack_losses.targeted_cross_entropy(apply_fn, params, target, brain) if targeted else ce
    return sweep(gradient.ifgsm, loss, x, step_size_frac=frac, steps=steps, targeted=targeted,
                 return_history=True, **common)
  if name in ("pgd", "segpgd", "cospgd"):
    loss = {"pgd": lambda: ce, "segpgd": lambda: attack_losses.segpgd(apply_fn, params, labels, steps, brain),
            "cospgd": lambda: attack_losses.cospgd(apply_fn, params, labels, brain)}[name]()
    return sweep(gradient.pgd, loss, x, step_size_frac=frac, steps=steps, key=key,
                 restarts=int(attack_cfg.restarts), return_history=True, **common)
  raise ValueError(f"unknown attack {name!r}: expected one of {ATTACKS + (NOISE,)}")


@jax.jit
def _noise_sweep(x, eps, key, brain):
  return jax.vmap(lambda e: sanity.random_sign_noise(x, eps=e, key=key, mask=brain))(eps)


def _attack_cost(name: str, attack_cfg) -> int:
  """Gradient evaluations per eps and volume batch (for the progress line)."""
  if name in ("fgsm", NOISE):
    return 1
  restarts = int(attack_cfg.restarts) if name in ("pgd", "segpgd", "cospgd") else 1
  return int(attack_cfg.steps) * restarts


def make_scorer(apply_fn):
  """Jitted `score(params, xs (E, B, *S, C), labels, brain, target) -> dice (E, B, 3), ce (E, B), ce_target (E, B)`."""

  def one(params, x, labels, brain, target):
    logits = apply_fn(params, x)
    pred = jnp.argmax(logits, axis=-1)
    dice = metrics.dice_from_counts(metrics.region_counts(pred, labels))
    ce = attack_losses.cross_entropy(apply_fn, params, labels, brain).reduce(logits, labels, brain, 0, 1)
    ce_t = attack_losses.cross_entropy(apply_fn, params, target, brain).reduce(logits, target, brain, 0, 1)
    return dice, ce, ce_t

  @jax.jit
  def score(params, xs, labels, brain, target):
    return jax.lax.map(lambda x: one(params, x, labels, brain, target), xs)

  @jax.jit
  def predict(params, x):
    return jnp.argmax(apply_fn(params, x), axis=-1)

  return score, predict


class _Progress:
  """Work units done / total with rate and ETA, logged after each unit of work."""

  def __init__(self, total: float, what: str):
    self.total, self.done, self.what = float(total), 0.0, what
    self.t0 = time.perf_counter()

  def update(self, amount: float, label: str) -> None:
    self.done += amount
    elapsed = time.perf_counter() - self.t0
    rate = self.done / max(elapsed, 1e-9)
    eta = (self.total - self.done) / rate if rate > 0 else float("inf")
    eta_text = str(datetime.timedelta(seconds=int(eta))) if np.isfinite(eta) else "?"
    logging.info("robustify eval %s: %.0f%% (%.1f %s/s, ETA %s)", label, 100 * self.done / max(self.total, 1),
                 rate, self.what, eta_text)


def evaluate_model(name: str, apply_fn, params, data: dict, config, key, progress: _Progress | None = None):
  """Per-case rows (clean, every attack and the noise baseline at every eps) and sanity rows of one model."""
  score, _ = make_scorer(apply_fn)
  acfg = config.attack
  eps = [float(e) for e in acfg.eps]  # rows keep the config's values (a float32 copy goes to the attacks)
  attacks = tuple(acfg.attacks) + (NOISE,)
  n, bs = data["image"].shape[0], int(acfg.batch)
  rows, stats = [], {a: {"loss_adv": [], "loss_noise": [], "gain": [], "increased": [], "monotone": []}
                     for a in attacks}
  zero_grad = []
  for start in range(0, n, bs):
    sl = slice(start, min(start + bs, n))
    x, y = jnp.asarray(data["image"][sl]), jnp.asarray(data["label"][sl])
    brain = jnp.asarray(data["brain"][sl])
    ids = data["case_id"][sl]
    target = make_target(str(acfg.target), apply_fn, params, x, y)
    d0, ce0, cet0 = (np.asarray(v)[0] for v in score(params, x[None], y, brain, target))
    for i, cid in enumerate(ids):
      rows.append(_row(name, "clean", 0.0, cid, d0[i], ce0[i], cet0[i]))
    ce_loss = attack_losses.cross_entropy(apply_fn, params, y, brain)
    zero_grad.extend(np.asarray(sanity.gradient_sanity(ce_loss, x, mask=brain)["zero_grad_fraction"]).tolist())
    batch_key = jax.random.fold_in(key, start)
    losses_here = {}
    for a_index, attack in enumerate(attacks):
      x_adv, hist = attack_volumes(attack, apply_fn, params, x, y, brain, np.asarray(eps, np.float32), acfg,
                                   jax.random.fold_in(batch_key, a_index), target)
      d, ce, cet = (np.asarray(v) for v in score(params, x_adv, y, brain, target))
      for e_i, e in enumerate(eps):
        for i, cid in enumerate(ids):
          rows.append(_row(name, attack, float(e), cid, d[e_i, i], ce[e_i, i], cet[e_i, i]))
      targeted = attack == "ifgsm_targeted"
      losses_here[attack] = (ce, cet)
      if hist is not None:
        inc = sanity.loss_increase(hist, targeted=targeted)
        gain = np.asarray(inc["gain"]).reshape(len(eps), -1, len(ids)).mean(axis=1)
        mono = np.asarray(inc["monotone_fraction"]).reshape(len(eps), -1, len(ids)).mean(axis=1)
        stats[attack]["gain"].append(gain)
        stats[attack]["increased"].append(gain > 0)
        stats[attack]["monotone"].append(mono)
      if progress is not None:
        progress.update(_attack_cost(attack, acfg) * len(eps) * len(ids), f"{name}/{attack} "
                        f"volumes {sl.stop}/{n}")
    for attack in attacks:
      # Each attack is compared with the noise baseline on its own loss (target CE for the targeted one).
      which = 1 if attack == "ifgsm_targeted" else 0
      stats[attack]["loss_adv"].append(losses_here[attack][which])
      stats[attack]["loss_noise"].append(losses_here[NOISE][which])
  sanity_rows = _sanity_rows(name, attacks, eps, stats, rows, zero_grad)
  return rows, sanity_rows


def _row(model, attack, eps, case, dice, ce, ce_target) -> dict:
  dice = np.asarray(dice, np.float64)
  row = {"model": model, "attack": attack, "eps": float(eps), "case": str(case)}
  row.update({f"dice_{r}": float(dice[i]) for i, r in enumerate(REGIONS)})
  row["dice_mean"] = float(np.mean(dice))
  row["ce"] = float(ce)
  row["ce_target"] = float(ce_target)
  return row


def _sanity_rows(model, attacks, eps, stats, rows, zero_grad) -> list[dict]:
  out = []
  dice = {(r["attack"], r["eps"]): [] for r in rows}
  for r in rows:
    dice[(r["attack"], r["eps"])].append(r["dice_mean"])
  for attack in attacks:
    s = stats[attack]
    adv = np.concatenate(s["loss_adv"], axis=1)  # (E, N)
    noise = np.concatenate(s["loss_noise"], axis=1)
    targeted = attack == "ifgsm_targeted"
    beats = adv < noise if targeted else adv > noise
    for e_i, e in enumerate(eps):
      row = {"model": model, "attack": attack, "eps": float(e), "loss": "target CE" if targeted else "CE",
             "zero_grad_fraction": float(np.mean(zero_grad)),
             "loss_adv": float(np.mean(adv[e_i])), "loss_noise": float(np.mean(noise[e_i])),
             "beats_noise_fraction": float(np.mean(beats[e_i])) if attack != NOISE else float("nan"),
             "dice_adv": float(np.mean(dice[(attack, float(e))])),
             "dice_noise": float(np.mean(dice[(NOISE, float(e))]))}
      if s["gain"]:
        row["loss_gain"] = float(np.mean(np.concatenate(s["gain"], axis=1)[e_i]))
        row["loss_increased_fraction"] = float(np.mean(np.concatenate(s["increased"], axis=1)[e_i]))
        row["monotone_fraction"] = float(np.mean(np.concatenate(s["monotone"], axis=1)[e_i]))
      else:
        row.update(loss_gain=float("nan"), loss_increased_fraction=float("nan"), monotone_fraction=float("nan"))
      out.append(row)
  return out


# ------------------------------------------------------------------------------------------------ statistics


def wilcoxon_rows(per_case: list[dict], models: Sequence[str], attacks: Sequence[str], eps) -> list[dict]:
  """Paired (by case) Wilcoxon signed-rank tests, per region and on the mean Dice.

  "clean vs attack": a = clean Dice, b = attacked Dice of the same model (median_diff > 0: the attack hurts).
  "<defence> vs undefended": a = defence's Dice, b = undefended model's Dice under the same attack and eps
  (median_diff > 0: the defence helps); eps 0 = no attack. "distilled vs adversarial" likewise.
  """
  out = []
  for model in models:
    for attack in attacks:
      for e in eps:
        for col in DICE_COLUMNS:
          out.append(tables.paired_test(
              per_case, {"model": model, "attack": "clean"}, {"model": model, "attack": attack, "eps": e}, col,
              comparison="clean vs attack", model_a=model, model_b=model, attack=attack, eps=e,
              region=col[5:]))
  pairs = [(m, "undefended") for m in models if m != "undefended"]
  if "distilled" in models and "adversarial" in models:
    pairs.append(("distilled", "adversarial"))
  for a, b in pairs:
    for attack, e in [("clean", 0.0)] + [(x, e) for x in attacks for e in eps]:
      for col in DICE_COLUMNS:
        out.append(tables.paired_test(
            per_case, {"model": a, "attack": attack, "eps": e}, {"model": b, "attack": attack, "eps": e}, col,
            comparison=f"{a} vs {b}", model_a=a, model_b=b, attack=attack, eps=e, region=col[5:]))
  return out


def robust_fraction_rows(per_case: list[dict], models, attacks, eps, factor: float) -> list[dict]:
  """3D AutoAttack-style: a volume is broken when its mean Dice < factor x the model's clean mean Dice."""
  out = []
  for model in models:
    clean = tables.paired_values(per_case, {"model": model, "attack": "clean"}, "dice_mean")
    cases = list(clean)
    dice_clean = np.asarray([clean[c] for c in cases])
    for e in eps:
      by_attack = {a: tables.paired_values(per_case, {"model": model, "attack": a, "eps": e}, "dice_mean")
                   for a in attacks}
      fns = [(a, (lambda idx, d=by_attack[a]: np.asarray([d[cases[i]] for i in idx]))) for a in attacks]
      res = sanity.sequential_robustness(fns, dice_clean, factor=factor)
      out.append({"model": model, "eps": float(e), "attack": "clean", "threshold": res["threshold"],
                  "robust_alone": float(np.mean(dice_clean >= res["threshold"])),
                  "robust_sequential": float(np.mean(dice_clean >= res["threshold"]))})
      for a in attacks:
        alone = np.asarray([by_attack[a][c] for c in cases])
        out.append({"model": model, "eps": float(e), "attack": a, "threshold": res["threshold"],
                    "robust_alone": float(np.mean((alone >= res["threshold"]) & (dice_clean >= res["threshold"]))),
                    "robust_sequential": res["robust_after"][a]})
  return out


# ------------------------------------------------------------------------------------------------ the study


def _stack(cases) -> dict:
  shapes = {c.image.shape for c in cases}
  if len(shapes) != 1:
    raise ValueError(f"validation cases must share one grid (config data.shape); got shapes {sorted(shapes)}")
  for c in cases:
    if c.label is None:
      raise ValueError(f"validation case {c.case_id} has no label")
  image = np.stack([c.image for c in cases]).astype(np.float32)
  return {"image": image, "label": np.stack([c.label for c in cases]).astype(np.int32),
          "brain": np.any(image != 0, axis=-1), "case_id": [c.case_id for c in cases]}


def _nearest(values, target) -> float:
  values = [float(v) for v in values]
  return min(values, key=lambda v: abs(v - float(target)))


def run(config, workdir: str, *, splits: dict | None = None) -> dict:
  """Runs the study in `workdir` (see the module doc); returns the headline numbers.

  `splits` ({"train": [Case], "val": [Case]}) overrides `load_splits(config.data)` (notebooks, tests).
  """
  from mri_poison.train import state as state_lib
  from mri_poison.train import workdir as workdir_lib
  t_start = time.perf_counter()
  _check_config(config)
  workdir = os.path.abspath(workdir)
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise ValueError(f"workdir {workdir}: cannot create it ({e})") from e
  if not os.access(workdir, os.W_OK):
    raise ValueError(f"workdir {workdir}: not writable")
  cfg_dict = _config_dict(config)
  digest = _digest(cfg_dict)
  io_utils.write_json(os.path.join(workdir, "config.json"), {"config": cfg_dict, "hash": digest})
  manifest = workdir_lib.start_manifest(workdir, seed=int(config.seed), config_digest=digest, start_step=0)
  status = "failed"
  try:
    if splits is None:
      from mri_poison.data.datasets import load_splits
      splits = load_splits(config.data)
    val = list(splits["val"])
    if int(config.eval.max_cases):
      val = val[:int(config.eval.max_cases)]
    if not val:
      raise ValueError("config data.n_val: the study needs at least one validation case")
    data = _stack(val)
    params = train_models(config, workdir, splits["train"])
    apply_fn = state_lib.make_apply_fn(state_lib.make_model(config.model))
    result = _evaluate_and_report(config, workdir, apply_fn, params, data, val, digest, t_start)
    status = "finished"
    return result
  finally:
    workdir_lib.end_manifest(workdir, manifest, end_step=0, status=status)


def _evaluate_and_report(config, workdir, apply_fn, params, data, val_cases, digest, t_start) -> dict:
  acfg = config.attack
  eps = [float(e) for e in acfg.eps]
  attacks = tuple(acfg.attacks)
  all_attacks = attacks + (NOISE,)
  key = jax.random.PRNGKey(int(acfg.seed))
  n = data["image"].shape[0]
  partial_dir = os.path.join(workdir, "results", "partial")
  per_case, sanity_rows = [], []
  cost = sum(_attack_cost(a, acfg) for a in all_attacks) * len(eps) * n
  progress = _Progress(cost * len(MODELS), "volume-gradients")
  t_eval = time.perf_counter()
  for m_index, model in enumerate(MODELS):
    cache = os.path.join(partial_dir, f"eval_{model}.json")
    if os.path.exists(cache):
      with open(cache) as f:
        cached = json.load(f)
      if cached.get("hash") == digest:
        logging.info("robustify: reusing the evaluation of %s from %s", model, cache)
        per_case += cached["per_case"]
        sanity_rows += cached["sanity"]
        progress.total -= cost
        continue
    rows, srows = evaluate_model(model, apply_fn, params[model], data, config, jax.random.fold_in(key, m_index),
                                 progress)
    io_utils.write_json(cache, {"hash": digest, "per_case": rows, "sanity": srows})
    per_case += rows
    sanity_rows += srows
  eval_s = time.perf_counter() - t_eval

  results = os.path.join(workdir, "results")
  io_utils.write_csv(os.path.join(results, "per_case.csv"), per_case)
  summary = tables.summarize(per_case, ["model", "attack", "eps"], DICE_COLUMNS)
  clean_mean = {r["model"]: r["dice_mean_mean"] for r in summary if r["attack"] == "clean"}
  for r in summary:
    r["drop_pct"] = 100.0 * (1.0 - r["dice_mean_mean"] / clean_mean[r["model"]]) if clean_mean[r["model"]] else 0.0
  io_utils.write_csv(os.path.join(results, "summary.csv"), summary)
  wil = wilcoxon_rows(per_case, MODELS, all_attacks, eps)
  io_utils.write_csv(os.path.join(results, "wilcoxon.csv"), wil)
  robust = robust_fraction_rows(per_case, MODELS, attacks, eps, float(config.eval.robust_factor))
  io_utils.write_csv(os.path.join(results, "robust_fraction.csv"), robust)
  io_utils.write_csv(os.path.join(results, "sanity.csv"), sanity_rows)

  fig_dir = os.path.join(workdir, "figures")
  curves, std = {}, {}
  for attack in all_attacks:
    curves[attack], std[attack] = {}, {}
    for model in MODELS:
      rs = [r for r in summary if r["model"] == model and r["attack"] == attack]
      curves[attack][model] = ([r["eps"] for r in rs], [r["dice_mean_mean"] for r in rs])
      std[attack][model] = [r["dice_mean_std"] for r in rs]
  dice_fig = figures.dice_vs_eps(curves, clean_mean, os.path.join(fig_dir, "dice_vs_eps.png"), std=std,
                                 title=f"Dice vs eps ({n} validation volumes; band: +-1 std)")
  example = _example(config, workdir, apply_fn, params["undefended"], data, val_cases)

  ref_eps = _nearest(eps, config.eval.reference_eps)
  headline = {
      "clean_dice": clean_mean,
      "reference_eps": ref_eps,
      "dice_at_reference_eps": {m: {r["attack"]: r["dice_mean_mean"] for r in summary
                                    if r["model"] == m and r["attack"] != "clean" and r["eps"] == ref_eps}
                                for m in MODELS},
      "n_val": n, "eval_seconds": eval_s, "wall_seconds": time.perf_counter() - t_start,
  }
  io_utils.write_json(os.path.join(results, "headline.json"), headline)
  _write_report(config, workdir, summary, wil, robust, sanity_rows, headline, dice_fig, example)
  logging.info("robustify: done in %.0f s; report at %s", headline["wall_seconds"], os.path.join(workdir, "report.md"))
  return headline


def _example(config, workdir, apply_fn, params, data, val_cases) -> dict:
  """The example slice figure and a few adversarial NIfTI volumes (undefended model, example attack/eps)."""
  acfg = config.attack
  attack, e = str(config.eval.example_attack), float(config.eval.example_eps)
  k = max(1, int(config.eval.n_volumes))
  x, y = jnp.asarray(data["image"][:k]), jnp.asarray(data["label"][:k])
  brain = jnp.asarray(data["brain"][:k])
  target = make_target(str(acfg.target), apply_fn, params, x, y)
  x_adv, _ = attack_volumes(attack, apply_fn, params, x, y, brain, np.asarray([e], np.float32), acfg,
                            jax.random.PRNGKey(int(acfg.seed) + 1), target)
  x_adv = np.asarray(x_adv[0])
  _, predict = make_scorer(apply_fn)
  pred_clean, pred_adv = np.asarray(predict(params, x)), np.asarray(predict(params, jnp.asarray(x_adv)))
  modalities = tuple(val_cases[0].modalities)
  channel = modalities.index("flair") if "flair" in modalities else len(modalities) - 1
  image = np.asarray(x)
  fig = figures.example_slice(
      image[0], x_adv[0], data["label"][0], pred_clean[0], pred_adv[0],
      os.path.join(workdir, "figures", "example_slice.png"), channel=channel, channel_name=modalities[channel],
      title=f"{val_cases[0].case_id}: {attack} at eps={e:g} on the undefended model")
  vol_dir = os.path.join(workdir, "volumes")
  written = []
  tag = f"{attack}_eps{e:g}"
  if int(config.eval.n_volumes) > 0:
    for i in range(k):
      case = val_cases[i]
      written.append(nifti.save_volume(os.path.join(vol_dir, f"{case.case_id}_{tag}.nii.gz"), x_adv[i], case.affine))
      written.append(nifti.save_volume(os.path.join(vol_dir, f"{case.case_id}_{tag}_pred.nii.gz"),
                                       pred_adv[i].astype(np.int16), case.affine))
      written.append(nifti.save_volume(os.path.join(vol_dir, f"{case.case_id}_clean_pred.nii.gz"),
                                       pred_clean[i].astype(np.int16), case.affine))
  linf = float(np.max(np.abs(x_adv - image)))
  return {"figure": fig, "volumes": written, "attack": attack, "eps": e, "case": val_cases[0].case_id,
          "linf": linf}


# ------------------------------------------------------------------------------------------------ report.md


def _write_report(config, workdir, summary, wil, robust, sanity_rows, headline, dice_fig, example) -> None:
  acfg, d = config.attack, config.data
  ref = headline["reference_eps"]
  attacks = tuple(acfg.attacks) + (NOISE,)
  r = markdown.Report("Study 2: gradient attacks and defences on a 3D U-Net")
  r.paragraph(
      "Reproduces the protocol of arXiv 1908.00656 (J Digit Imaging 2021) with the tools of this repository: "
      "a 3D U-Net segments brain tumours from four MRI contrasts into four labels; it is attacked with "
      "gradient attacks of growing budget, and two defences (defensive distillation, adversarial training) are "
      "compared with the undefended model by paired Wilcoxon signed-rank tests. "
      f"Config variant `{config.variant}`; data source `{d.source}`; {headline['n_val']} validation volumes; "
      f"wall time {headline['wall_seconds']:.0f} s. Settings marked *default chosen here* are not given by "
      "the paper's abstract.")
  r.heading("Headline")
  clean = headline["clean_dice"]
  rows = []
  for m in MODELS:
    row = {"model": m, "clean": clean[m]}
    row.update(headline["dice_at_reference_eps"][m])
    rows.append(row)
  r.table(rows, ["model", "clean"] + list(attacks),
          caption=f"Mean Dice (average of WT, TC, ET over volumes), clean and under each attack at eps = {ref:g}.")
  r.paragraph(
      "Equal training budget: a base model is trained first; the undefended, distilled and adversarially trained "
      "models each continue from it for the same number of fine-tuning steps (plain loss, distillation at T, "
      "adversarial batches), so differences between them are the defences', not extra training.")
  r.heading("Protocol")
  steps, frac = int(acfg.steps), float(acfg.step_frac)
  adv = config.adversarial
  r.bullets([
      f"Data: `{d.source}` volumes, 4 contrasts {tuple(d.modalities)}, z-scored per contrast inside the brain "
      f"mask (background 0), cropped to the brain and padded/cropped to {tuple(d.shape)}; labels "
      "0 background, 1 necrotic/non-enhancing core, 2 oedema, 3 enhancing tumour. "
      f"{int(d.n_val)} validation cases split off by seed {int(d.seed)}.",
      f"Model: 3D U-Net, features {tuple(config.model.features)}, {config.model.norm} norm, "
      f"{config.model.dtype}; whole-volume prediction. Training: {int(config.train.steps)} steps, batch "
      f"{int(d.batch_size)}, AdamW lr {float(config.train.lr):g}, loss {config.train.loss} (*default chosen here*).",
      f"Defensive distillation: teacher trained with its logits divided by T = {float(config.distill.temperature):g}; "
      "student trained at T on the teacher's soft per-voxel probabilities at T (T^2-scaled cross-entropy), "
      "deployed at T = 1 [paper: distillation; T *default chosen here*]. "
      + ("Teacher and student start from the base model with its output layer scaled by T (the same "
         "softmax at T), then train at T (*default chosen here*: from scratch, short runs never grow the "
         "logits T-fold)." if str(config.distill.get("init", "scratch")) == "scaled_base"
         else "Teacher and student are trained from scratch."),
      f"Adversarial training: {adv.attack.upper()} examples (true labels, eps = {float(adv.eps):g}) replace "
      f"{float(adv.ratio):.0%} of every batch, made with the current weights; "
      + ("fine-tuned from the base model" if adv.init == "base" else "trained from scratch")
      + " (*default chosen here*).",
      f"Attacks (L-inf, z-score units, brain voxels only, true labels): eps grid {tuple(eps for eps in acfg.eps)}; "
      f"iterative attacks N = {steps} steps of alpha = {frac:g} eps; PGD-type attacks with a random start and "
      f"{int(acfg.restarts)} restart(s); targeted i-FGSM target `{acfg.target}` (*defaults chosen here*; the paper "
      "names FGSM, i-FGSM and targeted i-FGSM).",
  ] + [f"`{a}`: {ATTACK_TEXT[a]}" for a in attacks])
  r.paragraph(
      "Metric conventions: Dice on the BraTS regions WT = {1,2,3}, TC = {1,3}, ET = {3}; a region empty in both "
      "prediction and reference scores Dice 1, empty in exactly one scores 0 (the BraTS challenge convention; "
      "HD95 is not reported here, its empty-mask penalty would be 373 mm). Wilcoxon: two-sided signed-rank, "
      "paired by case, zero differences dropped (scipy's default); with n cases the smallest possible p is "
      "2 / 2^n, so a * (p < 0.05) needs n >= 6.")
  r.heading("Dice under attack")
  r.image(dice_fig, "Dice vs eps", base_dir=workdir)
  srows = [x for x in summary if x["eps"] == ref or x["attack"] == "clean"]
  r.table(srows, ["model", "attack", "eps", "dice_WT_mean", "dice_TC_mean", "dice_ET_mean", "dice_mean_mean",
                  "dice_mean_std", "drop_pct"],
          caption=f"Per-region mean Dice at eps = {ref:g} (every eps: results/summary.csv).",
          headers={"dice_WT_mean": "WT", "dice_TC_mean": "TC", "dice_ET_mean": "ET", "dice_mean_mean": "mean",
                   "dice_mean_std": "std", "drop_pct": "drop %"})
  r.heading("Wilcoxon signed-rank tests")
  mean_rows = [w for w in wil if w["region"] == "mean" and (w["eps"] == ref or w["attack"] == "clean")]
  r.table(mean_rows, ["comparison", "model_a", "attack", "eps", "mean_a", "mean_b", "median_diff", "p_value", "n"],
          caption=f"Mean Dice, eps = {ref:g} (per region and every eps: results/wilcoxon.csv). "
                  "`clean vs attack`: a = clean, b = attacked (diff > 0: the attack hurts). `X vs undefended`: "
                  "a = defence X, b = undefended model under the same attack (diff > 0: the defence helps).",
          formats={"p_value": tables.format_p})
  r.heading("Robust fraction (3D AutoAttack-style)")
  r.table([x for x in robust if x["eps"] == ref],
          ["model", "eps", "attack", "threshold", "robust_alone", "robust_sequential"],
          caption=f"A volume is broken when its mean Dice < {float(config.eval.robust_factor):g} x the model's "
                  "clean mean Dice; `robust_sequential`: attacks run in order on the volumes still robust "
                  f"(eps = {ref:g}; every eps: results/robust_fraction.csv).")
  r.heading("Sanity checks")
  r.table([x for x in sanity_rows if x["eps"] == ref],
          ["model", "attack", "loss", "zero_grad_fraction", "loss_adv", "loss_noise", "beats_noise_fraction",
           "dice_adv", "dice_noise", "loss_increased_fraction", "monotone_fraction"],
          caption="Per model and attack (eps = " + f"{ref:g}" + "): fraction of exactly-zero input gradients of "
                  "the CE loss on clean volumes (gradient masking shows up here), the attack's loss on its "
                  "adversarial volumes vs on random sign noise of the same eps (an attack must beat noise), "
                  "and whether the loss went the right way over the iterations.")
  r.heading("Example")
  r.image(example["figure"], "example slice", base_dir=workdir)
  r.paragraph(
      f"Case {example['case']}, {example['attack']} at eps = {example['eps']:g} on the undefended model (largest "
      f"|perturbation| {example['linf']:.3g}). Panels: clean FLAIR, adversarial FLAIR, perturbation x10, "
      "ground truth, clean and adversarial predictions (red: necrotic core, green: oedema, yellow: enhancing).")
  if example["volumes"]:
    r.paragraph("Adversarial volumes and predictions as NIfTI with the case's affine: "
                + ", ".join(f"`{os.path.relpath(p, workdir)}`" for p in example["volumes"]) + ".")
  r.heading("Files")
  r.bullets([
      "`results/per_case.csv`: model, attack, eps, case, Dice WT/TC/ET/mean, CE and target CE.",
      "`results/summary.csv`, `results/wilcoxon.csv`, `results/robust_fraction.csv`, `results/sanity.csv`, "
      "`results/headline.json`.",
      "`models/{clean,teacher,distilled,adversarial}/`: checkpoints, config.json, metrics.jsonl of each model.",
      "`config.json`, `manifest.json`: the resolved config and the run's versions/devices.",
  ])
  r.write(os.path.join(workdir, "report.md"))
