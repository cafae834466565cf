"""Segmentation, image-similarity and statistics metrics (numpy / scipy, plus jit-able count sums).

Edge-case conventions (BraTS challenge, see docs/methods.md "Official-metric conventions"):
  * Dice / Jaccard: prediction and reference both empty -> 1; exactly one empty -> 0.
  * HD95: both empty -> 0; exactly one empty -> HD95_EMPTY_PENALTY = 373 mm (current official evaluator;
    an older script used 374).
  * sensitivity = TP / (TP + FN) and specificity = TN / (TN + FP) are 1 when their denominator is 0 (nothing
    to miss / nothing to falsely flag).
HD95 definition (as MedPy's `hd95`): the surface of a mask is the mask minus its binary erosion with the
face-connected structuring element (voxels on the volume border count as surface); for every surface voxel
of one mask take the Euclidean distance in mm (`spacing`) to the nearest surface voxel of the other, in both
directions; HD95 is the 95th percentile (numpy linear interpolation) of the union of the two distance sets.
"""
from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
import numpy as np
import scipy.ndimage as ndi
import scipy.stats

from mri_poison.data.case import REGIONS, brats_regions

HD95_EMPTY_PENALTY = 373.0


def _pair(pred, ref):
  pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
  if pred.shape != ref.shape:
    raise ValueError(f"prediction {pred.shape} and reference {ref.shape} shapes differ")
  return pred, ref


def confusion(pred, ref) -> tuple[int, int, int, int]:
  """(TP, FP, FN, TN) voxel counts of two boolean masks."""
  pred, ref = _pair(pred, ref)
  tp = int(np.count_nonzero(pred & ref))
  fp = int(np.count_nonzero(pred & ~ref))
  fn = int(np.count_nonzero(~pred & ref))
  return tp, fp, fn, pred.size - tp - fp - fn


def _ratio(num, den, empty):
  return float(num / den) if den > 0 else float(empty)


def dice(pred, ref) -> float:
  tp, fp, fn, _ = confusion(pred, ref)
  return _ratio(2 * tp, 2 * tp + fp + fn, 1.0)


def jaccard(pred, ref) -> float:
  tp, fp, fn, _ = confusion(pred, ref)
  return _ratio(tp, tp + fp + fn, 1.0)


def accuracy(pred, ref) -> float:
  tp, fp, fn, tn = confusion(pred, ref)
  return _ratio(tp + tn, tp + fp + fn + tn, 1.0)


def sensitivity(pred, ref) -> float:
  tp, _, fn, _ = confusion(pred, ref)
  return _ratio(tp, tp + fn, 1.0)


def specificity(pred, ref) -> float:
  _, fp, _, tn = confusion(pred, ref)
  return _ratio(tn, tn + fp, 1.0)


def surface(mask) -> np.ndarray:
  """Boolean surface voxels: the mask minus its (face-connected) erosion; border voxels are surface."""
  mask = np.asarray(mask, bool)
  structure = ndi.generate_binary_structure(mask.ndim, 1)
  return mask & ~ndi.binary_erosion(mask, structure=structure, border_value=0)


def surface_distances(pred, ref, spacing) -> tuple[np.ndarray, np.ndarray]:
  """Directed surface distances in mm: (pred surface -> ref surface, ref surface -> pred surface)."""
  pred, ref = _pair(pred, ref)
  spacing = _spacing(spacing, pred.ndim)
  sp, sr = surface(pred), surface(ref)
  to_ref = ndi.distance_transform_edt(~sr, sampling=spacing)
  to_pred = ndi.distance_transform_edt(~sp, sampling=spacing)
  return to_ref[sp], to_pred[sr]


def _spacing(spacing, ndim):
  if spacing is None:
    return (1.0,) * ndim
  spacing = tuple(float(s) for s in np.broadcast_to(np.asarray(spacing, float), (ndim,)))
  if min(spacing) <= 0:
    raise ValueError(f"spacing must be positive, got {spacing}")
  return spacing


def hd95(pred, ref, spacing=None) -> float:
  """95th percentile of the symmetric surface distances in mm (definition and edge cases in the module doc)."""
  pred, ref = _pair(pred, ref)
  p_any, r_any = pred.any(), ref.any()
  if not p_any and not r_any:
    return 0.0
  if not p_any or not r_any:
    return HD95_EMPTY_PENALTY
  d_pr, d_rp = surface_distances(pred, ref, spacing)
  return float(np.percentile(np.concatenate([d_pr, d_rp]), 95))


