"""Metrics against independent references: brute-force surface distances, explicit-window SSIM, scipy."""
import itertools

import jax
import numpy as np
import pytest
import scipy.stats

from mri_poison import metrics
from mri_poison.data.case import REGION_LABELS
from mri_poison.metrics import HD95_EMPTY_PENALTY


def test_overlap_metrics_hand_counts():
  pred = np.array([1, 1, 1, 0, 0, 0, 0, 0, 1, 0], bool)
  ref = np.array([1, 1, 0, 1, 0, 0, 0, 0, 0, 0], bool)
  # TP 2, FP 2, FN 1, TN 5
  assert metrics.confusion(pred, ref) == (2, 2, 1, 5)
  assert metrics.dice(pred, ref) == pytest.approx(4 / 7)
  assert metrics.jaccard(pred, ref) == pytest.approx(2 / 5)
  assert metrics.sensitivity(pred, ref) == pytest.approx(2 / 3)
  assert metrics.specificity(pred, ref) == pytest.approx(5 / 7)
  assert metrics.accuracy(pred, ref) == pytest.approx(7 / 10)


def test_edge_cases():
  empty, some = np.zeros((4, 4, 4), bool), np.zeros((4, 4, 4), bool)
  some[1:3, 1:3, 1:3] = True
  assert metrics.dice(empty, empty) == 1.0 and metrics.jaccard(empty, empty) == 1.0
  assert metrics.hd95(empty, empty, (1, 1, 1)) == 0.0
  assert metrics.dice(some, empty) == 0.0 and metrics.dice(empty, some) == 0.0
  assert metrics.hd95(some, empty, (1, 1, 1)) == HD95_EMPTY_PENALTY == 373.0
  assert metrics.hd95(empty, some, (1, 1, 1)) == 373.0
  assert metrics.sensitivity(some, empty) == 1.0 and metrics.sensitivity(empty, some) == 0.0
  assert metrics.dice(some, some) == 1.0 and metrics.hd95(some, some, (1, 2, 3)) == 0.0
  with pytest.raises(ValueError, match="shapes differ"):
    metrics.dice(some, some[:3])


def _brute_surface(mask):
  """Voxels of the mask with a face neighbour outside the mask (or outside the volume)."""
  padded = np.pad(mask, 1)
  out = np.zeros_like(mask)
  for idx in zip(*np.nonzero(mask)):
    p = tuple(i + 1 for i in idx)
    for axis, step in itertools.product(range(mask.ndim), (-1, 1)):
      q = list(p)
      q[axis] += step
      if not padded[tuple(q)]:
        out[idx] = True
  return out


def _brute_hd95(pred, ref, spacing):
  sp = np.argwhere(_brute_surface(pred)) * np.asarray(spacing)
  sr = np.argwhere(_brute_surface(ref)) * np.asarray(spacing)
  d = np.sqrt(((sp[:, None, :] - sr[None, :, :]) ** 2).sum(-1))
  return np.percentile(np.concatenate([d.min(1), d.min(0)]), 95)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hd95_matches_brute_force_surface_distances(seed):
  rng = np.random.default_rng(seed)
  grid = np.stack(np.meshgrid(*[np.arange(n) for n in (9, 10, 11)], indexing="ij"), -1)

  def blob():
    c, r = rng.uniform(2, 8, 3), rng.uniform(1.5, 4)
    m = ((grid - c) ** 2).sum(-1) < r**2
    return m | (rng.random(m.shape) < 0.02)  # a few scattered voxels for far outliers

  pred, ref = blob(), blob()
  spacing = (1.0, 1.5, 2.5)
  np.testing.assert_allclose(metrics.hd95(pred, ref, spacing), _brute_hd95(pred, ref, spacing), rtol=1e-10)
  np.testing.assert_array_equal(metrics.surface(pred), _brute_surface(pred))


def test_hd95_hand_case():
  a, b = np.zeros((3, 3, 6), bool), np.zeros((3, 3, 6), bool)
  a[1, 1, 1], b[1, 1, 4] = True, True
  assert metrics.hd95(a, b, (1.0, 1.0, 2.0)) == pytest.approx(6.0)
  # 2D works too: two single pixels 3 apart on a 1 mm x 0.5 mm grid.
  a2, b2 = np.zeros((5, 5), bool), np.zeros((5, 5), bool)
  a2[0, 1], b2[3, 1] = True, True
  assert metrics.hd95(a2, b2, (1.0, 0.5)) == pytest.approx(3.0)


