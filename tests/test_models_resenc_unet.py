"""The residual-encoder U-Net and the victim registry: shapes, the conv implementations agree (strided convs
included), the registry's errors, and a short fit that must segment."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from mri_poison import losses
from mri_poison import models
from mri_poison.models.resenc_unet import ResEncUNet
from mri_poison.train import state


def _cfg(**kw):
  base = dict(features=(4, 8, 16), out_channels=3, norm="instance", activation="leaky_relu", dropout=0.0,
              dtype="float32", input_dtype="float32", deep_supervision=False, conv_impl="auto")
  return ml_collections.ConfigDict(dict(base, **kw))


def test_registry_builds_each_victim_by_name_and_unet_when_none_is_named():
  assert type(state.make_model(_cfg())) is models.UNet  # pylint: disable=unidiomatic-typecheck
  assert isinstance(state.make_model(_cfg(name="resenc_unet")), ResEncUNet)
  with pytest.raises(ValueError, match=r"model.name='vit': expected one of \('unet', 'resenc_unet'\)"):
    state.make_model(_cfg(name="vit"))
  with pytest.raises(ValueError, match="resenc_unet has no deep supervision"):
    m = state.make_model(_cfg(name="resenc_unet", deep_supervision=True))
    m.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 2)))


@pytest.mark.parametrize("shape", [(2, 16, 16, 2), (1, 8, 8, 8, 2)])
def test_shapes_temperature_and_residual_downsampling(shape):
  model = ResEncUNet(features=(4, 8, 16), blocks=(1, 2), out_channels=3)
  x = jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)
  variables = model.init(jax.random.PRNGKey(0), x)
  y = model.apply(variables, x)
  assert y.shape == shape[:-1] + (3,) and y.dtype == jnp.float32
  np.testing.assert_allclose(model.apply(variables, x, temperature=4.0), y / 4.0, rtol=1e-6)
  p = variables["params"]
  # Stage 0: one block; deeper stages: two, the first strided with a 1x1 skip conv, the second without one.
  assert {"stage_0_block_0", "stage_1_block_0", "stage_1_block_1", "stage_2_block_1"} <= set(p)
  assert "stage_2_block_2" not in p and "skip" in p["stage_1_block_0"] and "skip" not in p["stage_1_block_1"]
  with pytest.raises(ValueError, match="divisible by 4"):
    model.apply(variables, x[:, :6])


def test_folded_and_xla_convs_agree_on_the_3d_model():
  # Two stages: the strided residual block and its strided 1x1 skip go through both implementations.
  x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 4, 4, 4, 2)), jnp.float32)
  folded = ResEncUNet(features=(4, 8), blocks=(1, 1), out_channels=3, conv_impl="folded")
  native = ResEncUNet(features=(4, 8), blocks=(1, 1), out_channels=3, conv_impl="xla")
  params = folded.init(jax.random.PRNGKey(2), x)["params"]
  np.testing.assert_allclose(folded.apply({"params": params}, x), native.apply({"params": params}, x),
                             rtol=1e-4, atol=1e-4)
  grad = lambda m: jax.grad(lambda v: jnp.sum(m.apply({"params": params}, v) ** 2))(x)
  np.testing.assert_allclose(grad(folded), grad(native), rtol=1e-3, atol=1e-3)


def test_a_short_fit_segments_a_disc():
  # 2D toy: the label is a bright disc in noise; 150 Adam steps must reach foreground Dice > 0.9 on new images.
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[:16, :16]

  def batch(n):
    centres = rng.uniform(4, 12, size=(n, 2))
    labels = ((yy[None] - centres[:, :1, None]) ** 2 + (xx[None] - centres[:, 1:, None]) ** 2 < 9).astype(np.int32)
    images = labels[..., None] * 1.0 + rng.normal(scale=0.5, size=(n, 16, 16, 1))
    return jnp.asarray(images, jnp.float32), jnp.asarray(labels)

  model = state.make_model(_cfg(name="resenc_unet", out_channels=2, features=(8, 16)))
  x, y = batch(16)
  params = model.init(jax.random.PRNGKey(0), x)["params"]
  tx = optax.adam(3e-3)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, x, y):
    loss, g = jax.value_and_grad(lambda p: losses.ce_dice(model.apply({"params": p}, x), y).mean())(params)
    updates, opt = tx.update(g, opt)
    return optax.apply_updates(params, updates), opt, loss

  for _ in range(150):
    params, opt, loss = step(params, opt, x, y)
  x_test, y_test = batch(8)
  pred = np.asarray(jnp.argmax(model.apply({"params": params}, x_test), -1))
  dice = 2 * np.sum(pred * np.asarray(y_test)) / (np.sum(pred) + np.sum(np.asarray(y_test)))
  assert dice > 0.9, dice
