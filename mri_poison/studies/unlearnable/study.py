"""Study 4: `run(config, workdir)`: protect the training split, train fresh victims on it, test on clean data."""
from __future__ import annotations

import os
import time

import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from mri_poison import cellstore
from mri_poison import io_utils, metrics
from mri_poison.ops import morphology
from mri_poison.poison import protected_io
from mri_poison.poison import protections
from mri_poison.poison import unlearnable as ul
from mri_poison.studies import common
from mri_poison.studies.unlearnable import analysis
from mri_poison.studies.unlearnable import counter
from mri_poison.studies.unlearnable import report
from mri_poison.studies.unlearnable import victims
from mri_poison.train import loop as train_loop
from mri_poison.train import state as state_lib
from mri_poison.train import workdir as workdir_lib

# What may change between runs of one workdir: evaluation and report settings only add or re-derive results.
RESUMABLE_KEYS = ("eval.", "gate.")
EVAL_VERSION = 1


# ------------------------------------------------------------------------------------------------ config


def check(config) -> None:
  """`common.check_study`: the config and the data sources, before anything is written."""
  common.check_study(config, _check_config, (config.data,))


def _check_config(config) -> None:
  p = config.protect
  methods = tuple(p.methods)
  if not methods or methods[0] != "none" or any(m not in protections.names() for m in methods) or len(set(methods)) != len(methods):
    raise ValueError(f"config protect.methods={methods}: expected 'none' first, then distinct names of {protections.names()}")
  regimes = tuple(config.counter.regimes)
  if not regimes or regimes[0] != "standard" or any(r not in counter.REGIMES for r in regimes):
    raise ValueError(f"config counter.regimes={regimes}: expected 'standard' first, then names of {counter.REGIMES}")
  fractions = tuple(float(f) for f in p.fractions)
  if any(not 0 < f <= 1 for f in fractions):
    raise ValueError(f"config protect.fractions={fractions}: expected fractions in (0, 1]")
  if any(m not in methods[1:] for m in tuple(config.counter.methods)):
    raise ValueError(f"config counter.methods={tuple(config.counter.methods)}: expected protections of "
                     f"protect.methods={methods[1:]}")
  if any(m not in methods for m in tuple(config.replicates.methods)) or int(config.train.seed) in tuple(
      int(s) for s in config.replicates.seeds):
    raise ValueError(f"config replicates: methods {tuple(config.replicates.methods)} must be in protect.methods and "
                     f"seeds {tuple(config.replicates.seeds)} must differ from train.seed={config.train.seed}")
  if str(p.partial_method) not in methods:
    raise ValueError(f"config protect.partial_method={p.partial_method!r}: must be one of protect.methods")
  if not 0 < float(p.eps) < 1:
    raise ValueError(f"config protect.eps={p.eps}: expected a budget in (0, 1) on [0, 1]-scaled intensities")
  if str(config.data.mode) != "2d":
    raise ValueError("config data.mode: study 4 protects and trains on 2D axial slices; set data.mode='2d'")
  if int(p.umed.k) < 1:
    raise ValueError(f"config protect.umed.k={p.umed.k}: expected >= 1")
  sweep = tuple(float(e) for e in p.sweep_eps)
  if any(not 0 < e < 1 for e in sweep) or float(p.eps) in sweep:
    raise ValueError(f"config protect.sweep_eps={sweep}: expected budgets in (0, 1) other than protect.eps")
  if sweep and str(p.sweep_method) not in protections.names()[1:]:
    raise ValueError(f"config protect.sweep_method={p.sweep_method!r}: expected one of {protections.names()[1:]}")


# ------------------------------------------------------------------------------------------------ protection


