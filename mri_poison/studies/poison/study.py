"""Study 1: `run(config, workdir)`, the synthetic-poisoning sweep from data to report.md."""
from __future__ import annotations

import os
import time

import numpy as np
from absl import logging

from mri_poison import cellstore
from mri_poison import io_utils
from mri_poison.data.case import REGIONS
from mri_poison.poison import detect
from mri_poison.poison import mixing
from mri_poison.poison import translation
from mri_poison.studies import common
from mri_poison.studies import learnt as learnt_lib
from mri_poison.studies.poison import evaluation
from mri_poison.studies.poison import training
from mri_poison.studies.poison import translator
from mri_poison.studies.poison.report import dice_figure, write_report
from mri_poison.train import workdir as workdir_lib

# What may change between runs of one workdir: adding seeds or modes trains only the new sweeps; evaluation and
# detection settings only add or recompute results. Anything else would change the GAN or the segmenters.
RESUMABLE_KEYS = ("eval.", "detect.", "gate.", "sweep.seeds", "sweep.modes", "sweep.stacked")
PAPER = {2: 0.8937, 5: 0.7474}  # the seed paper's mean Dice at 33.33 % and 83.33 % synthetic (its own data)


def check(config) -> None:
  """`common.check_study`: the config and the data sources, before anything is written."""
  common.check_study(config, _check_config, (config.data,))


def _check_config(config) -> None:
  sw = config.sweep
  n_parts = int(sw.n_parts)
  ks = tuple(int(k) for k in sw.ks)
  if n_parts < 1 or not ks or 0 not in ks or min(ks) < 0 or max(ks) >= n_parts or len(set(ks)) != len(ks):
    raise ValueError(f"config sweep.ks={ks}: expected distinct shares k/{n_parts} with 0 <= k < sweep.n_parts, "
                     "including k = 0 (the all-real reference)")
  modes = tuple(sw.modes)
  if not modes or any(m not in mixing.MODES for m in modes):
    raise ValueError(f"config sweep.modes={modes}: expected a non-empty subset of {mixing.MODES}")
  if not tuple(sw.seeds):
    raise ValueError("config sweep.seeds: expected at least one seed")
  if int(config.model.out_channels) != 1:
    raise ValueError("config model.out_channels must be 1 (binary enhancing-tumour segmenter)")
  translation.channels(config.gan, config.data.modalities)


