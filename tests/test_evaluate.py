"""Whole-volume inference equals per-window / per-slice inference; short phantom training reaches WT Dice >= 0.6."""
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from mri_poison.train import evaluate, loop
from mri_poison.train import state as state_lib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_train import phantom_cases, tiny_config  # noqa: E402


def pointwise(params, x):
  """A voxel-wise channel mixer: exactly translation-equivariant, so any window tiling must reproduce it."""
  return jnp.tanh(x @ params["w"] + params["b"])


PARAMS = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(2, 3)), jnp.float32), "b": jnp.arange(3.0)}


def test_window_starts_cover_every_voxel_and_end_flush():
  starts = evaluate.window_starts((20, 23, 5), (8, 8, 8), 0.5)
  covered = np.zeros((20, 23, 8), int)
  for s in starts:
    covered[s[0]:s[0] + 8, s[1]:s[1] + 8, s[2]:s[2] + 8] += 1
  assert covered[:, :, :5].min() >= 1 and starts[:, 0].max() == 12 and starts[:, 1].max() == 15
  g = evaluate.gaussian_importance((9, 9, 9))
  assert g[4, 4, 4] == 1.0 and np.allclose(g, g[::-1, ::-1, ::-1]) and g.min() > 0


def test_sliding_window_equals_whole_volume():
  image = np.random.default_rng(1).normal(size=(20, 23, 5, 2)).astype(np.float32)  # Z smaller than the window
  whole = pointwise(PARAMS, jnp.asarray(image))
  out = evaluate.sliding_window_predict(pointwise, PARAMS, image, window=(8, 8, 8), overlap=0.5, batch=3)
  assert out.shape == (20, 23, 5, 3)
  np.testing.assert_allclose(np.asarray(out), np.asarray(whole), atol=1e-5)


def test_predict_slices_equals_per_slice_model():
  config = tiny_config()
  model = state_lib.make_model(config.model)
  apply_fn = state_lib.make_apply_fn(model)
  params = state_lib.init_params(model, jax.random.PRNGKey(0), (1, 32, 32, 4))
  image = np.random.default_rng(2).normal(size=(30, 28, 5, 4)).astype(np.float32)
  out = evaluate.predict_slices(apply_fn, params, image, batch=2, multiple=4)
  padded = np.pad(image, [(1, 1), (0, 0), (0, 0), (0, 0)])  # X to a multiple of 4, centred
  ref = np.stack([np.asarray(apply_fn(params, padded[None, :, :, z]))[0, 1:31] for z in range(5)], axis=2)
  assert out.shape == (30, 28, 5, 4)
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-4)


def test_phantom_2d_training_reaches_wt_dice(tmp_path):
  # 300 steps (lr 4e-3) of the runlocal 2D U-Net on 6 phantom v2 heads; held-out heads (other seeds) reached WT
  # Dice 0.70 / 0.85 / 0.67 / 0.82 with train.seed 0-3 (jax 0.10.2); 200 steps at 2e-3 gave 0.34-0.72, stuck in
  # some seeds. The bar is 0.6.
  config = tiny_config(steps=300, ckpt_every=300)
  config.model.features = (8, 16, 32)  # runlocal's three levels (the loop tests' two are below the bar here)
  config.train.update(dict(warmup_steps=10, log_every=50, eval_every=0, lr=4e-3))
  t0 = time.perf_counter()
  params = loop.train_model(config, str(tmp_path), cases=phantom_cases(6))
  apply_fn = state_lib.make_apply_fn(state_lib.make_model(config.model))
  rows = evaluate.evaluate_cases(apply_fn, params, phantom_cases(4, offset=100), config)
  summary = evaluate.summarize(rows)
  print(f"phantom2d: {time.perf_counter() - t0:.1f}s, WT {summary['WT_dice']['mean']:.3f}, "
        f"TC {summary['TC_dice']['mean']:.3f}, ET {summary['ET_dice']['mean']:.3f}")
  assert len(rows) == 4 and {"case_id", "WT_dice", "WT_hd95", "ET_sensitivity"} <= set(rows[0])
  assert summary["WT_dice"]["mean"] >= 0.6, summary["WT_dice"]
