"""Study 4's phase map: where do protections work? Data difficulty x budget, colour = victim Dice drop.

`run(config, workdir)` sweeps one data field (config.phase_map.axis, e.g. "data.phantom.tumour_contrast":
how much intensity evidence the phantom's tumour carries) over config.phase_map.levels against the budget
(config.phase_map.eps, [0, 1]-scaled) for each of config.phase_map.methods. At each data point it trains one
clean victim; at each (data, eps, method) it protects the training split (`victims.protect`, the study's own
protections, resumable under workdir/<point>/), trains a victim from scratch on it and scores it on the clean
test split. The drop is the per-case paired difference clean victim - protected victim (mean Dice of the regions
the point's clean victim learnt, `studies.learnt` with config.gate; all three, and the point marked "not learnt",
when it learnt none), with a bootstrap CI over test cases; beside it the PSNR and, for trained protections, the hallmark
(surrogate CE protected / clean; above protect.hallmark_max the point is "not converged").
Writes workdir/results/phase_map.json (atomically) and figures/phase_map.png (one panel per method).
"""
from __future__ import annotations

import copy
import os
import time

from absl import logging
import numpy as np

from mri_poison import io_utils, metrics
from mri_poison.data.case import REGIONS
from mri_poison.data.datasets import load_splits
from mri_poison.poison import protections
from mri_poison.poison import unlearnable as ul
from mri_poison.report import figures
from mri_poison.studies import learnt as learnt_lib
from mri_poison.studies.unlearnable import analysis
from mri_poison.studies.unlearnable import victims
from mri_poison.train import loop as train_loop
from mri_poison.train import state as state_lib


def _set(config, dotted: str, value):
  node, *path, leaf = dotted.split(".")
  target = config[node]
  for key in path:
    target = target[key]
  if leaf not in target:
    raise ValueError(f"config phase_map.axis={dotted!r}: no such field")
  target[leaf] = type(target[leaf])(value)


def _victim(config, workdir, name, cases):
  sub = victims.sub_config(config, name)
  return train_loop.train_model(sub, os.path.join(workdir, "models", name), cases=cases)


def _region_mean(scores: dict, regions) -> np.ndarray:
  """Per test case, the mean Dice over `regions` (from `victims.score`)."""
  return np.mean([scores[f"dice_{r}"] for r in regions], axis=0)


def run(config, workdir: str) -> dict:
  """The phase map (see the module doc); returns the results dict also written to results/phase_map.json."""
  pm = config.phase_map
  methods, values, budgets = tuple(pm.methods), tuple(float(v) for v in pm.levels), tuple(float(e) for e in pm.eps)
  unknown = [m for m in methods if m not in protections.names()[1:]]
  if unknown or not methods:
    raise ValueError(f"config phase_map.methods={methods}: expected protections of {protections.names()[1:]}")
  if any(not 0 < e < 1 for e in budgets):
    raise ValueError(f"config phase_map.eps={budgets}: expected budgets in (0, 1) on [0, 1]-scaled intensities")
  apply_fn = state_lib.make_apply_fn(state_lib.make_model(config.model))
  hallmark_max = float(config.protect.hallmark_max)
  points, t0 = [], time.perf_counter()
  total, done = len(values) * (1 + len(budgets) * len(methods)), 0
  for value in values:
    cfg = copy.deepcopy(config)
    _set(cfg, str(pm.axis), value)
    point_dir = os.path.join(workdir, f"{pm.axis.split('.')[-1]}={value:g}")
    splits = load_splits(cfg.data)
    train, test_cases = splits["train"], splits["val"]
    if not test_cases:
      raise ValueError("config data.n_val: the phase map needs held-out clean test cases")
    test = victims.test_arrays(test_cases)
    data = ul.slice_set(train, width=int(cfg.protect.umed.width))
    clean_scores = victims.score(apply_fn, _victim(cfg, point_dir, "none", train), test, cfg)
    gate = analysis.clean_gate(cfg, np.stack([clean_scores[f"dice_{r}"] for r in REGIONS], axis=1), test, train)
    learnt = learnt_lib.learnt(gate)
    regions = learnt or REGIONS
    clean = _region_mean(clean_scores, regions)
    done += 1
    for eps in budgets:
      for method in methods:
        images, info = victims.protect(method, cfg, point_dir, data, eps)
        protected = ul.to_volumes(train, data, images)
        name = victims.protection_name(method, eps, cfg).replace("/", "_")
        dice = _region_mean(victims.score(apply_fn, _victim(cfg, point_dir, name, protected), test, cfg), regions)
        drop = np.asarray(clean) - np.asarray(dice)
        ci = metrics.bootstrap_ci(drop, n_boot=1000, seed=0)
        psnr = float(np.mean([ul.scaled_psnr(c.image, p.image, ul.case_range(c.image))
                              for c, p in zip(train, protected)]))
        hallmark = info.get("hallmark")
        points.append({"value": value, "eps": eps, "method": method, "clean_dice": float(np.mean(clean)),
                       "dice": float(np.mean(dice)), "drop": ci["estimate"], "drop_low": ci["low"],
                       "drop_high": ci["high"], "psnr": psnr, "hallmark": hallmark,
                       "converged": None if hallmark is None else bool(hallmark <= hallmark_max),
                       "learnt_regions": list(learnt), "n_test": len(drop)})
        done += 1
        elapsed = time.perf_counter() - t0
        logging.info("phase map %d/%d: %s=%g eps %.4g %s drop %.3f [%.3f, %.3f] PSNR %.1f dB (%.0f s, ETA %.0f s)",
                     done, total, pm.axis, value, eps, method, ci["estimate"], ci["low"], ci["high"], psnr,
                     elapsed, elapsed / done * (total - done))
  out = {"axis": str(pm.axis), "values": list(values), "eps": list(budgets), "methods": list(methods),
         "points": points, "seconds": time.perf_counter() - t0, "boundary": boundary(points, methods)}
  io_utils.write_json(os.path.join(workdir, "results", "phase_map.json"), out)
  out["figure"] = figure(out, os.path.join(workdir, "figures", "phase_map.png"))
  return out


