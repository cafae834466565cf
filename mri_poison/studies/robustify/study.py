"""Study 2: `run(config, workdir)`, the whole study from data to report.md."""
from __future__ import annotations

import datetime
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from mri_poison import cellstore
from mri_poison import io_utils
from mri_poison.attacks import zoo
from mri_poison.data.case import REGIONS
from mri_poison.data.preprocess import brain_mask
from mri_poison.report import figures
from mri_poison.report import nifti
from mri_poison.report import tables
from mri_poison.studies import common
from mri_poison.studies import learnt as learnt_lib
from mri_poison.studies.robustify import evaluation as ev
from mri_poison.studies.robustify.evaluation import (ATTACKS, DICE_COLUMNS, EPS_MODES, EVAL_VERSION, NOISE, TARGETS,
                                                     attack_volumes, make_scorer, make_target)
from mri_poison.studies.robustify.report import write_report
from mri_poison.studies.robustify.training import MODELS, train_models, trained_models
from mri_poison.train import loop as train_loop
from mri_poison.train import lock as lock_lib
from mri_poison.train import workdir as workdir_lib

# What may change between runs of one workdir: the attacks and the evaluation only add evaluation cells (or
# reuse them); everything else would change the trained models.
RESUMABLE_KEYS = ("attack.", "eval.", "gate.")


# ------------------------------------------------------------------------------------------------ config


def check(config) -> None:
  """`common.check_study`: the config and the data sources, before anything is written."""
  common.check_study(config, _check_config, (config.data,))


def _check_config(config) -> None:
  attacks = tuple(config.attack.attacks)
  unknown = [a for a in attacks if a not in ATTACKS]
  if unknown or not attacks or len(set(attacks)) != len(attacks):
    raise ValueError(f"config attack.attacks={attacks}: expected a non-empty subset of {ATTACKS}, each once")
  eps = tuple(float(e) for e in config.attack.eps)
  if not eps or min(eps) <= 0 or len(set(eps)) != len(eps):
    raise ValueError(f"config attack.eps={eps}: expected distinct positive budgets (z-score units)")
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
  if str(config.attack.get("eps_mode", "absolute")) not in EPS_MODES:
    raise ValueError(f"config attack.eps_mode={config.attack.eps_mode!r}: expected one of {EPS_MODES}")
  if not float(config.attack.get("margin_kappa", 0.0)) >= 0:
    raise ValueError(f"config attack.margin_kappa={config.attack.margin_kappa}: expected >= 0")
  if bool(config.eval.get("sliding_window", False)):
    window = tuple(config.eval.get("window", ()) or config.data.patch_shape)
    if len(window) != len(tuple(config.data.shape)) or min(int(w) for w in window) < 1:
      raise ValueError(f"config eval.window={window}: expected one positive size per axis of data.shape")
  cellstore.parse_cells(config.eval.get("cells", "all"), "eval.cells")
  _check_external_source(config)
  example = str(config.eval.example_attack)
  if example not in ATTACKS or example == "pgd_temp" or zoo.get(example).replays is not None:
    raise ValueError(f"config eval.example_attack={example!r}: expected one of {ATTACKS} other than pgd_temp and "
                     "the transfer attacks")


# ------------------------------------------------------------------------------------------------ the study


def _stack(cases) -> dict:
  shapes = {c.image.shape for c in cases}
  if len(shapes) != 1:
    raise ValueError(f"validation cases must share one grid (config data.shape); got shapes {sorted(shapes)}")
  for c in cases:
    if c.label is None:
      raise ValueError(f"validation case {c.case_id} has no label")
  image = np.stack([c.image for c in cases]).astype(np.float32)
  label = np.stack([c.label for c in cases]).astype(np.int32)
  return {"image": image, "label": label, "brain": brain_mask(image), "case_id": [c.case_id for c in cases],
          "digest": cellstore.tree_digest((image, label))}  # the split's voxels: part of every cell's key


def _nearest(values, target) -> float:
  values = [float(v) for v in values]
  return min(values, key=lambda v: abs(v - float(target)))


