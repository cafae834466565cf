"""How detectable the poison is: real vs synthetic slices told apart by a small CNN and by a frequency statistic.

Two detectors, each fitted on slices of the training cases and scored on slices of held-out cases (real
target contrast vs the GAN's synthetic version of the same cases):
  "cnn":       `models.gan.SliceClassifier` trained with BCE and Adam, all steps in one `lax.scan`.
  "frequency": the share of a slice's spectral energy above a radial frequency (`high_frequency_ratio`);
               its direction (are synthetic slices smoother or sharper?) is fixed on the training slices.
AUC (Mann-Whitney, ties counted half) with a percentile bootstrap CI that resamples held-out CASES (slices of
one case are not independent). AUC 0.5: indistinguishable; 1.0: every synthetic slice scores above every real.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mri_poison.models.gan import SliceClassifier


def brain_slices(volumes: Sequence[np.ndarray], *, min_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
  """(slices (N, X, Y, 1), case index (N,)): axial slices of (X, Y, Z) volumes with >= min_fraction head voxels."""
  out, owner = [], []
  for i, v in enumerate(volumes):
    frac = (v != 0).mean(axis=(0, 1))
    for z in np.flatnonzero(frac >= float(min_fraction)):
      out.append(v[:, :, z])
      owner.append(i)
  if not out:
    raise ValueError(f"no slice has >= {min_fraction:g} head voxels (config detect.min_brain_fraction)")
  return np.stack(out)[..., None].astype(np.float32), np.asarray(owner, np.int32)


def auc(scores, labels) -> float:
  """Area under the ROC curve of `scores` for binary `labels` (1 = positive), ties counted half."""
  scores, labels = np.asarray(scores, np.float64).ravel(), np.asarray(labels).ravel().astype(bool)
  pos, neg = scores[labels], scores[~labels]
  if pos.size == 0 or neg.size == 0:
    raise ValueError("auc needs both classes")
  ranks = _average_ranks(np.concatenate([pos, neg]))
  return float((ranks[:pos.size].sum() - pos.size * (pos.size + 1) / 2) / (pos.size * neg.size))


def _average_ranks(x: np.ndarray) -> np.ndarray:
  order = np.argsort(x, kind="mergesort")
  ranks = np.empty(x.size, np.float64)
  sorted_x = x[order]
  i = 0
  while i < x.size:
    j = i
    while j + 1 < x.size and sorted_x[j + 1] == sorted_x[i]:
      j += 1
    ranks[order[i:j + 1]] = 0.5 * (i + j) + 1.0
    i = j + 1
  return ranks


def case_bootstrap_auc(scores, labels, groups, *, n_boot: int = 1000, alpha: float = 0.05,
                       seed: int = 0) -> dict[str, float]:
  """{"auc", "low", "high"}: AUC with a percentile bootstrap CI over resampled groups (cases)."""
  scores, labels, groups = np.asarray(scores), np.asarray(labels).astype(bool), np.asarray(groups)
  ids = np.unique(groups)
  members = [np.flatnonzero(groups == g) for g in ids]
  rng = np.random.default_rng(seed)
  boots = []
  for _ in range(int(n_boot)):
    pick = np.concatenate([members[j] for j in rng.integers(0, ids.size, ids.size)])
    if labels[pick].all() or not labels[pick].any():
      continue
    boots.append(auc(scores[pick], labels[pick]))
  low, high = np.quantile(boots, [alpha / 2, 1 - alpha / 2]) if boots else (np.nan, np.nan)
  return {"auc": auc(scores, labels), "low": float(low), "high": float(high)}


def high_frequency_ratio(slices: np.ndarray, radius: float = 0.25) -> np.ndarray:
  """(N,) share of each slice's spectral energy (mean removed) above `radius` x the Nyquist frequency."""
  x = np.asarray(slices, np.float64)[..., 0]
  x = x - x.mean(axis=(1, 2), keepdims=True)
  power = np.abs(np.fft.fft2(x)) ** 2
  fx = np.fft.fftfreq(x.shape[1])[:, None]
  fy = np.fft.fftfreq(x.shape[2])[None, :]
  high = np.sqrt(fx**2 + fy**2) > float(radius) * 0.5  # radius is a fraction of the Nyquist frequency 0.5
  total = power.sum(axis=(1, 2))
  return power[:, high].sum(axis=1) / np.maximum(total, 1e-12)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _train(model: SliceClassifier, steps: int, batch: int, x, y, key, lr):
  params = model.init(key, x[:1])["params"]
  tx = optax.adam(lr)

  def loss_fn(p, xb, yb):
    z = model.apply({"params": p}, xb)
    return jnp.mean(optax.sigmoid_binary_cross_entropy(z, yb))

  def step(carry, k):
    p, opt = carry
    idx = jax.random.randint(k, (batch,), 0, x.shape[0])
    loss, grads = jax.value_and_grad(loss_fn)(p, x[idx], y[idx])
    updates, opt = tx.update(grads, opt, p)
    return (optax.apply_updates(p, updates), opt), loss

  (params, _), losses = jax.lax.scan(step, (params, tx.init(params)), jax.random.split(key, steps))
  return params, losses