def region_metrics(pred, ref, spacing=None) -> dict[str, float]:
  return {"dice": dice(pred, ref), "jaccard": jaccard(pred, ref), "hd95": hd95(pred, ref, spacing),
          "sensitivity": sensitivity(pred, ref), "specificity": specificity(pred, ref),
          "accuracy": accuracy(pred, ref)}


def brats_scores(pred_label, ref_label, spacing=None) -> dict[str, dict[str, float]]:
  """{"WT": {"dice", "jaccard", "hd95", "sensitivity", "specificity", "accuracy"}, "TC": ..., "ET": ...}."""
  pred_label, ref_label = np.asarray(pred_label), np.asarray(ref_label)
  if pred_label.shape != ref_label.shape:
    raise ValueError(f"prediction {pred_label.shape} and reference {ref_label.shape} label shapes differ")
  pred_r, ref_r = brats_regions(pred_label), brats_regions(ref_label)
  return {name: region_metrics(pred_r[..., i], ref_r[..., i], spacing) for i, name in enumerate(REGIONS)}


def targeted_success(pred_label, target, ref_label, mask=None) -> dict[str, float]:
  """How far a targeted attack got: prediction vs the target map it aimed for and the labels it started from.

  pred_label: the model's labels on the attacked input; target: the attack's target map; ref_label: the
  reference (ground truth) labels the target was made from; mask (broadcastable, optional) restricts every
  count to its voxels (e.g. the brain). All int label maps of one shape; numpy in, floats out:
    reached      fraction of the must-change voxels (target != ref_label) predicted as their target; nan when
                 no voxel must change.
    dice_target  mean over the tumour classes c = 1, 2, 3 of Dice(pred == c, target == c), with the BraTS
                 convention (both empty -> 1, one empty -> 0). For an all-background target (erase tumour) it
                 is the share of tumour classes wiped out completely; `tumour_left` is the graded measure.
    tumour_left  voxels predicted tumour (label > 0) / tumour voxels in ref_label; nan when ref_label has none
                 (1 = as much tumour as the reference, 0 = none left).
    n_must_change  number of must-change voxels (float).
  """
  pred, target, ref = (np.asarray(a) for a in (pred_label, target, ref_label))
  if not pred.shape == target.shape == ref.shape:
    raise ValueError(f"targeted_success: prediction {pred.shape}, target {target.shape} and reference "
                     f"{ref.shape} shapes differ")
  keep = np.ones(pred.shape, bool) if mask is None else np.broadcast_to(np.asarray(mask, bool), pred.shape)
  must_change = (target != ref) & keep
  n_must = int(np.count_nonzero(must_change))
  reached = float(np.count_nonzero((pred == target) & must_change) / n_must) if n_must else float("nan")
  dice_target = float(np.mean([dice((pred == c) & keep, (target == c) & keep) for c in (1, 2, 3)]))
  n_ref_tumour = int(np.count_nonzero((ref > 0) & keep))
  tumour_left = (float(np.count_nonzero((pred > 0) & keep) / n_ref_tumour) if n_ref_tumour else float("nan"))
  return {"reached": reached, "dice_target": dice_target, "tumour_left": tumour_left,
          "n_must_change": float(n_must)}


# --- jit-able sums for in-loop evaluation -------------------------------------------------------------------

def region_counts(pred_label, ref_label, mask=None):
  """(B, 3, 3) int32 counts [region (WT, TC, ET), (TP, FP, FN)] summed over voxels; jnp, jit-able.

  pred_label, ref_label: (B, *S) contract labels; mask (broadcastable to (B, *S)) excludes voxels.
  Sum counts over batches / devices, then call `dice_from_counts` once.
  """
  pred = brats_regions(jnp.asarray(pred_label))
  ref = brats_regions(jnp.asarray(ref_label))
  if mask is not None:
    m = jnp.broadcast_to(jnp.asarray(mask, bool), pred.shape[:-1])[..., None]
    pred, ref = pred & m, ref & m
  axes = tuple(range(1, pred.ndim - 1))
  count = lambda a: jnp.sum(a, axis=axes, dtype=jnp.int32)
  return jnp.stack([count(pred & ref), count(pred & ~ref), count(~pred & ref)], axis=-1)


def dice_from_counts(counts):
  """Dice (..., ) from counts (..., 3) = (TP, FP, FN); 1 where prediction and reference are both empty."""
  counts = jnp.asarray(counts, jnp.float32)
  tp, fp, fn = counts[..., 0], counts[..., 1], counts[..., 2]
  den = 2 * tp + fp + fn
  return jnp.where(den > 0, 2 * tp / jnp.where(den > 0, den, 1.0), 1.0)


# --- image similarity -----------------------------------------------------------------------------------------