def run(config, workdir: str, *, splits: dict | None = None) -> dict:
  """Runs the study in `workdir` (see the package doc); returns the headline numbers.

  `splits` ({"train": [Case], "val": [Case]}) overrides `load_splits(config.data)` (notebooks, tests). A rerun
  on the same workdir reuses the trained models and every evaluation cell already computed; a rerun with other
  attack.* / eval.* settings (another eps, attack or split size) computes only the cells it lacks.
  eval.cells="none" stops after training; "i/K" computes one share of the cells (`_run_share`).
  """
  t_start = time.perf_counter()
  _check_config(config)
  # Everything that can fail on bad input (config, workdir, data) fails before the workdir is written to.
  common.check_workdir(workdir, config, resumable_keys=RESUMABLE_KEYS)
  train, val = common.train_and_held_out(config.data, splits, "at least one validation case")
  if int(config.eval.max_cases):
    val = val[:int(config.eval.max_cases)]
  data = _stack(val)
  cells = cellstore.parse_cells(config.eval.get("cells", "all"), "eval.cells")
  if isinstance(cells, tuple):
    return _run_share(config, workdir, data, cells, t_start)
  with common.study_workdir(workdir, config, resumable_keys=RESUMABLE_KEYS, seed=int(config.seed)) as (workdir, _):
    common.record_data(workdir, config.data, {"train": train, "val": val})
    params = train_models(config, workdir, train)
    if cells == "none":
      logging.info("robustify: models trained; eval.cells=none, so nothing is evaluated")
      return {"trained": sorted(params), "wall_seconds": time.perf_counter() - t_start}
    return _evaluate_and_report(config, workdir, params, data, val, t_start, train)


RESULT_TABLES = {"summary": "summary.csv", "comparisons": "wilcoxon.csv", "robust": "robust_fraction.csv",
                 "sanity": "sanity.csv", "halving": "halving_budget.csv", "masking": "masking.csv",
                 "perceptibility": "perceptibility.csv", "targeted": "targeted.csv", "members": "adaptive_members.csv"}
FIGURES = {"adaptive": "adaptive_dice_vs_eps.png", "dice": "dice_vs_eps.png", "ce": "ce_trajectory.png"}


def render(workdir: str) -> str:
  """report.md of a finished workdir written again from its result files alone (results/*.csv, headline.json,
  the example stage, config.json): nothing is trained, attacked or scored. Returns the report's path."""
  workdir, config = common.finished_workdir(workdir, "study 2", [os.path.join("results", f) for f in list(
      RESULT_TABLES.values()) + [os.path.join("stages", "example.json")]])
  results = os.path.join(workdir, "results")
  temps = temperatures(config)
  res = {k: io_utils.read_csv(os.path.join(results, f)) for k, f in RESULT_TABLES.items()}
  res.update(temperatures=temps, attacks_of=_attacks_of(config, temps))
  headline = workdir_lib.read_json(os.path.join(results, "headline.json"), workdir)
  example = workdir_lib.read_json(os.path.join(results, "stages", "example.json"), workdir)["result"]
  figs = {k: os.path.join(workdir, "figures", f) for k, f in FIGURES.items()}
  write_report(config, workdir, res, headline, figs, _with_paths(workdir, example))
  return os.path.join(workdir, "report.md")


def _run_share(config, workdir, data, share, t_start) -> dict:
  """One array task: the missing cells of share (i, K) into results/shards/<i>-of-<K>/cells.csv.

  Reads the trained models without locking the workdir (the K tasks run side by side), holds only its share's
  lock, and writes no config, manifest or report: a last run with eval.cells="all" folds the shares into
  results/cells.csv (computing whatever is still missing) and writes the report.
  """
  workdir = common.check_workdir(workdir, config, resumable_keys=RESUMABLE_KEYS)
  params = trained_models(config, workdir)
  table = cellstore.CellTable(os.path.join(workdir, "results", "cells.csv"), share=share)
  os.makedirs(cellstore.share_dir(table.path, share), exist_ok=True)
  with lock_lib.lock(cellstore.share_dir(table.path, share)):
    todo, cells, _, eval_s = _evaluate(config, params, data, table)
  logging.info("robustify: share %d/%d: %d cells computed in %.0f s into %s", *share, len(todo), eval_s,
               table.share_path)
  return {"share": list(share), "cells_computed": len(todo), "cells_in_share": sum(
      cellstore.in_share(c, share) for v in cells.values() for c in v.values()),
          "eval_seconds": eval_s, "wall_seconds": time.perf_counter() - t_start}


