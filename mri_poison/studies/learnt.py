"""Did the clean victim learn a tumour region? The gate a study applies before it claims any effect there.

An attack, a poison or a protection can only lower the Dice of a region the clean model segments. A model near
chance on a region scores there from the cases that lack the region (an empty prediction on an empty region is
Dice 1), so averaging such a region into a headline mean, a drop or a paired test measures nothing. A region
(WT, TC, ET) counts as learnt when, on the held-out cases that contain it:

- there are at least `min_cases` of them;
- the clean victim's mean Dice is at least `floor`;
- and it beats an intensity-only baseline on the same cases: a per-voxel multinomial logistic regression on
  the MR contrasts, fitted on the training cases' brain voxels, each region thresholded for its best training
  Dice (no spatial context). A network that does no better than that has learnt nothing an attack on its
  features could remove.

A study reports every region in a table with its verdict and leaves the others out of headline means, drops
and tests ("not learnt: no result").
"""
from __future__ import annotations

from typing import Sequence

import ml_collections
import numpy as np
from scipy import optimize

from mri_poison.data.case import REGIONS, brats_regions


def default_config() -> ml_collections.ConfigDict:
  """The gate's settings [ours: the papers state no such check]."""
  return ml_collections.ConfigDict(dict(
      floor=0.3,  # least mean Dice on the held-out cases that contain the region
      min_cases=3,  # fewer cases that contain the region: not judged (not learnt)
      baseline=True,  # also require beating the intensity-only baseline on the same cases
      baseline_voxels=200_000))  # training voxels the baseline is fitted on (a seeded sample when more)


def regions_present(labels) -> np.ndarray:
  """(n, 3) bool: case i's ground truth holds region WT / TC / ET (at least one voxel)."""
  labels = np.asarray(labels)
  return brats_regions(labels).reshape(labels.shape[0], -1, len(REGIONS)).any(axis=1)


def _features(image: np.ndarray) -> np.ndarray:
  return np.concatenate([image, np.ones(image.shape[:-1] + (1,), image.dtype)], axis=-1)


