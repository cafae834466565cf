"""Whole-volume inference (sliding windows with Gaussian blending in 3D, whole slices in 2D) and evaluation.

`apply_fn(params, x) -> (B, *window, K)` logits, e.g. `train.state.make_apply_fn(model)`. The window
positions are computed on the host once per volume shape; the loop over them is one compiled `lax.scan`
(a batch of windows per iteration), so a volume costs one dispatch.
"""
from __future__ import annotations

import functools
import itertools
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mri_poison import io_utils

ApplyFn = Callable[[Any, jax.Array], jax.Array]


def window_starts(shape: Sequence[int], window: Sequence[int], overlap: float) -> np.ndarray:
  """(N, ndim) window corners covering `shape`; stride window*(1-overlap), the last window flush with the end."""
  if not 0.0 <= overlap < 1.0:
    raise ValueError(f"overlap must be in [0, 1), got {overlap}")
  per_axis = []
  for size, w in zip(shape, window):
    if size <= w:
      per_axis.append([0])
      continue
    stride = max(int(w * (1.0 - overlap)), 1)
    starts = list(range(0, size - w + 1, stride))
    if starts[-1] != size - w:
      starts.append(size - w)
    per_axis.append(starts)
  return np.asarray(list(itertools.product(*per_axis)), np.int32).reshape(-1, len(window))


def gaussian_importance(window: Sequence[int], sigma_scale: float = 0.125) -> np.ndarray:
  """Separable Gaussian centred on the window (sigma = sigma_scale * size, as MONAI), max 1, floor 1e-6."""
  g = np.ones((), np.float64)
  for w in window:
    x = np.arange(w) - (w - 1) / 2.0
    g = np.multiply.outer(g, np.exp(-0.5 * (x / max(sigma_scale * w, 1e-6)) ** 2))
  g = g / g.max()
  return np.maximum(g, 1e-6).astype(np.float32)