def _attacks_of(config, temps) -> dict[str, list[str]]:
  """{model: the attacks it gets (the noise baseline aside)}, the members of its adaptive threat."""
  return {m: [t for t in ev.victim_threats(m, temps[m], config.attack.attacks) if t != NOISE] for m in MODELS}


def temperatures(config) -> dict[str, float]:
  """Each compared model's training temperature (what `pgd_temp` divides its logits by)."""
  return {m: float(config.distill.temperature) if m == "distilled" else 1.0 for m in MODELS}


def _evaluate(config, params, data, table):
  """Computes every victim's cells missing from `table` (its share's, if it has one).

  Returns (the cells computed, {victim: {(threat, eps): cell}}, {victim: params digest}, seconds).
  """
  temps, n = temperatures(config), data["image"].shape[0]
  # The victims' random streams are numbered by their place in MODELS.
  key = jax.random.PRNGKey(int(config.attack.seed))
  keys = {m: jax.random.fold_in(key, i) for i, m in enumerate(MODELS)}
  digests = {m: ev.victim_digest(config.model, params[m]) for m in MODELS}
  sources = {"own": {"params": params[ev.SOURCE], "key": keys[ev.SOURCE], "digest": digests[ev.SOURCE],
                     "apply_fn": ev.deployed_apply_fn(config)}}
  if any(zoo.get(a).source == "external" for a in config.attack.attacks):
    sources["external"] = _external_source(config, jax.random.fold_in(key, len(MODELS)))
  cells = {m: ev.victim_cells(m, digests[m], keys[m], data, config, temperature=temps[m], sources=sources)
           for m in MODELS}
  todo = [c for m in MODELS for c in table.missing(cells[m].values())]
  logging.info("robustify: %d of %d evaluation cells to compute (%s)", len(todo),
               sum(len(c) for c in cells.values()), table.share_path if table.share else table.path)
  progress = common.Progress(ev.evaluation_cost(todo, config) * n, name="robustify eval", unit="volume-gradients")
  t_eval = time.perf_counter()
  for m in MODELS:
    ev.evaluate_victim(table, m, params[m], data, config, keys[m], temperature=temps[m], sources=sources,
                       params_digest=digests[m], progress=progress)
  return todo, cells, digests, time.perf_counter() - t_eval


def _external_source(config, key) -> dict:
  """The trained model at attack.transfer_model (any architecture), deployed as this study deploys its own."""
  _, params, other = train_loop.load_model(str(config.attack.transfer_model))
  return {"params": params, "key": key, "digest": ev.victim_digest(other.model, params),
          "apply_fn": ev.deployed_apply_fn(config, other.model)}


def _check_external_source(config) -> None:
  """attack.transfer_model names a trained model whose input is this study's (before anything is written)."""
  path = str(config.attack.get("transfer_model", ""))
  needs = [a for a in config.attack.attacks if zoo.get(a).source == "external"]
  if not needs:
    return
  config_path = os.path.join(path, "config.json")
  if not path or not os.path.isfile(config_path) or not os.path.isdir(os.path.join(path, "checkpoints")):
    raise ValueError(f"config attack.transfer_model={path!r}: attack(s) {needs} replay a trained model's examples; "
                     "name a trained model folder (config.json and checkpoints/), e.g. <robustify workdir>/models/"
                     "undefended")
  other = workdir_lib.read_json(config_path, path)["config"]
  theirs, ours = tuple(other["data"]["modalities"]), tuple(config.data.modalities)
  if theirs != ours:
    raise ValueError(f"config attack.transfer_model={path!r}: that model takes modalities {theirs}, this study's "
                     f"data has {ours}")


def _gate(config, table, cells, data, case_ids, train_cases) -> list[dict]:
  """The learnt-region gate on the undefended model's clean Dice; its regions are the ones every model is
  judged on (so defences are compared on the same regions)."""
  clean = cells[ev.SOURCE][(ev.CLEAN, 0.0)]
  dice = np.stack([table.values(clean, f"dice_{r}", case_ids) for r in REGIONS], axis=1)
  return learnt_lib.gate_regions(
      config.gate, dice, data["label"], val_images=data["image"], val_brains=data["brain"],
      train_cases=[(c.image, c.label, brain_mask(c.image)) for c in train_cases])