@functools.partial(jax.jit, static_argnums=0)
def _scores(model: SliceClassifier, params, x):
  return model.apply({"params": params}, x)


def train_classifier(x, y, *, features=(8, 16, 32), steps: int = 200, batch: int = 32, lr: float = 1e-3,
                     seed: int = 0):
  """(params, per-step losses) of a `SliceClassifier` fitted to slices x (N, X, Y, 1), labels y (N,) in {0, 1}."""
  model = SliceClassifier(tuple(int(f) for f in features))
  return _train(model, int(steps), int(batch), jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32),
                jax.random.PRNGKey(int(seed)), jnp.float32(lr))


def classifier_scores(params, x, *, features=(8, 16, 32)) -> np.ndarray:
  return np.asarray(_scores(SliceClassifier(tuple(int(f) for f in features)), params, jnp.asarray(x, jnp.float32)))


def detectability(real_train, synth_train, real_test, synth_test, detect_cfg) -> dict:
  """AUCs of both detectors: train on (real_train, synth_train) volumes, test on (real_test, synth_test).

  Each argument is a list of (X, Y, Z) volumes; real_test[i] and synth_test[i] are the same case. Returns
  {"cnn": {"auc", "low", "high"}, "frequency": {...}, "n_train_slices", "n_test_slices", "n_test_cases",
   "cnn_final_loss", "frequency_direction"}.
  """
  frac = float(detect_cfg.min_brain_fraction)
  xr, _ = brain_slices(real_train, min_fraction=frac)
  xs, _ = brain_slices(synth_train, min_fraction=frac)
  tr, tr_case = brain_slices(real_test, min_fraction=frac)
  ts, ts_case = brain_slices(synth_test, min_fraction=frac)
  x_train = np.concatenate([xr, xs])
  y_train = np.concatenate([np.zeros(len(xr)), np.ones(len(xs))])
  x_test = np.concatenate([tr, ts])
  y_test = np.concatenate([np.zeros(len(tr)), np.ones(len(ts))])
  groups = np.concatenate([tr_case, ts_case])
  n_boot, seed = int(detect_cfg.n_boot), int(detect_cfg.seed)
  features = tuple(detect_cfg.features)
  params, losses = train_classifier(x_train, y_train, features=features, steps=int(detect_cfg.steps),
                                    batch=int(detect_cfg.batch), lr=float(detect_cfg.lr), seed=seed)
  cnn = case_bootstrap_auc(classifier_scores(params, x_test, features=features), y_test, groups, n_boot=n_boot,
                           seed=seed)
  radius = float(detect_cfg.hf_radius)
  # The statistic's direction is learnt on the training slices only: held-out AUC < 0.5 then means it failed.
  direction = 1.0 if auc(high_frequency_ratio(x_train, radius), y_train) >= 0.5 else -1.0
  freq = case_bootstrap_auc(direction * high_frequency_ratio(x_test, radius), y_test, groups, n_boot=n_boot,
                            seed=seed)
  return {"cnn": cnn, "frequency": freq, "n_train_slices": int(len(x_train)), "n_test_slices": int(len(x_test)),
          "n_test_cases": int(len(real_test)), "cnn_final_loss": float(np.mean(np.asarray(losses)[-10:])),
          "frequency_direction": "higher in synthetic" if direction > 0 else "lower in synthetic"}