def test_brats_scores_regions():
  rng = np.random.default_rng(3)
  ref = rng.integers(0, 4, size=(6, 7, 8))
  pred = np.where(rng.random(ref.shape) < 0.2, rng.integers(0, 4, size=ref.shape), ref)
  pred[pred == 3] = 1  # no ET predicted at all
  scores = metrics.brats_scores(pred, ref, (1.0, 1.0, 1.0))
  assert list(scores) == ["WT", "TC", "ET"]
  assert set(scores["WT"]) == {"dice", "jaccard", "hd95", "sensitivity", "specificity", "accuracy"}
  sets = {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)}
  for name, labels in sets.items():
    p, r = np.isin(pred, labels), np.isin(ref, labels)
    tp, fp, fn = (p & r).sum(), (p & ~r).sum(), (~p & r).sum()
    assert scores[name]["dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else 1.0)
  assert scores["ET"]["dice"] == 0.0 and scores["ET"]["hd95"] == 373.0


def test_region_counts_jit_and_dice_from_counts():
  rng = np.random.default_rng(4)
  ref = rng.integers(0, 4, size=(3, 5, 6, 4))
  pred = np.where(rng.random(ref.shape) < 0.3, rng.integers(0, 4, size=ref.shape), ref)
  ref[2] = 0
  pred[2] = 0  # example 2: every region empty in both -> Dice 1
  mask = rng.random(ref.shape) > 0.2
  counts = jax.jit(metrics.region_counts)(pred, ref)
  counts_m = jax.jit(metrics.region_counts)(pred, ref, mask)
  assert counts.shape == (3, 3, 3)
  for b in range(2):
    s = metrics.brats_scores(pred[b], ref[b])
    for i, name in enumerate(("WT", "TC", "ET")):
      p, r = np.isin(pred[b], REGION_LABELS[name]), np.isin(ref[b], REGION_LABELS[name])
      np.testing.assert_array_equal(counts[b, i], [(p & r).sum(), (p & ~r).sum(), (~p & r).sum()])
      m = mask[b]
      np.testing.assert_array_equal(counts_m[b, i], [(p & r & m).sum(), (p & ~r & m).sum(), (~p & r & m).sum()])
      assert float(metrics.dice_from_counts(counts[b, i])) == pytest.approx(s[name]["dice"], rel=1e-6)
  np.testing.assert_array_equal(counts[2], 0)
  np.testing.assert_array_equal(metrics.dice_from_counts(counts[2]), 1.0)
  # Summed counts give the pooled Dice.
  tot = counts.sum(0)
  np.testing.assert_allclose(metrics.dice_from_counts(tot),
                             2 * tot[:, 0] / (2 * tot[:, 0] + tot[:, 1] + tot[:, 2]), rtol=1e-6)


def test_psnr():
  x = np.zeros((8, 8))
  x[0, 0] = 1.0  # range 1
  y = x + 0.1
  assert metrics.psnr(x, y) == pytest.approx(10 * np.log10(1.1**2 / 0.01))
  assert metrics.psnr(x, y, data_range=1.0) == pytest.approx(20.0)
  assert metrics.psnr(x, x) == float("inf")


def _brute_ssim(x, y, data_range, sigma=1.5, radius=5):
  """SSIM by explicit weighted windows around every interior voxel of a 'symmetric'-padded image."""
  t = np.arange(-radius, radius + 1)
  g = np.exp(-(t**2) / (2 * sigma**2))
  g /= g.sum()
  w = g
  for _ in range(x.ndim - 1):
    w = np.multiply.outer(w, g)
  xp, yp = np.pad(x, radius, mode="symmetric"), np.pad(y, radius, mode="symmetric")
  c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
  vals = []
  for idx in itertools.product(*[range(radius, n - radius) for n in x.shape]):
    sl = tuple(slice(i, i + 2 * radius + 1) for i in idx)
    wx, wy = xp[sl], yp[sl]
    mx, my = (w * wx).sum(), (w * wy).sum()
    vx, vy = (w * wx * wx).sum() - mx**2, (w * wy * wy).sum() - my**2
    vxy = (w * wx * wy).sum() - mx * my
    vals.append(((2 * mx * my + c1) * (2 * vxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
  return np.mean(vals)


@pytest.mark.parametrize("shape", [(16, 18), (12, 12, 13)])
def test_ssim_matches_explicit_windows(shape):
  rng = np.random.default_rng(5)
  x = rng.random(shape)
  y = np.clip(x + 0.2 * rng.normal(size=shape), 0, 1)
  want = _brute_ssim(x, y, data_range=1.0)
  assert metrics.ssim(x, y, data_range=1.0) == pytest.approx(want, rel=1e-10)
  assert metrics.ssim(x, x) == pytest.approx(1.0)
  assert metrics.ssim(x, y) < 0.9


def test_wilcoxon():
  rng = np.random.default_rng(6)
  a = rng.normal(size=20)
  b = a - 0.5 + 0.3 * rng.normal(size=20)
  out = metrics.wilcoxon(a, b)
  ref = scipy.stats.wilcoxon(a, b)
  assert out["p_value"] == pytest.approx(ref.pvalue) and out["statistic"] == pytest.approx(ref.statistic)
  assert out["median_diff"] == pytest.approx(np.median(a - b)) and out["n"] == 20
  assert out["p_value"] < 0.01
  same = metrics.wilcoxon(a, a)
  assert same == {"statistic": 0.0, "p_value": 1.0, "n": 20, "median_diff": 0.0}


def test_bootstrap_ci():
  rng = np.random.default_rng(7)
  v = rng.normal(loc=2.0, size=50)
  ci = metrics.bootstrap_ci(v, n_boot=2000, seed=1)
  assert ci == metrics.bootstrap_ci(v, n_boot=2000, seed=1)  # deterministic by seed
  assert ci["estimate"] == pytest.approx(v.mean())
  assert ci["low"] < v.mean() < ci["high"]
  # The 95% interval of the mean is about +-1.96 standard errors.
  se = v.std() / np.sqrt(v.size)
  assert ci["high"] - ci["low"] == pytest.approx(2 * 1.96 * se, rel=0.15)
  # A stat without `axis=` falls back to a loop and gives the same interval as the vectorised median.
  med = metrics.bootstrap_ci(v, n_boot=300, seed=2, stat=np.median)
  loop = metrics.bootstrap_ci(v, n_boot=300, seed=2, stat=lambda s: float(np.median(s)))
  assert med == pytest.approx(loop)
  const = metrics.bootstrap_ci(np.full(10, 0.7))
  assert const["low"] == pytest.approx(0.7) and const["high"] == pytest.approx(0.7)


def test_holm_on_a_known_p_vector():
  p = [0.01, 0.04, 0.03, 0.005]
  # sorted: 0.005*4=0.02, 0.01*3=0.03, 0.03*2=0.06, 0.04*1=0.04 -> monotone 0.06
  np.testing.assert_allclose(metrics.holm(p), [0.03, 0.06, 0.06, 0.02])
  np.testing.assert_allclose(metrics.holm([0.5, 0.9]), [1.0, 1.0])
  assert metrics.holm([]).size == 0


def test_paired_comparison_ci_covers_the_shift_and_counts_ties():
  rng = np.random.default_rng(0)
  b = rng.normal(0.7, 0.1, 30)
  a = b + 0.05 + rng.normal(0, 0.01, 30)
  a[:4] = b[:4]  # four ties
  res = metrics.paired_comparison(a, b)
  assert res["ci_low"] < res["mean_diff"] < res["ci_high"] and res["ci_low"] > 0
  assert res["n"] == 30 and res["n_effective"] == 26 and res["p_value"] < 1e-4


def test_bootstrap_ci_covers_the_true_mean_at_about_the_nominal_rate():
  # 400 samples of n = 20 from N(1, 2^2): the 95 % percentile interval should cover 1 about 95 % of the time.
  # Percentile intervals run narrow at small n (their half-width uses the plug-in sd, a z instead of a t
  # quantile: about 92-93 % at n = 20), hence the loose lower bound; 0.88 is ~3 binomial sd below that.
  rng = np.random.default_rng(0)
  hits = [(ci := metrics.bootstrap_ci(rng.normal(1.0, 2.0, 20), n_boot=500, seed=s))["low"] <= 1.0 <= ci["high"]
          for s in range(400)]
  assert 0.88 <= np.mean(hits) <= 0.98, np.mean(hits)


def test_targeted_success_hand_counts():
  ref = np.array([[0, 1, 2, 3, 3, 0]])
  target = np.array([[0, 1, 2, 2, 2, 0]])  # enhancing tumour -> oedema: voxels 3 and 4 must change
  pred = np.array([[0, 1, 2, 2, 3, 2]])  # one of the two reached; one background voxel turned oedema
  out = metrics.targeted_success(pred, target, ref)
  assert out["reached"] == 0.5 and out["n_must_change"] == 2.0
  # Dice per class: c=1: 1; c=2: pred {2, 3, 5}, target {2, 3, 4} -> 2*2 / 6; c=3: pred {4}, target {} -> 0.
  assert out["dice_target"] == pytest.approx((1 + 2 / 3 + 0) / 3)
  assert out["tumour_left"] == pytest.approx(5 / 4)  # 5 voxels predicted tumour, 4 in the reference
  # The mask restricts every count: without voxel 5 the collateral oedema voxel disappears.
  masked = metrics.targeted_success(pred, target, ref, mask=np.array([[1, 1, 1, 1, 1, 0]]))
  assert masked["dice_target"] == pytest.approx((1 + 4 / 5 + 0) / 3) and masked["tumour_left"] == 1.0
  # Erase tumour: the graded measure is the tumour left.
  erase = metrics.targeted_success(np.array([[0, 0, 0, 3, 0, 0]]), np.zeros((1, 6), int), ref)
  assert erase["reached"] == 0.75 and erase["tumour_left"] == 0.25
  assert erase["dice_target"] == pytest.approx(2 / 3)  # classes 1 and 2 gone (1), class 3 not (0)
  nothing = metrics.targeted_success(ref, ref, ref)
  assert np.isnan(nothing["reached"]) and nothing["dice_target"] == 1.0 and nothing["tumour_left"] == 1.0
  assert np.isnan(metrics.targeted_success(ref * 0, ref * 0, ref * 0)["tumour_left"])
  with pytest.raises(ValueError, match="shapes differ"):
    metrics.targeted_success(pred, target[:, :3], ref)
