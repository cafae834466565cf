r"""Calibration of the embedded phantom, old (v1) beside new (v2): intensities, separability, U-Net Dice.

  python -m experiments.bench.phantom_stats                      # both versions, ~5 min on 2 cores
  python -m experiments.bench.phantom_stats --versions=v2 --unet=false
  python -m experiments.bench.phantom_stats --out=/tmp/calib --unet_workdir=/tmp/calib/unet   # reuse models

Prints and writes <out>/phantom_stats.json and .md:
1. per modality, the z-scored (inside the brain) mean and SD of each label region and of GM, WM and CSF;
   region volumes beside the MSD Task01 (BraTS 2016-17) medians;
2. separability by intensity alone: the Dice of the best single-modality threshold per region and of per-voxel
   logistic regressions on the four intensities (linear, and with all squares and products), each fitted on the
   training cases (its decision threshold too) and scored on the held-out cases;
3. the Dice (WT, TC, ET) of the reference 3D U-Net trained at the main job's CPU scale (study 2's data, model and
   schedule in experiments/configs/reproduce.py), on the same held-out cases.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import tempfile
import time

from absl import app, flags
import numpy as np

from experiments import launch_utils
from experiments.bench import timing

_VERSIONS = flags.DEFINE_list("versions", ["v1", "v2"], "Phantom versions to compare.")
_STATS_CASES = flags.DEFINE_integer("stats_cases", 10, "Cases for the intensity statistics.")
_STATS_SHAPE = flags.DEFINE_integer("stats_shape", 64, "Phantom grid edge for the intensity statistics.")
_UNET = flags.DEFINE_bool("unet", True, "Train and score the reference U-Net (the slow part).")
_OUT = flags.DEFINE_string("out", "runs/phantom_stats", "Output folder.")
_SCALES = flags.DEFINE_list("scales", ["main"], "Where the separability baselines and the U-Net are measured: "
                            "'main' (the main job's study-2 data and schedule) and/or EDGE:STEPS[:PHANTOM_EDGE], e.g. "
                            "32:800 (the same on EDGE^3 volumes with STEPS training steps, generated at "
                            "PHANTOM_EDGE^3, default EDGE^3).")
_UNET_WORKDIR = flags.DEFINE_string("unet_workdir", "", "Where the U-Nets train (a rerun reuses them); "
                                    "default: a temporary folder.")

MODALITIES = ("t1", "t1ce", "t2", "flair")
REGIONS = {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)}
# MSD Task01_BrainTumour (the BraTS 2016-17 cases), median region volume in cm^3 over 484 training cases, as
# tabulated in openmedlab/Awesome-Medical-Dataset (resources/MSD_Brain.md). Its columns are named ET / ED / NCR
# but hold MSD labels 1 / 2 / 3 in order (label 1 is never smaller than 3.7 cm^3 and present in every case;
# label 3 is missing in 12 cases), i.e. oedema, non-enhancing core, enhancing: our labels 2, 1, 3.
MSD_MEDIAN_CM3 = {"oedema (2)": 54.19, "necrotic / non-enhancing core (1)": 11.7, "enhancing (3)": 15.35}


# ------------------------------------------------------------------------------------------ intensity stats


def tissue_masks(version: str, seed: int, shape, options=None):
  """(z-scored image (X, Y, Z, 4), label, {"GM", "WM", "CSF"} masks outside the tumour, voxel mm^3)."""
  from mri_poison.data import phantom_v1, phantom_v2
  from mri_poison.data.preprocess import brain_mask, zscore
  if version == "v1":
    case, tissue = phantom_v1.make_case_and_tissue(seed, shape, MODALITIES)
    masks = {"GM": tissue == phantom_v1.GM, "WM": tissue == phantom_v1.WM, "CSF": tissue == phantom_v1.CSF}
  else:
    case, maps = phantom_v2.make_case_and_maps(seed, shape, MODALITIES, options)
    f = maps["fractions"]
    masks = {n.upper(): f[..., phantom_v2.T[n]] > 0.5 for n in ("gm", "wm", "csf")}
  brain = brain_mask(case.image)
  masks = {k: m & brain & (case.label == 0) for k, m in masks.items()}
  return zscore(case.image, brain), case.label, masks, float(np.prod(case.spacing))


def intensity_stats(version: str, n_cases: int, shape, options=None) -> dict:
  """{region: {modality: (mean of case means, mean of case SDs)}} and median volumes (cm^3)."""
  per = {}
  volumes = {k: [] for k in MSD_MEDIAN_CM3}
  for seed in range(n_cases):
    image, label, masks, voxel = tissue_masks(version, seed, shape, options)
    regions = {"ET (3)": label == 3, "ED (2)": label == 2, "NCR/NET (1)": label == 1,
               "TC": np.isin(label, (1, 3)), "WT": label > 0, **masks}
    for name, m in regions.items():
      if m.sum() < 3:
        continue
      for c, mod in enumerate(MODALITIES):
        per.setdefault(name, {}).setdefault(mod, []).append((float(image[..., c][m].mean()),
                                                            float(image[..., c][m].std())))
    for (name, _), lab in zip(MSD_MEDIAN_CM3.items(), (2, 1, 3)):
      volumes[name].append(float((label == lab).sum()) * voxel / 1000.0)
  stats = {r: {m: [float(np.mean([v[0] for v in vals])), float(np.mean([v[1] for v in vals]))]
               for m, vals in mods.items()} for r, mods in per.items()}
  return {"regions": stats, "median_cm3": {k: float(np.median(v)) for k, v in volumes.items()}}


# ------------------------------------------------------------------------------------------ baselines


def _voxels(cases):
  """Brain voxels of `cases`: features (N, 4), labels (N,), case index (N,)."""
  xs, ys, idx = [], [], []
  for i, c in enumerate(cases):
    brain = np.any(c.image != 0, axis=-1)
    xs.append(c.image[brain])
    ys.append(c.label[brain])
    idx.append(np.full(int(brain.sum()), i))
  return np.concatenate(xs).astype(np.float64), np.concatenate(ys), np.concatenate(idx)


def _case_dice(pred: np.ndarray, truth: np.ndarray, case: np.ndarray, n: int) -> np.ndarray:
  """Per-case Dice (BraTS convention: both empty -> 1)."""
  tp = np.bincount(case, pred & truth, n)
  ps, ts = np.bincount(case, pred, n), np.bincount(case, truth, n)
  return np.where(ps + ts > 0, 2 * tp / np.maximum(ps + ts, 1), 1.0)


def _best_threshold(score: np.ndarray, truth: np.ndarray) -> float:
  """The threshold on `score` with the highest pooled Dice against `truth`."""
  qs = np.unique(np.quantile(score, np.linspace(0.5, 0.9995, 200)))
  order = np.argsort(score)
  s, t = score[order], truth[order]
  pos_above = np.cumsum(t[::-1])[::-1]  # positives at or above index i
  idx = np.searchsorted(s, qs)
  above = len(s) - idx
  tp = np.where(idx < len(s), pos_above[np.minimum(idx, len(s) - 1)], 0)
  dice = 2 * tp / np.maximum(above + t.sum(), 1)
  return float(qs[int(np.argmax(dice))])


def _features(x: np.ndarray, quadratic: bool) -> np.ndarray:
  cols = [x, np.ones((len(x), 1))]
  if quadratic:
    cols.append(np.stack([x[:, i] * x[:, j] for i in range(x.shape[1]) for j in range(i, x.shape[1])], 1))
  return np.concatenate(cols, 1)


def logistic_fit(x: np.ndarray, y: np.ndarray, *, l2: float = 1e-4, iters: int = 25) -> np.ndarray:
  """Weights of a binary logistic regression by Newton's method (exact on these few features)."""
  w = np.zeros(x.shape[1])
  for _ in range(iters):
    p = 1.0 / (1.0 + np.exp(-np.clip(x @ w, -30, 30)))
    grad = x.T @ (p - y) / len(y) + l2 * w
    hess = (x * (p * (1 - p))[:, None]).T @ x / len(y) + l2 * np.eye(len(w))
    step = np.linalg.solve(hess, grad)
    w -= step
    if np.abs(step).max() < 1e-8:
      break
  return w


