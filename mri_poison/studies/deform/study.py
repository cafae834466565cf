"""Study 3: `run(config, workdir)` (see the package doc)."""
from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from mri_poison import cellstore
from mri_poison import io_utils
from mri_poison.attacks import deform
from mri_poison.data.preprocess import brain_mask
from mri_poison.report import nifti
from mri_poison.studies import common
from mri_poison.studies import learnt as learnt_lib
from mri_poison.studies.deform import evaluation as ev
from mri_poison.studies.deform import report as report_lib
from mri_poison.studies.deform import training
from mri_poison.train import state as state_lib
from mri_poison.train import workdir as workdir_lib

# Keys that only add results: another Delta, eps, attack, batch or example changes cells, never a model.
RESUMABLE_KEYS = ("attack.", "eval.", "gate.", "variant")


def check(config) -> None:
  """`common.check_study`: the config and the data sources, before anything is written."""
  common.check_study(config, _check_config, (training.arm_config(config, arm).data for arm in config.arms))


def _check_config(config) -> None:
  arms = tuple(config.arms)
  if not arms or any(a not in training.ARMS for a in arms) or len(set(arms)) != len(arms):
    raise ValueError(f"config arms={arms}: expected a non-empty subset of {training.ARMS}, each once")
  for key in ("defence.arms", "generator.arms"):
    bad = [a for a in tuple(config[key.split(".")[0]].arms) if a not in training.ARMS]
    if bad:
      raise ValueError(f"config {key}={bad}: expected arms from {training.ARMS}")
  deltas = tuple(float(d) for d in config.attack.deltas)
  if not deltas or min(deltas) <= 0 or max(deltas) >= 1 or len(set(deltas)) != len(deltas):
    raise ValueError(f"config attack.deltas={deltas}: expected distinct target Dice drops in (0, 1)")
  bad = [a for a in tuple(config.attack.gradient_attacks) if a not in ev.GRADIENT_THREATS]
  if bad:
    raise ValueError(f"config attack.gradient_attacks={bad}: expected a subset of {ev.GRADIENT_THREATS}")
  eps = tuple(float(e) for e in config.attack.eps)
  if config.attack.gradient_attacks and (not eps or min(eps) <= 0):
    raise ValueError(f"config attack.eps={eps}: expected positive budgets")
  delta_range = tuple(float(d) for d in config.generator.get("delta_range", ()))
  if delta_range and (len(delta_range) != 2 or not 0 <= delta_range[0] < delta_range[1] < 1):
    raise ValueError(f"config generator.delta_range={delta_range}: expected (low, high) with 0 <= low < high < 1")
  deform.settings(config.deform)  # raises naming the bad deform.* key


