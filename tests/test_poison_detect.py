"""Detectability: AUC, the frequency statistic and the CNN probe on slices that differ in texture."""
import numpy as np
import scipy.stats

from mri_poison.poison import detect


def test_auc_matches_mann_whitney_and_edge_cases():
  rng = np.random.default_rng(0)
  s, y = rng.normal(size=60).round(1), rng.integers(0, 2, 60)  # rounding makes ties
  u = scipy.stats.mannwhitneyu(s[y == 1], s[y == 0]).statistic
  np.testing.assert_allclose(detect.auc(s, y), u / ((y == 1).sum() * (y == 0).sum()), rtol=1e-12)
  assert detect.auc([1, 2, 3, 4], [0, 0, 1, 1]) == 1.0
  assert detect.auc([1, 2, 3, 4], [1, 1, 0, 0]) == 0.0
  assert detect.auc([5, 5, 5, 5], [0, 1, 0, 1]) == 0.5


def volumes(n, rough, seed):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    v = np.cumsum(np.cumsum(rng.normal(size=(16, 16, 4)), 0), 1) * 0.05  # smooth
    if rough:
      v = v + rng.normal(size=v.shape)
    out.append(v.astype(np.float32) + 3.0)  # nonzero: every slice is "brain"
  return out


def test_both_detectors_separate_smooth_from_noisy_slices():
  xs, _ = detect.brain_slices(volumes(2, False, 0))
  xr, _ = detect.brain_slices(volumes(2, True, 1))
  assert np.all(detect.high_frequency_ratio(xr, 0.5) > detect.high_frequency_ratio(xs, 0.5))

  class Cfg(dict):
    __getattr__ = dict.__getitem__

  cfg = Cfg(min_brain_fraction=0.1, n_boot=50, seed=0, features=(4, 8), steps=100, batch=16, lr=1e-2, hf_radius=0.5)
  out = detect.detectability(volumes(4, False, 2), volumes(4, True, 3), volumes(3, False, 4), volumes(3, True, 5),
                             cfg)
  assert out["frequency"]["auc"] == 1.0 and out["frequency_direction"] == "higher in synthetic"
  assert out["cnn"]["auc"] > 0.9, out
  assert out["n_test_slices"] == 24 and out["n_test_cases"] == 3
  assert out["cnn"]["low"] <= out["cnn"]["auc"] <= out["cnn"]["high"] + 1e-12