def _evaluate_and_report(config, workdir, params, data, val_cases, t_start, train_cases) -> dict:
  acfg, ecfg = config.attack, config.eval
  eps = sorted(float(e) for e in acfg.eps)
  n, case_ids = data["image"].shape[0], list(data["case_id"])
  results = os.path.join(workdir, "results")
  temps = temperatures(config)

  table = cellstore.CellTable(os.path.join(results, "cells.csv"))
  todo, cells, digests, eval_s = _evaluate(config, params, data, table)
  table.save()  # folds in the cells of array tasks (results/shards/), even when nothing was left to compute
  ref_eps = _nearest(eps, ecfg.reference_eps)
  n_boot, seed = int(ecfg.get("n_boot", 1000)), int(config.seed)
  gate = _gate(config, table, cells, data, case_ids, train_cases)
  io_utils.write_csv(os.path.join(results, "gate.csv"), gate)
  regions = learnt_lib.learnt(gate) or REGIONS  # none learnt: every number is exploratory (the report says so)
  per_case = ev.per_case_rows(table, cells, MODELS, config, case_ids, temps, regions)
  io_utils.write_csv(os.path.join(results, "per_case.csv"), per_case)
  summary = tables.summarize(per_case, ["model", "attack", "eps"], DICE_COLUMNS)
  clean_mean = {r["model"]: r["dice_mean_mean"] for r in summary if r["attack"] == "clean"}
  for r in summary:
    # Relative drop: 100 (1 - mean attacked Dice / mean clean Dice) of the same model, over the same cases.
    r["drop_pct"] = 100.0 * (1.0 - r["dice_mean_mean"] / clean_mean[r["model"]]) if clean_mean[r["model"]] else 0.0
  io_utils.write_csv(os.path.join(results, RESULT_TABLES["summary"]), summary)
  comparisons = ev.comparison_rows(per_case, MODELS, eps, ref_eps)
  io_utils.write_csv(os.path.join(results, RESULT_TABLES["comparisons"]), comparisons)
  attacks_of = _attacks_of(config, temps)
  members = ev.adaptive_member_rows(per_case, attacks_of, ref_eps)
  io_utils.write_csv(os.path.join(results, RESULT_TABLES["members"]), members)
  robust = ev.robust_fraction_rows(per_case, MODELS, attacks_of, eps, float(ecfg.robust_factor))
  io_utils.write_csv(os.path.join(results, RESULT_TABLES["robust"]), robust)
  sanity = [r for m in MODELS for r in ev.sanity_rows(table, cells, m, config, case_ids, temps[m])]
  io_utils.write_csv(os.path.join(results, RESULT_TABLES["sanity"]), sanity)
  halving = ev.halving_rows(per_case, MODELS, eps, n_boot=n_boot, seed=seed)
  io_utils.write_csv(os.path.join(results, RESULT_TABLES["halving"]), halving)
  masking = ev.masking_rows(per_case, sanity, MODELS, eps, ref_eps, float(ecfg.get("collapse_dice", 0.1)))
  io_utils.write_csv(os.path.join(results, RESULT_TABLES["masking"]), masking)
  percept = ev.cell_means(table, cells, [ev.SOURCE], ("psnr", "ssim"), case_ids)
  io_utils.write_csv(os.path.join(results, RESULT_TABLES["perceptibility"]), percept)
  targeted = ev.cell_means(table, cells, MODELS, ev.SUCCESS_COLUMNS, case_ids,
                           threats=[a for a in ev.ATTACKS if ev.is_targeted(a)])
  clean_left = {m: float(np.nanmean(table.values(cells[m][(ev.CLEAN, 0.0)], "tumour_left", case_ids)))
                for m in MODELS}
  for r in targeted:
    r["tumour_left_clean"] = clean_left[r["model"]]
  io_utils.write_csv(os.path.join(results, RESULT_TABLES["targeted"]), targeted)

  # Figures: (1) the headline, every model under the adaptive attack up to collapse; (2) one panel per model,
  # one line per attack; bands: bootstrap 95 % CI of the mean; (3) the plain-CE trajectories at the reference eps.
  curves, ci = {m: {} for m in MODELS}, {m: {} for m in MODELS}
  for model in MODELS:
    clean = [r for r in summary if r["model"] == model and r["attack"] == "clean"]
    for attack in [ev.ADAPTIVE] + attacks_of[model] + [NOISE]:
      rs = clean + sorted((r for r in summary if r["model"] == model and r["attack"] == attack), key=lambda r: r["eps"])
      curves[model][attack] = ([r["eps"] for r in rs], [r["dice_mean_mean"] for r in rs])
      ci[model][attack] = ([r["dice_mean_ci_low"] for r in rs], [r["dice_mean_ci_high"] for r in rs])
  figs = {
      "adaptive": figures.dice_vs_eps(
          {"adaptive (worst case per volume)": {m: curves[m][ev.ADAPTIVE] for m in MODELS}},
          os.path.join(workdir, "figures", FIGURES["adaptive"]),
          ci={"adaptive (worst case per volume)": {m: ci[m][ev.ADAPTIVE] for m in MODELS}},
          title=f"Mean Dice under the adaptive attack ({n} volumes; band: bootstrap 95 % CI)"),
      "dice": figures.dice_vs_eps(curves, os.path.join(workdir, "figures", FIGURES["dice"]), ci=ci,
                                  title=f"Dice vs eps ({n} validation volumes; band: bootstrap 95 % CI of the mean)"),
      "ce": figures.line_panels(
          ev.ce_trajectories(table, cells, MODELS, config, case_ids, ref_eps, temps),
          os.path.join(workdir, "figures", FIGURES["ce"]), xlabel="iterate (0 = clean input)",
          ylabel="plain CE to the labels (mean over volumes)",
          title=f"Plain CE along each attack at eps = {ref_eps:g}"),
  }
  example = _example_stage(config, workdir, params["undefended"], digests["undefended"], data, val_cases)

  def at_ref(m, attack):
    return next((r["dice_mean_mean"] for r in summary if r["model"] == m and r["attack"] == attack
                 and r["eps"] == ref_eps), float("nan"))

  headline = {
      "gate": gate, "learnt_regions": list(learnt_lib.learnt(gate)),
      "clean_dice": clean_mean,
      "reference_eps": ref_eps,
      "dice_at_reference_eps": {m: {a: at_ref(m, a) for a in [ev.ADAPTIVE] + attacks_of[m] + [NOISE]}
                                for m in MODELS},
      "adaptive_dice_at_reference_eps": {m: at_ref(m, ev.ADAPTIVE) for m in MODELS},
      "halving_budget": {r["model"]: {k: r[k] for k in ("eps_half", "ci_low", "ci_high")}
                         for r in halving if r["attack"] == ev.ADAPTIVE},
      "primary": [{k: r[k] for k in ("comparison", "model_a", "attack", "eps", "mean_diff", "ci_low", "ci_high",
                                     "p_value", "p_holm", "n", "n_effective")}
                  for r in comparisons if r["family"] == "primary"],
      "n_val": n, "eval_seconds": eval_s, "wall_seconds": time.perf_counter() - t_start,
      "cost": _compute_cost(workdir, eval_s if todo else 0.0),
      "cells_computed": len(todo),
  }
  io_utils.write_json(os.path.join(results, "headline.json"), headline)
  write_report(config, workdir, dict(summary=summary, comparisons=comparisons, robust=robust, sanity=sanity,
                                     halving=halving, masking=masking, perceptibility=percept, targeted=targeted,
                                     attacks_of=attacks_of, temperatures=temps, members=members),
               headline, figs, example)
  logging.info("robustify: done in %.0f s; report at %s", headline["wall_seconds"], os.path.join(workdir, "report.md"))
  return headline