def intensity_baselines(train, val, *, max_voxels: int = 300_000, seed: int = 0) -> dict:
  """{method: {region: mean held-out Dice}} for the threshold and logistic-regression baselines."""
  xt, yt, _ = _voxels(train)
  xv, yv, cv = _voxels(val)
  rng = np.random.default_rng(seed)
  sub = rng.permutation(len(xt))[:max_voxels]
  out = {"threshold": {}, "logistic": {}, "logistic_quadratic": {}}
  for region, labels in REGIONS.items():
    truth_t, truth_v = np.isin(yt, labels), np.isin(yv, labels)
    best = (-1.0, None)
    for c in range(xt.shape[1]):
      for sign in (1.0, -1.0):
        thr = _best_threshold(sign * xt[sub, c], truth_t[sub])
        pred = sign * xt[sub, c] >= thr
        d = 2 * (pred & truth_t[sub]).sum() / max(pred.sum() + truth_t[sub].sum(), 1)
        if d > best[0]:
          best = (d, (c, sign, thr))
    c, sign, thr = best[1]
    out["threshold"][region] = float(_case_dice(sign * xv[:, c] >= thr, truth_v, cv, len(val)).mean())
    out["threshold"][f"{region}_rule"] = f"{'' if sign > 0 else '-'}{MODALITIES[c]} >= {sign * thr:.2f}"
    for name, quad in (("logistic", False), ("logistic_quadratic", True)):
      ft = _features(xt[sub], quad)
      w = logistic_fit(ft, truth_t[sub].astype(np.float64))
      thr = _best_threshold(ft @ w, truth_t[sub])
      pred = _features(xv, quad) @ w >= thr
      out[name][region] = float(_case_dice(pred, truth_v, cv, len(val)).mean())
  return out