def quality(cases, protected_cases, width: int) -> dict[str, list[float]]:
  """Per training case: PSNR / SSIM on [0, 1]-scaled intensities, the perturbation's share in ROI and band."""
  out = {k: [] for k in analysis.QUALITY}
  for c, pc in zip(cases, protected_cases):
    x, xp = np.asarray(c.image, np.float64), np.asarray(pc.image, np.float64)
    r = ul.case_range(c.image)
    lo = x.min(axis=(0, 1, 2))
    out["psnr"].append(min(ul.scaled_psnr(x, xp, r), 200.0))  # identical images: capped, not inf, in the csv
    out["ssim"].append(float(np.mean([metrics.ssim((x[..., k] - lo[k]) / r[k], (xp[..., k] - lo[k]) / r[k],
                                                   data_range=1.0) for k in range(x.shape[-1])])))
    tumour = jnp.moveaxis(jnp.asarray(c.label > 0), 2, 0)  # (Z, X, Y): slice-wise 2D morphology
    band = np.moveaxis(np.asarray(morphology.contour_band(tumour, width, 2)), 0, 2)
    support = np.moveaxis(np.asarray(morphology.dilate(tumour, width, 2)), 0, 2)
    delta = xp - x
    out["share_roi"].append(ul.share_inside(delta, support))
    out["share_band"].append(ul.share_inside(delta, band))
    out["linf_scaled"].append(float(np.max(np.abs(delta) / r)))
  return out


def _write_protected(workdir, config, protected, train_digest) -> dict[str, str]:
  """The protected training splits: BraTS NIfTI folders protected/<method>/ (eval.write_cases of them) and, with
  eval.write_tfds, the whole split as TFDS `brats_protected/<method>` under protected_tfds/ (array_record)."""
  k = int(config.eval.write_cases)
  out = {}
  for m, cases in protected.items():
    if m == "none":
      continue
    if k != 0:
      chosen = cases if k < 0 else cases[:k]
      root = os.path.join(workdir, "protected", m)
      depends_on = {"data": cellstore.tree_digest([c.image for c in chosen]), "ids": [c.case_id for c in chosen],
                    "train": train_digest}
      files_exist = lambda r: all(os.path.isdir(os.path.join(workdir, d)) for d in r)
      common.cached_stage(os.path.join(workdir, "results", "stages", f"protected_{m}.json"), depends_on,
                          lambda: [os.path.relpath(d, workdir) for d in protected_io.write_brats_folder(root, chosen)],
                          valid=files_exist)
      out[m] = os.path.relpath(root, workdir)
    if bool(config.eval.get("write_tfds", False)):
      data_dir = os.path.join(workdir, "protected_tfds")
      depends_on = {"data": cellstore.tree_digest([c.image for c in cases]), "ids": [c.case_id for c in cases],
                    "train": train_digest, "format": protected_io.TFDS_NAME}
      tfds_exists = lambda r: os.path.isfile(os.path.join(workdir, r["path"], "dataset_info.json"))

      def write(m=m, cases=cases, data_dir=data_dir):
        name = protected_io.write_tfds(data_dir, m, cases)
        version = os.path.join(data_dir, name, str(protected_io.BratsProtected.VERSION))
        return {"tfds_name": name, "data_dir": os.path.relpath(data_dir, workdir),
                "path": os.path.relpath(version, workdir)}

      stage = common.cached_stage(os.path.join(workdir, "results", "stages", f"protected_tfds_{m}.json"),
                                  depends_on, write, valid=tfds_exists)
      out[f"{m} (tfds)"] = f"{stage['tfds_name']} in {stage['data_dir']}"
  return out


# ------------------------------------------------------------------------------------------------ victims


def _victim_plan(config) -> list[tuple[str, str, str, float, float]]:
  """(victim name, protection, regime, fraction protected, eps) of every victim, in training order."""
  p, regimes = config.protect, tuple(config.counter.regimes)
  eps = float(p.eps)
  countered = ("none",) + tuple(config.counter.methods)
  plan = [(f"{m}/{r}", m, r, 1.0, eps) for r in regimes for m in tuple(p.methods) if r == "standard" or m in countered]
  for f in (float(f) for f in p.fractions):
    if f < 1.0:
      plan.append((f"{p.partial_method}@{f:g}/standard", str(p.partial_method), "standard", f, eps))
  for m in tuple(config.replicates.methods):
    for seed in (int(s) for s in config.replicates.seeds):
      plan.append((f"{m}/standard@seed={seed}", m, "standard", 1.0, eps))
  for e in (float(e) for e in p.sweep_eps):
    plan.append((f"{victims.protection_name(str(p.sweep_method), e, config)}/standard", str(p.sweep_method), "standard", 1.0,
                 e))
  return plan