def _compute_cost(workdir, eval_seconds: float) -> dict:
  """What the results in the workdir cost to compute, whichever run computed them: training from each model's
  manifest (its runs' wall times), evaluation accumulated in results/stages/cost.json over the runs that
  computed new cells."""
  path = os.path.join(workdir, "results", "stages", "cost.json")
  total = json.load(open(path))["eval_seconds"] if os.path.exists(path) else 0.0
  if eval_seconds:
    total += eval_seconds
    io_utils.write_json(path, {"eval_seconds": total})
  train = {}
  for m in os.listdir(os.path.join(workdir, "models")):
    manifest = os.path.join(workdir, "models", m, "manifest.json")
    if os.path.exists(manifest):
      runs = json.load(open(manifest)).get("runs", [])
      train[m] = sum((datetime.datetime.fromisoformat(r["end"]) - datetime.datetime.fromisoformat(r["start"]))
                     .total_seconds() for r in runs if r.get("end"))
  return {"train_seconds": train, "eval_seconds": total}


def _example_stage(config, workdir, params, params_digest, data, val_cases) -> dict:
  """The example figure and NIfTI volumes, a cached stage (recomputed when its inputs or files change)."""
  acfg, ecfg = config.attack, config.eval
  k = max(1, int(ecfg.n_volumes))
  depends_on = {"params": params_digest, "data": data["digest"], "cases": list(data["case_id"][:k]),
                "attack": str(ecfg.example_attack), "eps": float(ecfg.example_eps), "n_volumes": int(ecfg.n_volumes),
                "steps": int(acfg.steps), "step_frac": float(acfg.step_frac), "restarts": int(acfg.restarts),
                "target": str(acfg.target), "seed": int(acfg.seed), "version": EVAL_VERSION, "files": 2,
                "kappa": float(acfg.get("margin_kappa", 0.0)), "deploy": ev._deployment(config)}  # pylint: disable=protected-access
  files_exist = lambda r: all(os.path.exists(os.path.join(workdir, p)) for p in [r["figure"]] + r["volumes"])
  example = common.cached_stage(os.path.join(workdir, "results", "stages", "example.json"), depends_on,
                                lambda: _example(config, workdir, params, data, val_cases), valid=files_exist)
  return _with_paths(workdir, example)