def run(config, workdir: str, *, splits: dict | None = None) -> dict:
  """Runs the study in `workdir`; returns the headline numbers (see report.md for everything).

  A rerun reuses the GAN, every trained sweep and every evaluation cell; more seeds or another mode (sweep.seeds,
  sweep.modes) train only the new sweeps.
  """
  t_start = time.perf_counter()
  _check_config(config)
  common.check_workdir(workdir, config, resumable_keys=RESUMABLE_KEYS)
  train, val = common.train_and_held_out(config.data, splits)  # bad data fails before the workdir is written
  with common.study_workdir(workdir, config, resumable_keys=RESUMABLE_KEYS, seed=int(config.seed)) as (workdir, _):
    common.record_data(workdir, config.data, {"train": train, "val": val})
    results = os.path.join(workdir, "results")
    source, target = translation.channels(config.gan, config.data.modalities)

    # 1. The GAN and the synthetic target contrast of every case.
    t0 = time.perf_counter()
    gen_params = translator.train(config, workdir, train)
    gan_digest = cellstore.tree_digest(gen_params)
    synth_train = translation.synthesize_volumes(config.gan, gen_params, train, source)
    quality = translator.quality_stage(config, workdir, gen_params, gan_digest, val)
    gan_s = time.perf_counter() - t0

    # 2. The sweeps: one stacked training per (mode, seed).
    name = str(config.gan.target)
    real_seg = training.target_only(train, target, name)
    val_seg = training.target_only(val, target, name)
    ks, n_parts = [int(k) for k in config.sweep.ks], int(config.sweep.n_parts)
    val_image = np.stack([c.image for c in val_seg]).astype(np.float32)
    val_label = np.stack([c.label for c in val_seg]).astype(np.int32)
    val_ids = [c.case_id for c in val_seg]
    val_digest = cellstore.tree_digest((val_image, val_label))
    table = cellstore.CellTable(os.path.join(results, "cells.csv"))
    from mri_poison.train import state as state_lib
    apply_fn = state_lib.make_apply_fn(state_lib.make_model(config.model))
    records, cells, t_train, t_eval = [], {}, 0.0, 0.0
    for mode in config.sweep.modes:
      for seed in config.sweep.seeds:
        sets = [mixing.mix_cases(real_seg, synth_train, k, mode=mode, n_parts=n_parts, seed=int(seed)) for k in ks]
        records += [r for _, r in sets]
        sub = training.segmenter_config(config, int(seed), sweep={"mode": mode, "ks": ks, "n_parts": n_parts,
                                                                  "gan": gan_digest})
        t0 = time.perf_counter()
        logging.info("poison sweep: training %s seed %d (%d models) in %s", mode, int(seed), len(ks),
                     os.path.join(workdir, "models", mode, f"seed{int(seed)}"))
        params = training.train_sweep(sub, os.path.join(workdir, "models", mode, f"seed{int(seed)}"),
                                      [c for c, _ in sets], stacked=config.sweep.stacked)
        t_train += time.perf_counter() - t0
        t0 = time.perf_counter()
        entries = [(mode, int(seed), k, r["share"], cellstore.tree_digest(p)) for k, (_, r), p in zip(ks, sets, params)]
        these = evaluation.make_cells(entries, val_ids, val_digest)
        cells.update(these)
        todo = table.missing(these.values())
        if todo:
          pred = evaluation.predict_et(apply_fn, params, val_image)
          for m, key in enumerate(these):
            if these[key] in todo:
              table.add(these[key], val_ids, evaluation.case_metrics(pred[m], val_label))
          table.save()
        t_eval += time.perf_counter() - t0
    io_utils.write_json(os.path.join(results, "mixing.json"), records)

    # 3. Tables and statistics, on the validation cases that contain ET (the primary metric: on an ET-free case
    # an empty prediction scores Dice 1, which a segmenter that never finds ET would collect).
    et_present = dict(zip(val_ids, learnt_lib.regions_present(val_label)[:, REGIONS.index("ET")]))
    stat_ids = [c for c in val_ids if et_present[c]]
    per_case = [{"mode": mode, "seed": seed, "k": k, "share": cells[(mode, seed, k)].budget, "case": case,
                 "et_present": bool(et_present[case]),
                 **{m: table.values(cells[(mode, seed, k)], m, [case])[0] for m in evaluation.METRICS}}
                for (mode, seed, k) in cells for case in val_ids]
    io_utils.write_csv(os.path.join(results, "per_case.csv"), per_case)
    gate = _gate(config, per_case, val_ids, real_seg, val_image, val_label)
    io_utils.write_csv(os.path.join(results, "gate.csv"), gate)
    per_case = [r for r in per_case if r["et_present"]] if stat_ids else per_case
    val_ids = stat_ids or val_ids
    sweep_rows = _sweep_rows(per_case, config)
    io_utils.write_csv(os.path.join(results, "poison_sweep.csv"), sweep_rows)
    tests = []
    n_boot = int(config.eval.n_boot)
    for mode in config.sweep.modes:
      for metric in evaluation.METRICS:
        averaged = {k: _seed_average(per_case, mode, k, metric, val_ids) for k in ks}
        for r in evaluation.comparisons(averaged, ks, n_boot=n_boot, seed=int(config.seed)):
          tests.append({"mode": mode, "metric": metric, "primary": mode == "replace" and metric == "dice", **r})
    io_utils.write_csv(os.path.join(results, "comparisons.csv"), tests)

    # 4. Detectability of the poison (cached on the GAN and the detector settings).
    t0 = time.perf_counter()
    depends = {"gan": gan_digest, "detect": config.detect.to_dict(), "train": [c.case_id for c in train],
               "val": val_ids, "data": val_digest}
    detection = common.cached_stage(
        os.path.join(results, "stages", "detectability.json"), depends,
        lambda: detect.detectability([c.image[..., target] for c in train], synth_train,
                                     [c.image[..., target] for c in val], quality["synthetic"], config.detect))
    io_utils.write_json(os.path.join(results, "detectability.json"), detection)
    detect_s = time.perf_counter() - t0

    dice_figure(sweep_rows, config, os.path.join(workdir, "figures", FIGURES["dice"]))
    headline = _headline(sweep_rows, tests, detection, quality, config, n_val=len(val_ids))
    headline.update({"gate": gate, "et_learnt": bool(gate[0]["learnt"]), "n_val_all": len(et_present),
                     "n_train": len(train)})
    headline.update({"wall_seconds": time.perf_counter() - t_start, "gan_seconds": gan_s,
                     "sweep_train_seconds": t_train, "eval_seconds": t_eval, "detect_seconds": detect_s})
    io_utils.write_json(os.path.join(results, "headline.json"), headline)
    if workdir_lib.is_writer():  # from the files just written, as `render` writes it again later
      render(workdir)
    logging.info("poison sweep: done in %.0f s; report at %s", headline["wall_seconds"],
                 os.path.join(workdir, "report.md"))
    return headline


RESULT_FILES = {"sweep": "poison_sweep.csv", "tests": "comparisons.csv", "detection": "detectability.json",
                "headline": "headline.json", "gan_grid": os.path.join("stages", "gan_grid.json")}
FIGURES = {"dice": "dice_vs_share.png"}  # the GAN grid's path is its stage's result (results/stages/gan_grid.json)