def _partial_cases(clean_cases, protected_cases, fraction: float, seed: int):
  n = len(clean_cases)
  k = int(round(fraction * n))
  chosen = set(np.random.default_rng(seed).permutation(n)[:k].tolist())
  return [pc if i in chosen else c for i, (c, pc) in enumerate(zip(clean_cases, protected_cases))]


# ------------------------------------------------------------------------------------------------ the study


def run(config, workdir: str, *, splits: dict | None = None) -> dict:
  """Runs study 4 in `workdir` (see the package doc); returns the headline numbers.

  `splits` ({"train": [Case], "val": [Case]}) overrides load_splits(config.data); "val" is the clean test split.
  """
  t_start = time.perf_counter()
  _check_config(config)
  common.check_workdir(workdir, config, resumable_keys=RESUMABLE_KEYS)
  # Bad data fails before the workdir is written.
  train_cases, test_cases = common.train_and_held_out(config.data, splits, "clean test cases")
  with common.study_workdir(workdir, config, resumable_keys=RESUMABLE_KEYS, seed=int(config.seed)) as (workdir, _):
    common.record_data(workdir, config.data, {"train": train_cases, "val": test_cases})
    headline = _run(config, workdir, train_cases, test_cases, t_start)
    if workdir_lib.is_writer():
      render(workdir, phase_map=False)  # the report before the phase map, which may take long
    if config.phase_map.get("enabled", False):
      from mri_poison.studies.unlearnable import phase_map  # pylint: disable=g-import-not-at-top
      result = phase_map.run(config, os.path.join(workdir, "phase_map"))
      headline["phase_map"] = {k: result[k] for k in ("axis", "values", "eps", "methods", "boundary")}
      if workdir_lib.is_writer():
        render(workdir)
    return headline


def render(workdir: str, *, phase_map: bool = True) -> str:
  """report.md of a finished workdir written again from its result files alone (config.json, results/*.csv and
  headline.json; with config.phase_map.enabled, phase_map/results/phase_map.json, unless phase_map=False):
  nothing is protected, trained or scored, and the figures are not redrawn. Returns the report's path."""
  phase_map_file = os.path.join("phase_map", "results", "phase_map.json")
  with_map = lambda config: phase_map and config.phase_map.get("enabled", False)
  workdir, config = common.finished_workdir(
      workdir, "study 4", [os.path.join("results", f) for f in analysis.RESULT_TABLES.values()],
      more=lambda config: [phase_map_file] if with_map(config) else [])
  path = lambda *p: os.path.join(workdir, *p)
  res = {k: io_utils.read_csv(path("results", f)) for k, f in analysis.RESULT_TABLES.items()}
  return report.write_report(config, workdir, res, workdir_lib.read_json(path("results", "headline.json"), workdir),
                             workdir_lib.read_json(path(phase_map_file), workdir) if with_map(config) else None)


