"""Study 1: scoring the sweep's segmenters on real validation cases as evaluation cells, and the statistics.

A cell (`studies.common`) is one segmenter (victim "<mode>/k<k>/seed<s>") on the real validation split with
threat "none" and budget = its synthetic share; it holds per case the enhancing-tumour Dice, Jaccard,
accuracy, sensitivity and specificity of the whole volume (slice-wise 2D prediction, sigmoid > 0.5), keyed by
the model's params, the split's voxels and the code version. Conventions: `mri_poison.metrics` (BraTS: Dice 1
when prediction and reference are both empty).
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mri_poison import cellstore
from mri_poison import metrics
from mri_poison.studies.poison.training import ET_LABEL

METRICS = ("dice", "jaccard", "accuracy", "sensitivity", "specificity")
EVAL_VERSION = 1  # bump when a change here changes any cell's numbers


def victim_name(mode: str, k: int, seed: int) -> str:
  return f"{mode}/k{int(k)}/seed{int(seed)}"


@functools.partial(jax.jit, static_argnums=0)
def _predict_chunks(apply_fn, stacked_params, chunks):
  # (C, n, *S, 1) chunks of slices -> (M, C, n, *S) ET masks; every model at once, chunk by chunk.
  def one(x):
    return jax.vmap(lambda p: apply_fn(p, x)[..., 0] > 0.0)(stacked_params)
  return jnp.moveaxis(jax.lax.map(one, chunks), 0, 1)


def predict_et(apply_fn, params_list: Sequence, volumes: np.ndarray, chunk: int = 256) -> np.ndarray:
  """(M, N, X, Y, Z) bool ET predictions of M 2D segmenters on volumes (N, X, Y, Z, 1), slice by slice (axis Z)."""
  stacked = jax.tree.map(lambda *p: jnp.stack(p), *params_list)
  n, x, y, z, _ = volumes.shape
  slices = np.moveaxis(volumes, 3, 1).reshape(n * z, x, y, 1).astype(np.float32)
  total = slices.shape[0]
  chunk = max(1, min(int(chunk), total))
  pad = (-total) % chunk
  if pad:
    slices = np.concatenate([slices, np.zeros((pad, x, y, 1), np.float32)])
  out = np.asarray(_predict_chunks(apply_fn, stacked, slices.reshape(-1, chunk, x, y, 1)))
  out = out.reshape(len(params_list), -1, x, y)[:, :total]
  return np.moveaxis(out.reshape(len(params_list), n, z, x, y), 2, 4)


def case_metrics(pred: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
  """{metric: (N,)} of ET masks pred (N, *S) against contract labels (N, *S)."""
  ref = labels == ET_LABEL
  fns = {"dice": metrics.dice, "jaccard": metrics.jaccard, "accuracy": metrics.accuracy,
         "sensitivity": metrics.sensitivity, "specificity": metrics.specificity}
  return {m: np.asarray([fns[m](p, r) for p, r in zip(pred, ref)]) for m in METRICS}


def make_cells(entries, val_ids, val_digest) -> dict[tuple, cellstore.Cell]:
  """{(mode, seed, k): cell} for entries [(mode, seed, k, share, params_digest)]."""
  return {(mode, seed, k): cellstore.make_cell(victim_name(mode, k, seed), "none", share, params=pd,
                                            settings={"mode": mode, "k": int(k), "seed": int(seed)},
                                            cases=val_ids, version=EVAL_VERSION, data=val_digest)
          for mode, seed, k, share, pd in entries}


def comparisons(per_case: dict, ks: Sequence[int], *, n_boot: int = 2000, seed: int = 0) -> list[dict]:
  """k vs k = 0 for every k > 0 on the seed-averaged per-case metric: paired mean difference (k - 0) with a
  bootstrap CI, Wilcoxon p and its Holm correction across the k > 0 family, and whether it is `claimed`.

  per_case: {k: (N,) per-case values (averaged over the sweep's seeds)}.
  """
  rows = []
  for k in ks:
    if k == 0:
      continue
    c = metrics.paired_comparison(per_case[k], per_case[0], n_boot=n_boot, seed=seed)
    rows.append({"k": int(k), **c})
  adjusted = metrics.holm([r["p_value"] for r in rows])
  for r, p in zip(rows, adjusted):
    # Claimed (the report says "significant") only when the test and the bootstrap CI of the mean difference
    # agree: on skewed per-case differences they can disagree.
    r.update(p_holm=float(p), claimed=bool(p < 0.05 and (r["ci_low"] > 0 or r["ci_high"] < 0)))
  return rows