def run(config, workdir: str, *, splits: dict | None = None) -> dict:
  """Trains (or reuses) each arm's victims and generator, evaluates every cell, writes the report.

  `splits` ({arm: {"train": [Case], "val": [Case]}}) overrides `load_splits` per arm (notebooks, tests).
  Returns the headline numbers (also in results/headline.json).
  """
  t_start = time.perf_counter()
  _check_config(config)
  common.check_workdir(workdir, config, resumable_keys=RESUMABLE_KEYS)
  if splits is None:  # bad data fails before the workdir is written
    from mri_poison.data.datasets import load_splits  # pylint: disable=import-outside-toplevel
    splits = {arm: load_splits(training.arm_config(config, arm).data) for arm in config.arms}
  with common.study_workdir(workdir, config, resumable_keys=RESUMABLE_KEYS, seed=int(config.seed)) as (workdir, _):
    table = cellstore.CellTable(os.path.join(workdir, "results", "cells.csv"))
    cells_by_victim, case_ids, arm_data, models, gates = {}, {}, {}, {}, {}
    timings = {}
    for ai, arm in enumerate(config.arms):
      t0 = time.perf_counter()
      sub = training.arm_config(config, arm)
      sp = splits[arm]
      if not sp["val"]:
        raise ValueError(f"config arm{arm}.n_val / data.n_val: the study needs held-out cases")
      common.record_data(workdir, sub.data, sp, name=f"arm{arm}")
      data = training.eval_data(sp["val"], arm)
      arm_data[arm], case_ids[arm] = data, list(data["case_id"])
      victims = training.train_victims(config, workdir, arm, sp["train"])
      apply_fn = state_lib.make_apply_fn(state_lib.make_model(sub.model))
      generator = None
      if bool(config.generator.enabled) and arm in tuple(config.generator.arms):
        generator = training.train_generator(config, workdir, arm, sp["train"], victims["undefended"])
      timings[f"{arm}_train_s"] = time.perf_counter() - t0
      t0 = time.perf_counter()
      for vi, (victim, params) in enumerate(victims.items()):
        digest = ev.victim_digest(sub.model, params)
        extra = {"generator": cellstore.tree_digest(generator[1])} if generator is not None else None
        cells = ev.make_cells(config, arm, victim, digest, data, extra)
        cells_by_victim[f"{arm}/{victim}"] = cells
        key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(int(config.attack.seed)), ai), vi)
        progress = common.Progress(len(table.missing(cells.values())), name=f"deform eval {arm}/{victim}",
                                   unit="cells")  # a 3D per-case attack cell takes minutes on a CPU
        n = ev.evaluate(table, cells, apply_fn, params, data, config, key, progress=progress,
                        generator=generator if victim == "undefended" else None)
        logging.info("deform: %s/%s: %d of %d cells computed", arm, victim, n, len(cells))
      gates[arm] = _gate(config, apply_fn, victims["undefended"], data, sp["train"])
      models[arm] = (apply_fn, victims, generator)
      timings[f"{arm}_eval_s"] = time.perf_counter() - t0

    results = os.path.join(workdir, "results")
    summary = ev.summary_rows(table, cells_by_victim, case_ids)
    io_utils.write_csv(os.path.join(results, RESULT_TABLES["summary"]), summary)
    per_case = ev.per_case_rows(table, cells_by_victim, case_ids)
    io_utils.write_csv(os.path.join(results, "per_case.csv"), per_case)
    comparisons = _comparisons(config, table, cells_by_victim, case_ids)
    io_utils.write_csv(os.path.join(results, RESULT_TABLES["comparisons"]), comparisons)
    io_utils.write_csv(os.path.join(results, RESULT_TABLES["claims"]), ev.claim_rows(config, summary, comparisons),
                       fieldnames=["arm", "claim", "statistic", "value", "threshold", "verdict"])
    for arm in config.arms:  # results/stages/example_<arm>.json
      _examples(config, workdir, arm, arm_data[arm], *models[arm])
    report_lib.summary_figures(config, workdir, summary, per_case)
    io_utils.write_csv(os.path.join(results, "gate.csv"), [dict(arm=a, **g) for a in gates for g in gates[a]])
    headline = _headline(config, summary, comparisons, timings, t_start)
    headline["gate"] = gates
    headline["generator_extra_cases"] = training.extra_generator_cases(config)
    headline["generator_delta_range"] = list(training.generator_delta_range(config))
    io_utils.write_json(os.path.join(results, "headline.json"), headline)
    if workdir_lib.is_writer():  # the report from the files just written, as `render` writes it again
      render(workdir)
    logging.info("deform: done in %.0f s; report at %s", headline["wall_seconds"], os.path.join(workdir, "report.md"))
    return headline


RESULT_TABLES = {"summary": "summary.csv", "comparisons": "comparisons.csv", "claims": "claims.csv"}


def render(workdir: str) -> str:
  """report.md of a finished workdir written again from its result files alone (results/summary.csv,
  comparisons.csv, headline.json, the example stages, config.json): nothing is trained, attacked or scored, and
  the figures already in figures/ are linked, not drawn. Returns the report's path."""
  example = lambda arm: os.path.join("results", "stages", f"example_{arm}.json")
  workdir, config = common.finished_workdir(workdir, "study 3",
                                            [os.path.join("results", f) for f in RESULT_TABLES.values()],
                                            more=lambda config: [example(arm) for arm in config.arms])
  results = os.path.join(workdir, "results")
  stages = {arm: os.path.join(workdir, example(arm)) for arm in config.arms}
  res = {k: io_utils.read_csv(os.path.join(results, f)) for k, f in RESULT_TABLES.items()}
  headline = workdir_lib.read_json(os.path.join(results, "headline.json"), workdir)
  examples = {arm: workdir_lib.read_json(p, workdir)["result"] for arm, p in stages.items()}
  figs = {arm: os.path.join(workdir, "figures", report_lib.summary_figure_name(arm)) for arm in config.arms}
  report_lib.write_report(config, workdir, res["summary"], res["comparisons"], res["claims"], headline, examples,
                          figs)
  return os.path.join(workdir, "report.md")