def _run(config, workdir, train_cases, test_cases, t_start):
  p = config.protect
  width = int(p.umed.width)
  data = ul.slice_set(train_cases, width=width)
  methods = tuple(p.methods)
  results = os.path.join(workdir, "results")
  table = cellstore.CellTable(os.path.join(results, "cells.csv"))
  train_ids = [c.case_id for c in train_cases]
  train_digest = cellstore.tree_digest([c.image for c in train_cases])
  plan = _victim_plan(config)

  # 1. protections (resumable fit runs) and their quality cells: each method at eps, the sweep at its budgets
  protected, info, quality_cells = {}, {}, {}
  t0 = time.perf_counter()
  for m, eps in dict.fromkeys([(m, float(p.eps)) for m in methods] + [(mt, e) for _, mt, _, _, e in plan]):
    name = victims.protection_name(m, eps, config)
    logging.info("unlearnable: protecting the training split with %s", name)
    images, info[name] = victims.protect(m, config, workdir, data, eps)
    protected[name] = ul.to_volumes(train_cases, data, images)
    cell = cellstore.make_cell("protection", m, eps, params=cellstore.tree_digest([c.image for c in protected[name]]),
                            settings={}, cases=train_ids, version=EVAL_VERSION, data=train_digest)
    quality_cells[name] = cell
    if cell not in table:
      table.add(cell, train_ids, quality(train_cases, protected[name], width))
      table.save()
  protect_s = time.perf_counter() - t0
  written = _write_protected(workdir, config, {m: protected[m] for m in methods}, train_digest)

  # 2. victims, tested on the clean test split; standard victims also on their own and the clean training data
  apply_fn = state_lib.make_apply_fn(state_lib.make_model(config.model))
  ranges = np.stack([ul.case_range(c.image) for c in train_cases])
  adv_eps_z = float(config.counter.adversarial.eps_scaled) * float(np.median(ranges))
  setups = {r: counter.regime_setup(r, config, apply_fn, adv_eps_z) for r in tuple(config.counter.regimes)}
  victim_apply = {r: state_lib.make_apply_fn(state_lib.make_model(ml_collections.ConfigDict(s[2]["model"])))
                  if "model" in s[2] else apply_fn for r, s in setups.items()}
  test = victims.test_arrays(test_cases)
  train_sets = {"train_clean": victims.test_arrays(train_cases)}
  cells, shortcut_cells, t0 = {}, {}, time.perf_counter()
  progress = common.Progress(len(plan), name="unlearnable victims", unit="victims")
  for i, (name, method, regime, fraction, eps) in enumerate(plan):
    cases = protected[victims.protection_name(method, eps, config)]
    if fraction < 1.0:
      cases = _partial_cases(train_cases, cases, fraction, int(p.seed))
    if regime == "purify":
      cases = [counter.purify_case(c, config.counter.purify) for c in cases]
    data_updates, transform, extra = setups[regime]
    train_updates = {"seed": int(name.split("@seed=")[1])} if "@seed=" in name else None
    protection = {"method": method, "fraction": fraction, "data": cellstore.tree_digest([c.image for c in cases])}
    sub = victims.sub_config(config, name, train=train_updates, data=data_updates, protection=protection, **extra)
    params = train_loop.train_model(sub, os.path.join(workdir, "models", name.replace("/", "_")), cases=cases,
                                    batch_transform=transform)
    digest = cellstore.tree_digest(params)
    cell = cellstore.make_cell(name, method, fraction, params=digest, settings={"regime": regime},
                            cases=test["case_id"], version=EVAL_VERSION, data=test["digest"])
    if cell not in table:
      table.add(cell, test["case_id"], victims.score(victim_apply[regime], params, test, config))
      table.save()
    cells[name] = cell
    if regime == "standard" and "@" not in name:
      # Shortcut check: a victim that learned the protection's shortcut scores well on the protected training
      # data it saw and badly on the same cases without the perturbation.
      own = victims.test_arrays(cases)
      for split, arrays in (("train_protected", own), ("train_clean", train_sets["train_clean"])):
        c = cellstore.make_cell(name, method, fraction, params=digest, settings={"regime": regime, "split": split},
                             cases=arrays["case_id"], version=EVAL_VERSION, data=arrays["digest"])
        if c not in table:
          table.add(c, arrays["case_id"], victims.score(apply_fn, params, arrays, config))
          table.save()
        shortcut_cells[(name, split)] = c
      if fraction == 1.0 and method != "none":  # the victim's hallmark: its CE on what it saw vs the clean slices
        seen = ul.slice_set(cases, width=width)["image"]
        ce_p = ul.surrogate_ce(apply_fn, params, seen, data["label"])
        ce_c = ul.surrogate_ce(apply_fn, params, data["image"], data["label"])
        info[victims.protection_name(method, eps, config)]["victim_hallmark"] = ce_p / max(ce_c, 1e-12)
    progress.update(i + 1)
  victims_s = time.perf_counter() - t0

  facts = {"protection_info": info, "protected_folders": written, "n_train_slices": int(np.shape(data["image"])[0]),
           "protect_s": protect_s, "victims_s": victims_s, "wall_s": time.perf_counter() - t_start}
  return analysis.analyse(config, workdir, table, plan, {"victims": cells, "quality": quality_cells,
                                                          "shortcut": shortcut_cells}, train_cases, test, protected, facts)