def _data_range(x, y, data_range):
  if data_range is not None:
    return float(data_range)
  # Joint range of both images (symmetric in x, y); 1 for two equal constants.
  r = float(max(x.max(), y.max()) - min(x.min(), y.min()))
  return r if r > 0 else 1.0


def psnr(x, y, data_range=None) -> float:
  """10 log10(range^2 / MSE); inf for identical images. Default range: max - min over both images."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if x.shape != y.shape:
    raise ValueError(f"psnr shapes differ: {x.shape} vs {y.shape}")
  r = _data_range(x, y, data_range)
  mse = float(np.mean((x - y) ** 2))
  return float("inf") if mse == 0 else float(10 * np.log10(r**2 / mse))


def ssim(x, y, data_range=None, sigma=1.5, truncate=3.5, k1=0.01, k2=0.03) -> float:
  """Mean SSIM with a Gaussian window (Wang et al. 2004) over all axes of 2D or 3D images.

  Matches skimage's `structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)`:
  'reflect' boundaries, mean over the interior (a border of the window radius cropped, unless the image is
  too small to crop). Default range: max - min over both images.
  """
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if x.shape != y.shape:
    raise ValueError(f"ssim shapes differ: {x.shape} vs {y.shape}")
  r = _data_range(x, y, data_range)
  f = lambda a: ndi.gaussian_filter(a, sigma, truncate=truncate, mode="reflect")
  ux, uy = f(x), f(y)
  vx, vy, vxy = f(x * x) - ux * ux, f(y * y) - uy * uy, f(x * y) - ux * uy
  c1, c2 = (k1 * r) ** 2, (k2 * r) ** 2
  s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
  pad = int(truncate * sigma + 0.5)
  if min(x.shape) > 2 * pad:
    s = s[(slice(pad, -pad),) * s.ndim]
  return float(s.mean())


# --- statistics -------------------------------------------------------------------------------------------------

def wilcoxon(a, b) -> dict[str, float]:
  """Paired two-sided Wilcoxon signed-rank test of a vs b (zero differences dropped, scipy's default).

  Returns statistic, p_value, median_diff (median of a - b) and n (pairs). All differences zero -> p = 1.
  """
  a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
  if a.shape != b.shape or a.size == 0:
    raise ValueError(f"wilcoxon needs two non-empty paired samples, got sizes {a.size} and {b.size}")
  d = a - b
  out = {"n": int(a.size), "median_diff": float(np.median(d))}
  if not np.any(d != 0):
    return {"statistic": 0.0, "p_value": 1.0, **out}
  res = scipy.stats.wilcoxon(a, b)
  return {"statistic": float(res.statistic), "p_value": float(res.pvalue), **out}


def bootstrap_ci(values, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0,
                 stat: Callable = np.mean) -> dict[str, float]:
  """Percentile bootstrap CI: {"estimate": stat(values), "low", "high"} at level 1 - alpha.

  `stat` must accept `axis=` (np.mean, np.median, ...) or work on 1-D arrays.
  """
  values = np.asarray(values, np.float64).ravel()
  if values.size == 0:
    raise ValueError("bootstrap_ci needs at least one value")
  rng = np.random.default_rng(seed)
  samples = values[rng.integers(0, values.size, size=(n_boot, values.size))]
  try:
    boot = np.asarray(stat(samples, axis=1), np.float64)
  except TypeError:
    boot = np.array([stat(s) for s in samples], np.float64)
  low, high = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
  return {"estimate": float(stat(values)), "low": float(low), "high": float(high)}


def holm(p_values) -> np.ndarray:
  """Holm-Bonferroni adjusted p-values (family-wise error control, step-down), in the input order."""
  p = np.asarray(p_values, np.float64).ravel()
  m = p.size
  if m == 0:
    return p
  order = np.argsort(p, kind="stable")
  adjusted = np.maximum.accumulate((m - np.arange(m)) * p[order])
  out = np.empty(m)
  out[order] = np.minimum(adjusted, 1.0)
  return out


def paired_comparison(a, b, *, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> dict[str, float]:
  """a vs b paired by case: mean difference (a - b) with a bootstrap CI, Wilcoxon p, n and effective n.

  Effective n is the number of non-zero differences (what the signed-rank test uses); report it beside n.
  """
  a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
  test = wilcoxon(a, b)
  ci = bootstrap_ci(a - b, n_boot=n_boot, alpha=alpha, seed=seed)
  return {"mean_diff": ci["estimate"], "ci_low": ci["low"], "ci_high": ci["high"], "p_value": test["p_value"],
          "median_diff": test["median_diff"], "n": test["n"], "n_effective": int(np.count_nonzero(a != b))}