def _gate(config, apply_fn, params, data, train_cases, batch: int = 4) -> list[dict]:
  """The learnt-region gate on the undefended victim's clean per-region Dice over the arm's held-out data."""
  preds = np.concatenate([np.asarray(jnp.argmax(apply_fn(params, jnp.asarray(data["image"][i:i + batch])), -1))
                          for i in range(0, len(data["image"]), batch)])
  return learnt_lib.gate_regions(
      config.gate, learnt_lib.region_dice(preds, data["label"]), data["label"], val_images=data["image"],
      val_brains=brain_mask(data["image"]),
      train_cases=[(c.image, c.label, brain_mask(c.image)) for c in train_cases])


def _values(table, cells, victim, threat, budget, ids, metric="dice"):
  return table.values(cells[victim][(threat, float(budget))], metric, ids)


def _comparisons(config, table, cells, case_ids) -> list[dict]:
  """Paired comparisons; the declared primary family is Holm-corrected, the rest is exploratory.

  Primary, per arm: (1) deform_max vs random on the undefended model (the attack must beat random fields of
  the same budgets); (2) the generator at the largest Delta vs random (unseen cases); and for arms with the
  defence: (3) augmented vs undefended under deform_max, (4) under PGD at eval.reference_eps. Differences are
  a - b of Dice (b - a for "beats random": positive = the attack lowers Dice more).
  """
  rows = []
  deltas = [float(d) for d in config.attack.deltas]
  eps = [float(e) for e in config.attack.eps]
  ref_eps = min(eps, key=lambda e: abs(e - float(config.eval.reference_eps))) if eps else None
  for arm in config.arms:
    ids = case_ids[arm]
    und = f"{arm}/undefended"
    rnd = _values(table, cells, und, "random", 1.0, ids)
    if (("deform_max", 1.0)) in cells[und]:
      rows.append(ev.comparison("random - deform_max Dice (undefended)", rnd,
                                _values(table, cells, und, "deform_max", 1.0, ids), primary=True, arm=arm))
    for d in deltas:
      if ("generator", d) in cells[und]:
        rows.append(ev.comparison(f"random - generator(Delta={d:g}) Dice (undefended)", rnd,
                                  _values(table, cells, und, "generator", d, ids), primary=d == max(deltas), arm=arm))
      rows.append(ev.comparison(f"random - deform(Delta={d:g}) Dice (undefended)", rnd,
                                _values(table, cells, und, "deform", d, ids), primary=False, arm=arm))
    aug = f"{arm}/augmented"
    if aug in cells:
      pairs = [("deform_max", 1.0, True)] if ("deform_max", 1.0) in cells[aug] else []
      pairs += [("random", 1.0, False)] + [("deform", d, False) for d in deltas]
      pairs += [(t, e, t == "pgd" and e == ref_eps) for t in config.attack.gradient_attacks for e in eps]
      for threat, budget, primary in pairs:
        rows.append(ev.comparison(f"augmented - undefended Dice under {threat}({budget:g})",
                                  _values(table, cells, aug, threat, budget, ids),
                                  _values(table, cells, und, threat, budget, ids), primary=primary, arm=arm))
      rows.append(ev.comparison("augmented - undefended clean Dice",
                                _values(table, cells, aug, "random", 1.0, ids, "dice_clean"),
                                _values(table, cells, und, "random", 1.0, ids, "dice_clean"), primary=False, arm=arm))
  return ev.with_holm(rows)