def sliding_window_predict(apply_fn: ApplyFn, params, image, *, window: Sequence[int], overlap: float = 0.5,
                           batch: int = 4, sigma_scale: float = 0.125) -> jax.Array:
  """Blended logits (*S, K) for one image (*S, C) from overlapping `window`s, Gaussian-weighted.

  Axes smaller than the window are zero-padded (centred) for inference and cropped back.
  """
  image = jnp.asarray(image, jnp.float32)
  spatial = image.shape[:-1]
  window = tuple(int(w) for w in window)
  if len(window) != len(spatial):
    raise ValueError(f"window {window} does not match image {image.shape} ((*spatial, C) expected)")
  pad = [max(w - s, 0) for w, s in zip(window, spatial)]
  if any(pad):
    image = jnp.pad(image, [(p // 2, p - p // 2) for p in pad] + [(0, 0)])
  starts = window_starts(image.shape[:-1], window, overlap)
  batch = max(1, min(int(batch), len(starts)))
  n_pad = -len(starts) % batch
  valid = np.concatenate([np.ones(len(starts), np.float32), np.zeros(n_pad, np.float32)])
  starts = np.concatenate([starts, np.zeros((n_pad, len(window)), np.int32)])
  weight = gaussian_importance(window, sigma_scale)
  out = _blend(apply_fn, params, image, jnp.asarray(starts), jnp.asarray(valid), jnp.asarray(weight),
               window=window, batch=batch)
  if any(pad):
    out = out[tuple(slice(p // 2, p // 2 + s) for p, s in zip(pad, spatial))]
  return out


@functools.partial(jax.jit, static_argnames=("apply_fn", "window", "batch"))
def _blend(apply_fn, params, image, starts, valid, weight, *, window, batch):
  nd, channels = len(window), image.shape[-1]
  crop = lambda s: jax.lax.dynamic_slice(image, (*(s[i] for i in range(nd)), 0), (*window, channels))
  k = jax.eval_shape(lambda p, x: apply_fn(p, x), params,
                     jax.ShapeDtypeStruct((batch, *window, channels), jnp.float32)).shape[-1]
  acc = jnp.zeros((*image.shape[:-1], k), jnp.float32)
  norm = jnp.zeros((*image.shape[:-1], 1), jnp.float32)

  def body(carry, xs):
    s, v = xs
    logits = apply_fn(params, jax.vmap(crop)(s)).astype(jnp.float32)  # (batch, *window, K)

    def add(i, carry):
      acc, norm = carry
      w = (weight * v[i])[..., None]
      corner = (*(s[i, d] for d in range(nd)), 0)
      acc = jax.lax.dynamic_update_slice(acc, jax.lax.dynamic_slice(acc, corner, (*window, k)) + w * logits[i],
                                         corner)
      norm = jax.lax.dynamic_update_slice(norm, jax.lax.dynamic_slice(norm, corner, (*window, 1)) + w, corner)
      return acc, norm
    return jax.lax.fori_loop(0, batch, add, carry), None

  (acc, norm), _ = jax.lax.scan(body, (acc, norm), (starts.reshape(-1, batch, nd), valid.reshape(-1, batch)))
  return acc / norm


def predict_slices(apply_fn: ApplyFn, params, image, *, batch: int = 8, multiple: int = 16) -> jax.Array:
  """Logits (X, Y, Z, K) of a 2D model applied to every axial slice image[:, :, z] (whole slices).

  Slices are zero-padded (centred) to a multiple of `multiple` (the U-Net's down-sampling factor).
  """
  image = jnp.asarray(image, jnp.float32)
  x, y, z, _ = image.shape
  pad = [-x % multiple, -y % multiple]
  slices = jnp.moveaxis(image, 2, 0)  # (Z, X, Y, C)
  slices = jnp.pad(slices, [(0, -z % batch), (pad[0] // 2, pad[0] - pad[0] // 2),
                            (pad[1] // 2, pad[1] - pad[1] // 2), (0, 0)])
  logits = _map_slices(apply_fn, params, slices, batch=batch)[:z]
  logits = logits[:, pad[0] // 2:pad[0] // 2 + x, pad[1] // 2:pad[1] // 2 + y]
  return jnp.moveaxis(logits, 0, 2)


@functools.partial(jax.jit, static_argnames=("apply_fn", "batch"))
def _map_slices(apply_fn, params, slices, *, batch):
  chunks = slices.reshape(-1, batch, *slices.shape[1:])
  out = jax.lax.map(lambda c: apply_fn(params, c).astype(jnp.float32), chunks)
  return out.reshape(-1, *out.shape[2:])


def predict_case(apply_fn: ApplyFn, params, case, config) -> jax.Array:
  """Logits (X, Y, Z, K) for `case.image`: whole slices if config.data.mode == "2d", else sliding windows.

  Settings from config.eval where the config has one (a study's model configs do not: then the window is
  data.patch_shape, overlap 0.5).
  """
  ev = config.get("eval") or {}
  if str(config.data.mode) == "2d":
    return predict_slices(apply_fn, params, case.image, batch=int(ev.get("slice_batch", 8)),
                          multiple=int(ev.get("pad_multiple", 16)))
  window = tuple(ev.window) if ev.get("window") else tuple(config.data.patch_shape)
  return sliding_window_predict(apply_fn, params, case.image, window=window, overlap=float(ev.get("overlap", 0.5)),
                                batch=int(ev.get("sw_batch", 1)))


def evaluate_cases(apply_fn: ApplyFn, params, cases, config) -> list[dict]:
  """One flat row per case: {"case_id", "WT_dice", "WT_hd95", ..., "ET_specificity"} from `brats_scores`.

  config.eval.max_cases > 0 evaluates only the first that many cases. With several processes, process p scores
  cases p, p + P, ... and every process returns all rows (one all-gather of the score table).
  """
  from mri_poison.metrics import brats_scores
  from mri_poison.train.trainer import process_sum
  max_cases = int(config.eval.get("max_cases", 0) or 0)
  cases = list(cases)[:max_cases or None]
  for case in cases:
    if case.label is None:
      raise ValueError(f"evaluate_cases: case {case.case_id} has no label")
  count, index = jax.process_count(), jax.process_index()
  scores = {}
  for i, case in enumerate(cases):
    if i % count != index:
      continue
    pred = np.asarray(jax.device_get(jnp.argmax(predict_case(apply_fn, params, case, config), axis=-1)), np.int32)
    scores[i] = {f"{region}_{name}": value for region, d in brats_scores(pred, case.label, case.spacing).items()
                 for name, value in d.items()}
  if count > 1 and cases:
    columns = sorted(next(iter(scores.values())) if scores else _score_columns())
    table = np.zeros((len(cases), len(columns)))
    for i, row in scores.items():
      table[i] = [row[c] for c in columns]
    table = process_sum(table)
    scores = {i: dict(zip(columns, map(float, table[i]))) for i in range(len(cases))}
  return [{"case_id": case.case_id, **scores[i]} for i, case in enumerate(cases)]


def _score_columns() -> list[str]:
  from mri_poison.metrics import brats_scores
  one = np.zeros((2, 2, 2), np.int32)
  return [f"{r}_{n}" for r, d in brats_scores(one, one).items() for n in d]


def summarize(rows: list[dict]) -> dict:
  """{"n_cases", "<column>": {"mean", "median", "std"}} over the numeric columns of `rows`."""
  out: dict[str, Any] = {"n_cases": len(rows)}
  for key in rows[0] if rows else []:
    values = np.asarray([r[key] for r in rows], dtype=object)
    if all(isinstance(v, (int, float, np.floating)) for v in values):
      v = values.astype(np.float64)
      out[key] = {"mean": float(v.mean()), "median": float(np.median(v)), "std": float(v.std())}
  return out


def train_and_evaluate(config, workdir: str) -> dict:
  """load_splits -> train_model -> evaluate the val cases -> results/val_scores.csv + results/val_summary.json."""
  from mri_poison.data.datasets import load_splits, write_provenance
  from mri_poison.train import loop, state as state_lib
  from mri_poison.train.metrics_log import MetricsWriter
  from mri_poison.train.workdir import is_writer
  splits = load_splits(config.data)
  if is_writer():
    write_provenance(workdir, config.data, splits)
  apply_fn = state_lib.make_apply_fn(state_lib.make_model(config.model))

  def eval_fn(params, step):
    s = summarize(evaluate_cases(apply_fn, params, splits["val"], config))
    return {f"{r}_dice": s[f"{r}_dice"]["mean"] for r in ("WT", "TC", "ET")}

  params = loop.train_model(config, workdir, cases=splits["train"], eval_fn=eval_fn if splits["val"] else None)
  rows = evaluate_cases(apply_fn, params, splits["val"], config)
  summary = summarize(rows)
  if is_writer():
    results = os.path.join(workdir, "results")
    io_utils.write_csv(os.path.join(results, "val_scores.csv"), rows)
    io_utils.write_json(os.path.join(results, "val_summary.json"), summary)
    if rows:
      MetricsWriter(workdir).write(int(config.train.steps), {
          f"val/{r}_dice": summary[f"{r}_dice"]["mean"] for r in ("WT", "TC", "ET")})
  return summary
