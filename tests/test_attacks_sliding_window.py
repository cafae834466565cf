"""Differentiable sliding-window inference: equal to the evaluator's blend, to the whole-volume model when one
window covers the volume (attacks included), exact gradients, bounded memory."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mri_poison.attacks import gradient
from mri_poison.attacks import losses
from mri_poison.attacks import sliding_window
from mri_poison.train import evaluate
from mri_poison.train import state as state_lib


def _unet(channels=2):
  model = state_lib.make_model(ml_collections.ConfigDict(dict(features=(4, 8), out_channels=4)))
  params = state_lib.init_params(model, jax.random.key(0, impl="rbg"), (1, 8, 8, 8, channels))  # rbg: fast compile on CPU
  return state_lib.make_apply_fn(model), params


def _volume(shape, seed=1):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def test_one_covering_window_is_the_whole_volume_model():
  apply_fn, params = _unet()
  image = _volume((2, 8, 8, 8, 2))
  got = sliding_window.sliding_window_logits(apply_fn, params, image, window=(8, 8, 8))
  np.testing.assert_array_equal(got, apply_fn(params, image))
  # An axis shorter than the window is zero-padded (centred) for the model and cropped back.
  small = image[:, :, 1:7]
  padded = jnp.pad(small, [(0, 0), (0, 0), (1, 1), (0, 0), (0, 0)])
  np.testing.assert_allclose(sliding_window.sliding_window_logits(apply_fn, params, small, window=(8, 8, 8)),
                             apply_fn(params, padded)[:, :, 1:7], rtol=1e-5, atol=1e-6)


def test_equals_the_evaluators_sliding_window_on_several_windows():
  apply_fn, params = _unet()
  image = _volume((2, 20, 13, 6, 2))  # 3 x 2 x 1 windows of 8^3 (the last axis padded), 6 windows in batches
  for batch, remat in ((1, True), (4, False)):  # batch 4: 2 padding (weight 0) windows in the last step
    got = sliding_window.sliding_window_logits(apply_fn, params, image, window=(8, 8, 8), batch=batch,
                                               remat=remat)
    for b in range(2):
      want = evaluate.sliding_window_predict(apply_fn, params, image[b], window=(8, 8, 8), batch=3)
      np.testing.assert_allclose(got[b], want, rtol=1e-5, atol=1e-5)  # batch sizes differ: conv rounding


def test_fgsm_through_one_covering_window_equals_whole_volume_fgsm():
  apply_fn, params = _unet()
  image = _volume((2, 8, 8, 8, 2), seed=2)
  labels = jnp.asarray(np.random.default_rng(3).integers(0, 4, (2, 8, 8, 8)), jnp.int32)
  windowed = sliding_window.windowed_apply(apply_fn, window=(8, 8, 8))
  direct = gradient.fgsm(losses.cross_entropy(apply_fn, params, labels), image, eps=0.1)
  through = gradient.fgsm(losses.cross_entropy(windowed, params, labels), image, eps=0.1)
  np.testing.assert_array_equal(through, direct)
  assert np.mean(np.asarray(direct != image)) > 0.9
  # Equal settings give equal (hashable) wrappers: a DenseLoss on them compiles once.
  assert windowed == sliding_window.windowed_apply(apply_fn, window=[8, 8, 8])
  assert hash(windowed) == hash(sliding_window.windowed_apply(apply_fn, window=[8, 8, 8]))
  with pytest.raises(ValueError, match="overlap"):
    sliding_window.windowed_apply(apply_fn, window=(8, 8, 8), overlap=1.0)


def _voxel_model(params, x):
  """Per-voxel non-linear model: blending a per-voxel model's windows gives the model back, at any window."""
  return jnp.tanh(x @ params)


def test_gradient_through_many_windows_is_the_whole_volume_gradient():
  w = jnp.asarray(np.random.default_rng(4).normal(size=(3, 4)), jnp.float32)
  image = _volume((1, 17, 12, 9, 3), seed=5)
  r = _volume((1, 17, 12, 9, 4), seed=6)
  windowed = sliding_window.windowed_apply(_voxel_model, window=(6, 6, 6), overlap=0.5, batch=3)
  np.testing.assert_allclose(windowed(w, image), _voxel_model(w, image), rtol=1e-5, atol=1e-6)
  g_windowed = jax.jit(jax.grad(lambda x: jnp.sum(r * windowed(w, x))))(image)
  g_direct = jax.grad(lambda x: jnp.sum(r * _voxel_model(w, x)))(image)
  np.testing.assert_allclose(g_windowed, g_direct, rtol=1e-4, atol=1e-6)


def test_remat_bounds_the_backward_memory():
  # 245 windows of 16^3 over 64 x 64 x 48, 4 -> 16 channels (the logits are 4 input volumes): with remat the
  # backward pass needs about 9 input volumes (logits, their cotangent, the image gradient), without it about
  # 50 (every window's activations).
  w = jnp.asarray(np.random.default_rng(7).normal(size=(4, 16)), jnp.float32)
  image = jnp.zeros((1, 64, 64, 48, 4))
  volume_bytes = image.size * 4

  def temp_bytes(remat):
    windowed = sliding_window.windowed_apply(_voxel_model, window=(16,) * 3, remat=remat)
    grad = jax.jit(jax.grad(lambda x: jnp.sum(windowed(w, x))))
    return grad.lower(image).compile().memory_analysis().temp_size_in_bytes

  with_remat, without = temp_bytes(True), temp_bytes(False)
  assert with_remat < 16 * volume_bytes < without, (with_remat, without, volume_bytes)