def _with_paths(workdir, example) -> dict:
  """The example stage's result with its files' paths made absolute (the stage stores them relative)."""
  return dict(example, figure=os.path.join(workdir, example["figure"]),
              volumes=[os.path.join(workdir, p) for p in example["volumes"]])


def _example(config, workdir, params, data, val_cases) -> dict:
  """The example slice figure and a few adversarial NIfTI volumes (undefended model, example attack/eps).

  Paths in the result are relative to the workdir.
  """
  acfg = config.attack
  apply_fn = ev.deployed_apply_fn(config)
  attack, e = str(config.eval.example_attack), float(config.eval.example_eps)
  k = max(1, int(config.eval.n_volumes))
  x, y = jnp.asarray(data["image"][:k]), jnp.asarray(data["label"][:k])
  brain = jnp.asarray(data["brain"][:k])
  target = make_target(str(acfg.target), apply_fn, params, x, y)
  x_adv, _ = attack_volumes(attack, apply_fn, params, x, y, brain, np.asarray([e], np.float32), acfg,
                            jax.random.PRNGKey(int(acfg.seed) + 1), target)
  x_adv = np.asarray(x_adv[0])
  _, predict, _ = make_scorer(apply_fn)
  pred_clean = np.asarray(predict(params, x[None]))[0]
  pred_adv = np.asarray(predict(params, jnp.asarray(x_adv)[None]))[0]
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
      channels = "channels " + ",".join(modalities) + "; z-score units"
      labels = "labels 0 background,1 necrotic core,2 oedema,3 enhancing"
      written.append(nifti.save_volume(os.path.join(vol_dir, f"{case.case_id}_clean.nii.gz"), image[i],
                                       case.affine, description=channels))
      written.append(nifti.save_volume(os.path.join(vol_dir, f"{case.case_id}_{tag}.nii.gz"), x_adv[i],
                                       case.affine, description=channels + f"; {tag}"))
      written.append(nifti.save_volume(os.path.join(vol_dir, f"{case.case_id}_{tag}_pred.nii.gz"),
                                       pred_adv[i].astype(np.int16), case.affine, description=labels))
      written.append(nifti.save_volume(os.path.join(vol_dir, f"{case.case_id}_clean_pred.nii.gz"),
                                       pred_clean[i].astype(np.int16), case.affine, description=labels))
  linf = float(np.max(np.abs(x_adv - image)))
  rel = lambda p: os.path.relpath(p, workdir)
  return {"figure": rel(fig), "volumes": [rel(p) for p in written], "attack": attack, "eps": e,
          "case": val_cases[0].case_id, "linf": linf}