def boundary(points, methods, min_drop: float = 0.05) -> dict:
  """Per method and data value, the smallest budget whose drop CI lies above `min_drop` (None: none did), among
  points whose protection converged and whose clean victim learnt a region."""
  out = {}
  for m in methods:
    rows = sorted((p for p in points if p["method"] == m), key=lambda p: (p["value"], p["eps"]))
    per_value = {}
    for p in rows:
      if p["drop_low"] > min_drop and p["converged"] is not False and p.get("learnt_regions", True):
        per_value.setdefault(f"{p['value']:g}", p["eps"])
    out[m] = {f"{v:g}": per_value.get(f"{v:g}") for v in sorted({p["value"] for p in rows})}
  return out


def figure(result: dict, path: str) -> str:
  """Heat maps, one per method: rows = data values, columns = budgets (x 255), colour = mean Dice drop."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  methods, values, budgets = result["methods"], result["values"], result["eps"]
  fig, axes = plt.subplots(1, len(methods), figsize=(3.2 * len(methods), 2.8), squeeze=False)
  grid = {(p["method"], p["value"], p["eps"]): p for p in result["points"]}
  for ax, m in zip(axes[0], methods):
    drop = np.array([[grid[(m, v, e)]["drop"] for e in budgets] for v in values])
    im = ax.imshow(drop, origin="lower", cmap="magma", vmin=min(0.0, float(drop.min())), vmax=max(0.3, float(drop.max())))
    for i, v in enumerate(values):
      for j, e in enumerate(budgets):
        p = grid[(m, v, e)]
        mark = ("" if p["converged"] is not False else "*") + ("" if p.get("learnt_regions", True) else "?")
        ax.text(j, i, f"{p['drop']:.2f}{mark}", ha="center", va="center", fontsize=7,
                color="white" if p["drop"] < 0.15 else "black")
    ax.set_xticks(range(len(budgets)), [f"{e * 255:.3g}" for e in budgets])
    ax.set_yticks(range(len(values)), [f"{v:g}" for v in values])
    ax.set_xlabel("budget (x/255)")
    ax.set_title(m, fontsize=9)
  axes[0][0].set_ylabel(result["axis"].split(".")[-1])
  fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="victim Dice drop")
  fig.suptitle("Dice drop of victims trained on protected data (* = hallmark not converged, "
               "? = clean victim learnt no region)", fontsize=9)
  return figures.save_figure(fig, path)