def fit_intensity_baseline(cases, *, n_classes: int = 4, max_voxels: int = 200_000, seed: int = 0) -> dict:
  """An intensity-only segmenter: {"weights": (C + 1, n_classes), "thresholds": (3,)}.

  cases: (image (..., C), label (...), brain (...) bool) per training case (grids may differ). A softmax
  regression from a brain voxel's C contrasts to its label, fitted by L-BFGS on the mean cross-entropy over at
  most `max_voxels` brain voxels (a seeded equal share per case; a tiny L2 term keeps it bounded when a class is
  separable). A region (WT, TC, ET) is then predicted where the summed probability of its labels exceeds a
  threshold chosen to maximise that region's Dice over the same training voxels: argmax alone would almost never
  predict a small class such as ET, a baseline too weak to mean anything.
  """
  cases = list(cases)
  rng = np.random.default_rng(seed)
  per_case = max(1, max_voxels // max(len(cases), 1))
  xs, ys = [], []
  for image, label, brain in cases:
    idx = np.flatnonzero(np.asarray(brain, bool))
    if len(idx) > per_case:
      idx = np.sort(rng.choice(idx, per_case, replace=False))
    xs.append(np.asarray(image, np.float64).reshape(-1, np.shape(image)[-1])[idx])
    ys.append(np.asarray(label).reshape(-1)[idx].astype(np.int64))
  x, y = np.concatenate(xs), np.concatenate(ys)
  if not len(y):
    raise ValueError("intensity baseline: the training cases have no brain voxels")
  x = _features(x)
  onehot = np.eye(n_classes)[y]
  shape = (x.shape[1], n_classes)

  def loss_and_grad(w):
    w = w.reshape(shape)
    p = _softmax(x @ w)
    loss = -np.mean(np.log(np.maximum((p * onehot).sum(axis=1), 1e-300))) + 1e-6 * np.sum(w * w)
    return loss, (x.T @ (p - onehot) / len(y) + 2e-6 * w).ravel()

  result = optimize.minimize(loss_and_grad, np.zeros(np.prod(shape)), jac=True, method="L-BFGS-B",
                             options=dict(maxiter=500))
  w = result.x.reshape(shape)
  w[-1, ~np.isin(np.arange(n_classes), y)] = -1e9
  probs, truth = _region_probs(_softmax(x @ w)), brats_regions(y)
  thresholds = []
  for r in range(len(REGIONS)):
    dice = [2 * np.sum((probs[:, r] > t) & truth[:, r]) / max(np.sum(probs[:, r] > t) + np.sum(truth[:, r]), 1)
            for t in _THRESHOLDS]
    thresholds.append(float(_THRESHOLDS[int(np.argmax(dice))]))
  return {"weights": w, "thresholds": np.asarray(thresholds)}


_THRESHOLDS = np.linspace(0.05, 0.95, 19)


def _softmax(z: np.ndarray) -> np.ndarray:
  z = z - z.max(axis=-1, keepdims=True)
  p = np.exp(z)
  return p / p.sum(axis=-1, keepdims=True)


def _region_probs(p: np.ndarray) -> np.ndarray:
  """(..., 3) probabilities of WT = {1,2,3}, TC = {1,3}, ET = {3} from (..., 4) label probabilities."""
  return np.stack([p[..., 1] + p[..., 2] + p[..., 3], p[..., 1] + p[..., 3], p[..., 3]], axis=-1)


def predict_intensity_baseline(model: dict, images, brains) -> np.ndarray:
  """(n, ..., 3) bool region masks (WT, TC, ET) of the baseline; nothing outside the brain."""
  probs = _region_probs(_softmax(_features(np.asarray(images, np.float64)) @ np.asarray(model["weights"])))
  return (probs > np.asarray(model["thresholds"])) & np.asarray(brains, bool)[..., None]


def region_dice(preds, labels) -> np.ndarray:
  """(n, 3) Dice per case and region (WT, TC, ET); a region empty in both prediction and truth scores 1.

  preds: label maps (n, ...) in the contract's labels, or bool region masks (n, ..., 3).
  """
  preds = np.asarray(preds)
  p = preds if preds.dtype == bool and preds.shape[-1] == len(REGIONS) else brats_regions(preds)
  p = p.reshape(len(preds), -1, len(REGIONS))
  t = brats_regions(np.asarray(labels)).reshape(len(labels), -1, len(REGIONS))
  inter, total = (p & t).sum(axis=1), p.sum(axis=1) + t.sum(axis=1)
  return np.where(total > 0, 2.0 * inter / np.maximum(total, 1), 1.0)


def check_regions(clean_dice, present, baseline_dice=None, *, floor: float, min_cases: int,
                  regions: Sequence[str] = REGIONS) -> list[dict]:
  """One row per region: did the clean victim learn it?

  clean_dice, baseline_dice: (n, 3) per-case Dice (WT, TC, ET) of the clean victim and of the intensity-only
  baseline on the same held-out cases (baseline None: not compared); present: (n, 3) bool (`regions_present`).
  Rows: region, n_cases (cases that contain it), dice and baseline (means over those cases), floor, learnt,
  reason (why not learnt; empty when learnt). Only `regions` are judged (e.g. ("ET",) for an ET segmenter).
  """
  clean_dice, present = np.asarray(clean_dice, np.float64), np.asarray(present, bool)
  rows = []
  for i, region in enumerate(REGIONS):
    if region not in regions:
      continue
    has = present[:, i]
    n = int(has.sum())
    dice = float(clean_dice[has, i].mean()) if n else float("nan")
    base = float(np.asarray(baseline_dice)[has, i].mean()) if n and baseline_dice is not None else float("nan")
    if n < min_cases:
      reason = f"only {n} held-out case(s) contain it (gate.min_cases = {min_cases})"
    elif dice < floor:
      reason = f"clean Dice {dice:.3f} on the cases that contain it is below the floor {floor:g}"
    elif baseline_dice is not None and not dice > base:
      reason = f"clean Dice {dice:.3f} does not beat the intensity-only baseline's {base:.3f}"
    else:
      reason = ""
    rows.append({"region": region, "n_cases": n, "dice": dice, "baseline": base, "floor": float(floor),
                 "learnt": not reason, "reason": reason})
  return rows


def learnt(rows: Sequence[dict]) -> tuple[str, ...]:
  """The learnt regions of `check_regions` rows, in REGIONS order."""
  return tuple(r["region"] for r in rows if r["learnt"])


def not_learnt_text(rows: Sequence[dict]) -> str:
  """The regions that failed, with why, for a report sentence: "TC (reason); ET (reason)" ("" if none)."""
  return "; ".join(f"{r['region']} ({r['reason']})" for r in rows if not r["learnt"])


def gate_regions(config, clean_dice, val_labels, *, train_cases=(), val_images=None, val_brains=None,
                 regions: Sequence[str] = REGIONS) -> list[dict]:
  """`check_regions` with the settings of `config` (a `default_config()`), the baseline included when asked.

  clean_dice: (n, 3) per-case clean Dice of the victim on the held-out cases with labels `val_labels` (n, ...).
  train_cases: (image, label, brain) per training case; val_images / val_brains: the held-out images and brain
  masks. All three are needed when config.baseline is on.
  """
  baseline = None
  if bool(config.baseline):
    train_cases = list(train_cases)
    if not train_cases or val_images is None or val_brains is None:
      raise ValueError("gate.baseline=True needs the training cases and the held-out images and brain masks")
    model = fit_intensity_baseline(train_cases, max_voxels=int(config.baseline_voxels))
    baseline = region_dice(predict_intensity_baseline(model, val_images, val_brains), val_labels)
  return check_regions(clean_dice, regions_present(val_labels), baseline, floor=float(config.floor),
                       min_cases=int(config.min_cases), regions=regions)


class LearntDiceView:
  """A read-only view of a `cellstore.CellTable` whose `dice_mean` averages `dice_<region>` over the learnt
  `regions` only (every other metric, and dice_mean when all three are learnt, read through unchanged).

  Lets a study's analysis, written against the cells' `dice_mean`, see the gated mean without re-keying cells.
  """

  def __init__(self, table, regions: Sequence[str]):
    self.table, self.regions = table, tuple(regions)

  def values(self, cell, metric: str, cases) -> np.ndarray:
    if metric == "dice_mean" and self.regions and self.regions != REGIONS:
      return np.mean([self.table.values(cell, f"dice_{r}", cases) for r in self.regions], axis=0)
    return self.table.values(cell, metric, cases)

  def __contains__(self, cell) -> bool:
    return cell in self.table

  def __getattr__(self, name):
    return getattr(self.table, name)


def report_table(report, rows: Sequence[dict], config, victim: str, *, columns: Sequence[str] = ()) -> None:
  """The "Victim check" section of a study's report.md: one row per (`columns`, region) with its verdict.

  report: a `mri_poison.report.markdown.Report`; rows: `check_regions` rows (plus `columns`); config: the gate's.
  """
  report.heading("Victim check: the regions the clean model learnt")
  report.table(
      rows, [*columns, "region", "n_cases", "dice", "baseline", "learnt", "reason"],
      formats={"learnt": lambda v: "learnt" if v else "not learnt: no result"},
      caption=f"{victim}, on the held-out cases that contain each region: mean Dice against the floor "
              f"{float(config.floor):g} and an intensity-only baseline (per-voxel softmax regression on the "
              "contrasts fitted on the training cases, each region thresholded for its best training Dice) on the "
              f"same cases; at least {int(config.min_cases)} such cases (*defaults chosen here*, config `gate`). A "
              "region that fails carries no result: means, drops and tests leave it out.",
      headers={"n_cases": "cases with it", "dice": "clean Dice", "baseline": "intensity baseline",
               "learnt": "verdict"})