def _headline(config, summary, comparisons, timings, t_start) -> dict:
  out = {"wall_seconds": time.perf_counter() - t_start, **timings, "arms": {}}
  for arm in config.arms:
    a = {}
    for r in summary:
      if not r["victim"].startswith(arm + "/"):
        continue
      key = f"{r['victim'].split('/')[1]}/{r['threat']}/{r['budget']:g}"
      a[key] = {k: r[k] for k in ("dice_clean", "dice", "drop", "drop_error_mean", "reached", "folded_max",
                                  "max_disp") if k in r}
    a["n"] = next((r["n"] for r in summary if r["victim"].startswith(arm + "/")), 0)
    out["arms"][arm] = a
  out["primary"] = [{k: c[k] for k in ("arm", "comparison", "mean_diff", "ci_low", "ci_high", "p_value", "p_holm",
                                       "n", "n_effective")} for c in comparisons if c["primary"]]
  return out


def _examples(config, workdir, arm, data, apply_fn, victims, generator) -> dict:
  """Example figure (undefended model, per-case attack at eval.example_delta) and NIfTI volumes; a cached stage."""
  params = victims["undefended"]
  delta = float(config.eval.example_delta)
  k = max(1, int(config.eval.n_volumes))
  depends_on = {"params": cellstore.tree_digest(params), "data": data["digest"], "delta": delta, "k": k,
                "deform": config.deform.to_dict(), "version": ev.EVAL_VERSION}
  files_exist = lambda r: all(os.path.exists(os.path.join(workdir, p)) for p in r["figures"] + r["volumes"])

  def compute():
    s = deform.settings(config.deform)
    x, y = jnp.asarray(data["image"][:k]), jnp.asarray(data["label"][:k])
    z, info = deform.attack(apply_fn, params, x, y, jnp.full((k,), delta), jax.random.PRNGKey(0), s)
    out = deform.evaluate(apply_fn, params, x, y, z, s)
    pred_clean = np.asarray(jnp.argmax(apply_fn(params, x), -1))
    zr = ev.random_fields(ev.case_keys(jax.random.PRNGKey(1), k), x.shape, s)
    rnd = deform.evaluate(apply_fn, params, x, y, zr, s)
    figs, vols = [], []
    for i in range(k):
      cid = data["case_id"][i]
      figs.append(report_lib.example_figure(
          os.path.join(workdir, "figures", f"example_{arm}_{cid}.png"), np.asarray(x[i]), np.asarray(out["image"][i]),
          np.asarray(y[i]), np.asarray(out["label"][i]), pred_clean[i], np.asarray(out["pred"][i]),
          np.asarray(out["disp"][i]), np.asarray(rnd["image"][i]), np.asarray(rnd["pred"][i]),
          title=f"{arm} {cid}: Delta={delta:g}, clean Dice {float(info['clean'][i]):.3f} -> "
                f"{float(out['dice'][i]):.3f} (random fields: {float(rnd['dice'][i]):.3f})",
          channel=len(data["modalities"]) - 1, channel_name=data["modalities"][-1]))
      vol = lambda a: a[:, :, None] if arm == "2d" else a  # a 2D slice as a one-slice volume
      base = os.path.join(workdir, "volumes", f"{arm}_{cid}_delta{delta:g}")
      aff = data["affine"][i]
      vols += [nifti.save_volume(base + "_image.nii.gz", vol(np.asarray(out["image"][i])), aff),
               nifti.save_volume(base + "_label.nii.gz", vol(np.asarray(out["label"][i]).astype(np.int16)), aff),
               nifti.save_volume(base + "_pred.nii.gz", vol(np.asarray(out["pred"][i]).astype(np.int16)), aff),
               nifti.save_volume(base + "_clean_pred.nii.gz", vol(pred_clean[i].astype(np.int16)), aff)]
    rel = lambda p: os.path.relpath(p, workdir)
    return {"figures": [rel(p) for p in figs], "volumes": [rel(p) for p in vols], "delta": delta,
            "cases": list(data["case_id"][:k])}

  return common.cached_stage(os.path.join(workdir, "results", "stages", f"example_{arm}.json"), depends_on,
                             compute, valid=files_exist)