# ------------------------------------------------------------------------------------------ reference U-Net


def reference_config(version: str, scale: str = "main"):
  """experiments/configs/unet.py's trainer on the main job's study-2 data, model and schedule; `scale`
  EDGE:STEPS[:PHANTOM_EDGE] puts it on EDGE^3 volumes (whole-volume patches, generated at PHANTOM_EDGE^3,
  default EDGE^3) with STEPS steps."""
  from experiments.configs import reproduce, unet
  main = reproduce.get_config("phantom").robustify
  config = unet.get_config("phantom3d")
  config.data = main.data
  config.data.phantom_version = version
  for key in ("features", "norm", "activation", "dropout", "dtype", "deep_supervision"):
    config.model[key] = main.model[key]
  config.train.update({k: main.train[k] for k in ("steps", "lr", "warmup_steps", "weight_decay", "grad_clip",
                                                    "loss", "seed")})
  config.train.update(dict(eval_every=0, ckpt_every=int(main.train.steps)))
  if scale != "main":
    try:
      edge, steps, *made = (int(v) for v in scale.split(":"))
      made = made[0] if made else edge
    except ValueError as e:
      raise app.UsageError(f"--scales: expected 'main' or EDGE:STEPS[:PHANTOM_EDGE], got {scale!r}") from e
    config.data.update(dict(phantom_shape=(made,) * 3, shape=(edge,) * 3, patch_shape=(edge,) * 3))
    config.train.update(dict(steps=steps, ckpt_every=steps))
  config.eval.window = tuple(config.data.patch_shape)
  return config


def unet_dice(config, workdir: str) -> dict:
  from mri_poison.train import train_and_evaluate
  summary = train_and_evaluate(config, workdir)
  return {r: summary[f"{r}_dice"]["mean"] for r in REGIONS} | {"n_val": summary["n_cases"]}


# ------------------------------------------------------------------------------------------ report