def render(workdir: str) -> str:
  """report.md of a finished workdir written from its result files alone (config.json, results/poison_sweep.csv,
  comparisons.csv, detectability.json, headline.json and the GAN grid's stage): nothing is loaded, trained or
  scored. `run` writes its report through here. Returns the report's path."""
  workdir, config = common.finished_workdir(workdir, "study 1",
                                            [os.path.join("results", f) for f in RESULT_FILES.values()])
  paths = {k: os.path.join(workdir, "results", f) for k, f in RESULT_FILES.items()}
  sweep_rows, tests = io_utils.read_csv(paths["sweep"]), io_utils.read_csv(paths["tests"])
  detection, headline = (workdir_lib.read_json(paths[k], workdir) for k in ("detection", "headline"))
  figs = {"dice": os.path.join(workdir, "figures", FIGURES["dice"]),
          "gan": os.path.join(workdir, workdir_lib.read_json(paths["gan_grid"], workdir)["result"])}
  write_report(config, workdir, headline, sweep_rows, tests, detection, figs, paper=PAPER)
  return os.path.join(workdir, "report.md")


def _gate(config, per_case, val_ids, train_cases, val_image, val_label) -> list[dict]:
  """The learnt-region gate for ET on the clean (k = 0) segmenters' seed-averaged Dice; the intensity baseline
  sees the same single contrast as the segmenters."""
  mode = str(tuple(config.sweep.modes)[0])
  dice = _seed_average([r for r in per_case if r["mode"] == mode], mode, 0, "dice", val_ids)
  by_region = np.stack([np.full_like(dice, np.nan), np.full_like(dice, np.nan), dice], axis=1)
  brains = val_image[..., 0] != 0
  return learnt_lib.gate_regions(config.gate, by_region, val_label, val_images=val_image, val_brains=brains,
                                 train_cases=[(c.image, c.label, c.image[..., 0] != 0) for c in train_cases],
                                 regions=("ET",))


def _seed_average(per_case, mode, k, metric, case_ids) -> np.ndarray:
  """(N,) per-case `metric` of (mode, k) averaged over the sweep's seeds, in the order of case_ids."""
  by_case: dict[str, list[float]] = {}
  for r in per_case:
    if r["mode"] == mode and r["k"] == k:
      by_case.setdefault(r["case"], []).append(float(r[metric]))
  return np.asarray([np.mean(by_case[c]) for c in case_ids])


def _sweep_rows(per_case, config) -> list[dict]:
  """results/poison_sweep.csv: per (mode, seed, k) and per (mode, k) over seeds ("all"): mean and SD over cases
  of every metric; the "all" rows add the SD of the per-seed means (seed-to-seed spread)."""
  rows = []
  ks = [int(k) for k in config.sweep.ks]
  for mode in config.sweep.modes:
    for k in ks:
      mine = [r for r in per_case if r["mode"] == mode and r["k"] == k]
      seeds = sorted({r["seed"] for r in mine})
      for seed in seeds + ["all"]:
        sel = mine if seed == "all" else [r for r in mine if r["seed"] == seed]
        row = {"mode": mode, "seed": seed, "k": k, "share": float(np.mean([r["share"] for r in sel])),
               "share_pct": 100.0 * float(np.mean([r["share"] for r in sel])), "n_cases": len({r["case"] for r in sel})}
        for m in evaluation.METRICS:
          if seed == "all":
            cases = sorted({r["case"] for r in sel})
            v = np.asarray([np.mean([r[m] for r in sel if r["case"] == c]) for c in cases])
            per_seed = [np.mean([r[m] for r in sel if r["seed"] == s]) for s in seeds]
            row[f"{m}_seed_sd"] = float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else 0.0
          else:
            v = np.asarray([r[m] for r in sel])
          row[f"{m}_mean"], row[f"{m}_sd"] = float(np.mean(v)), float(np.std(v, ddof=1)) if v.size > 1 else 0.0
        rows.append(row)
  return rows


def _headline(sweep_rows, tests, detection, quality, config, *, n_val) -> dict:
  ks = [int(k) for k in config.sweep.ks]
  out = {"n_val": n_val, "seeds": [int(s) for s in config.sweep.seeds], "ks": ks,
         "gan_quality": quality["summary"],
         "detect_auc": {"cnn": detection["cnn"], "frequency": detection["frequency"]}}
  for mode in config.sweep.modes:
    agg = {r["k"]: r for r in sweep_rows if r["mode"] == mode and r["seed"] == "all"}
    means = [agg[k]["dice_mean"] for k in ks]
    top = max(ks)
    test = next((t for t in tests if t["mode"] == mode and t["metric"] == "dice" and t["k"] == top), None)
    out[mode] = {
        "dice": {str(k): agg[k]["dice_mean"] for k in ks},
        "dice_sd": {str(k): agg[k]["dice_sd"] for k in ks},
        "dice_seed_sd": {str(k): agg[k]["dice_seed_sd"] for k in ks},
        "share": {str(k): agg[k]["share"] for k in ks},
        "monotone_decreasing": bool(all(a >= b for a, b in zip(means, means[1:]))),
        "kendall_tau_dice_vs_k": _kendall(ks, means),
        "top_vs_0": test,
    }
  return out


def _kendall(x, y) -> float:
  import scipy.stats
  if len(x) < 2:
    return float("nan")
  return float(scipy.stats.kendalltau(x, y).statistic)