def _table(results: dict) -> str:
  versions = list(results["versions"])
  lines = [f"# Phantom calibration ({results['date']})", "", results["machine"], ""]
  methods = [("best single-modality threshold", "threshold"), ("logistic regression, 4 intensities", "logistic"),
             ("logistic regression, + squares and products", "logistic_quadratic"), ("reference 3D U-Net", "unet")]
  scales = list(next(iter(results["versions"].values()))["scales"])
  for scale in scales:
    data = next(iter(results["versions"].values()))["scales"][scale]["data"]
    lines += [f"## Separability at scale `{scale}` (held-out mean Dice; grid {data['shape']}, {data['n_cases']} "
              f"cases of which {data['n_val']} held out, U-Net {data['steps']} steps)", "",
              "| method | " + " | ".join(f"{v} {r}" for v in versions for r in REGIONS) + " |",
              "|---|" + "---|" * (len(versions) * len(REGIONS))]
    for title, key in methods:
      cells = []
      for v in versions:
        res = results["versions"][v]["scales"][scale]
        res = res["separability"] | ({"unet": res["unet"]} if "unet" in res else {})
        cells += [f"{res[key][r]:.3f}" if key in res else "-" for r in REGIONS]
      lines.append(f"| {title} | " + " | ".join(cells) + " |")
    for v in versions:
      rules = results["versions"][v]["scales"][scale]["separability"]["threshold"]
      lines.append(f"\n{v} best thresholds: " + "; ".join(f"{r}: {rules[r + '_rule']}" for r in REGIONS))
    lines.append("")
  lines += ["", "## Z-scored intensity (mean / SD inside the brain) per region", ""]
  lines += ["| region | " + " | ".join(f"{v} {m}" for v in versions for m in MODALITIES) + " |",
            "|---|" + "---|" * (len(versions) * len(MODALITIES))]
  regions = ["ET (3)", "NCR/NET (1)", "ED (2)", "TC", "WT", "GM", "WM", "CSF"]
  for r in regions:
    cells = []
    for v in versions:
      st = results["versions"][v]["intensity"]["regions"].get(r, {})
      cells += [f"{st[m][0]:+.2f} / {st[m][1]:.2f}" if m in st else "-" for m in MODALITIES]
    lines.append(f"| {r} | " + " | ".join(cells) + " |")
  lines += ["", "## Median region volume (cm^3)", "", "| region | MSD Task01 (BraTS 2016-17) | "
            + " | ".join(versions) + " |", "|---|---|" + "---|" * len(versions)]
  for name, ref in MSD_MEDIAN_CM3.items():
    lines.append(f"| {name} | {ref:.1f} | " + " | ".join(
        f"{results['versions'][v]['intensity']['median_cm3'][name]:.1f}" for v in versions) + " |")
  return "\n".join(lines) + "\n"


def _machine() -> str:
  import jax
  return (f"{timing.cpu_name()}; python {platform.python_version()}, numpy {np.__version__}, "
          f"jax {jax.__version__} ({jax.default_backend()})")


def main(argv):
  del argv
  from mri_poison import io_utils
  from mri_poison.data.datasets import load_splits
  results = {"date": datetime.date.today().isoformat(), "machine": _machine(), "versions": {}}
  shape = (_STATS_SHAPE.value,) * 3
  unet_root = _UNET_WORKDIR.value or tempfile.mkdtemp(prefix="phantom_stats_")
  for version in _VERSIONS.value:
    start = time.perf_counter()
    res = {"intensity": intensity_stats(version, _STATS_CASES.value, shape), "scales": {}}
    for scale in _SCALES.value:
      config = reference_config(version, scale)
      splits = load_splits(config.data)
      at = {"separability": intensity_baselines(splits["train"], splits["val"])}
      print(f"{version} at {scale}: intensity-only baselines {json.dumps(at['separability'])}", flush=True)
      if _UNET.value:
        at["unet"] = unet_dice(config, os.path.join(unet_root, version, scale.replace(":", "_")))
        print(f"{version} at {scale}: U-Net {at['unet']}", flush=True)
      at["data"] = {k: config.data[k] for k in ("n_cases", "n_val", "phantom_shape", "shape")}
      at["data"]["steps"] = int(config.train.steps)
      res["scales"][scale] = at
    res["seconds"] = time.perf_counter() - start
    results["versions"][version] = res
  text = _table(results)
  print(text)
  io_utils.write_json(os.path.join(_OUT.value, "phantom_stats.json"), results)
  io_utils.write_text(os.path.join(_OUT.value, "phantom_stats.md"), text)


if __name__ == "__main__":
  launch_utils.run_plain(main)
