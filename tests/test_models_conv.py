"""The convolution switch: the depth-folded form equals XLA's convolution (values, input and kernel gradients,
2D and 3D, paddings, strides, float32 and bfloat16), `Conv` has `nn.Conv`'s params, and a U-Net checkpoint
saved under one implementation restores and predicts the same under the other."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mri_poison.models import conv as conv_lib
from mri_poison.models.unet import UNet
from mri_poison.train import checkpoint

CASES = [  # (input shape, kernel window, strides, padding)
    ((2, 6, 7, 8, 3), (3, 3, 3), (1, 1, 1), "SAME"),
    ((2, 9, 7, 5, 3), (3, 3, 3), (1, 1, 1), "VALID"),
    ((2, 8, 8, 8, 3), (4, 4, 4), (2, 2, 2), "SAME"),  # the GAN's strided down-sampling
    ((2, 7, 6, 5, 3), (5, 3, 1), (1, 1, 1), ((2, 2), (1, 0), (0, 0))),
    ((2, 8, 8, 8, 3), (1, 1, 1), (1, 1, 1), "VALID"),  # the depth-to-space up-sampling conv
    ((2, 9, 7, 3), (3, 3), (1, 1), "SAME"),
    ((2, 8, 6, 3), (4, 4), (2, 2), "SAME"),
]


def _both(x, w, strides, padding):
  """(value, d/dx, d/dw) of sum(sin(conv)) under each implementation."""
  out = []
  for impl in ("xla", "folded"):
    f = lambda x, w, impl=impl: conv_lib.conv(x, w, strides=strides, padding=padding, impl=impl)
    loss = lambda x, w, f=f: jnp.sum(jnp.sin(f(x, w).astype(jnp.float32)))
    out.append((f(x, w),) + jax.grad(loss, argnums=(0, 1))(x, w))
  return out


@pytest.mark.parametrize("shape,window,strides,padding", CASES)
def test_folded_equals_xla_in_float32(shape, window, strides, padding):
  x = jax.random.normal(jax.random.key(0), shape)
  w = jax.random.normal(jax.random.key(1), window + (shape[-1], 5))
  ref, fold = _both(x, w, strides, padding)
  assert ref[0].shape == fold[0].shape
  for name, a, b in zip(("value", "grad x", "grad kernel"), ref, fold):
    scale = float(jnp.abs(a).max())
    assert scale > 0, name
    np.testing.assert_allclose(b, a, atol=1e-5 * scale, rtol=0, err_msg=name)


@pytest.mark.parametrize("shape,window,strides,padding", [CASES[0], CASES[2], CASES[5]])
def test_folded_equals_xla_in_bfloat16(shape, window, strides, padding):
  x = jax.random.normal(jax.random.key(0), shape).astype(jnp.bfloat16)
  w = (0.3 * jax.random.normal(jax.random.key(1), window + (shape[-1], 5))).astype(jnp.bfloat16)
  ref, fold = _both(x, w, strides, padding)
  for name, a, b in zip(("value", "grad x", "grad kernel"), ref, fold):
    assert b.dtype == a.dtype == jnp.bfloat16, name
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    # Summed in another order in bfloat16 (8 significant bits): a few ulps of the largest value.
    np.testing.assert_allclose(b, a, atol=3e-2 * np.abs(a).max(), rtol=0, err_msg=name)
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.999, name


def test_auto_folds_3d_only_on_cpu_and_rejects_unknown_names():
  assert jax.default_backend() == "cpu"
  assert conv_lib.resolve_impl("auto", 3) == "folded"
  assert conv_lib.resolve_impl("auto", 2) == "xla"
  assert conv_lib.resolve_impl("folded", 1) == "xla"  # nothing to fold
  with pytest.raises(ValueError, match="model.conv_impl"):
    conv_lib.resolve_impl("fast", 3)


@pytest.mark.parametrize("impl", ["xla", "folded"])
def test_conv_module_has_the_params_and_outputs_of_nn_conv(impl):
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, 6, 3))
  ref_module = nn.Conv(4, (4, 4, 4), strides=(2, 2, 2), padding="SAME")
  params = ref_module.init(jax.random.key(1), x)
  module = conv_lib.Conv(4, (4, 4, 4), strides=2, padding="SAME", impl=impl)
  ours = module.init(jax.random.key(1), x)
  assert jax.tree.map(jnp.shape, ours) == jax.tree.map(jnp.shape, params)
  np.testing.assert_array_equal(ours["params"]["kernel"], params["params"]["kernel"])  # same initialiser
  np.testing.assert_allclose(module.apply(params, x), ref_module.apply(params, x), atol=1e-5)


def _unet_logits_and_grads(impl, ndim, dtype, params=None):
  model = UNet(features=(4, 8), out_channels=3, dtype=dtype, conv_impl=impl)
  x = jax.random.normal(jax.random.key(0), (2,) + (8,) * ndim + (2,))
  if params is None:
    params = jax.jit(model.init)(jax.random.key(1), x)["params"]
  def loss(p):
    logits = model.apply({"params": p}, x)
    return jnp.mean(jnp.square(logits)), logits
  (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return params, logits, grads


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_unet_logits_and_param_gradients_agree_across_impls(ndim, dtype):
  params, ref_logits, ref_grads = _unet_logits_and_grads("xla", ndim, dtype)
  _, logits, grads = _unet_logits_and_grads("folded", ndim, dtype, params)
  tol = 1e-4 if dtype == jnp.float32 else 5e-2
  scale = float(jnp.abs(ref_logits).max())
  np.testing.assert_allclose(logits, ref_logits, atol=tol * scale, rtol=0)
  # One scale for the whole gradient: biases before a norm have a gradient of zero up to round-off.
  grad_scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(ref_grads))
  other = dict(jax.tree_util.tree_leaves_with_path(grads))
  for path, a in jax.tree_util.tree_leaves_with_path(ref_grads):
    np.testing.assert_allclose(np.asarray(other[path], np.float32), np.asarray(a, np.float32),
                               atol=tol * grad_scale, rtol=0, err_msg=str(path))


def test_checkpoint_saved_with_one_impl_predicts_the_same_with_the_other(tmp_path):
  x = jax.random.normal(jax.random.key(0), (1, 8, 8, 8, 2))
  folded = UNet(features=(4, 8), out_channels=3, conv_impl="folded")
  params = folded.init(jax.random.key(1), x)["params"]
  manager = checkpoint.make_manager(str(tmp_path / "ckpt"), ckpt_every=1)
  assert checkpoint.save(manager, 1, {"params": params}, force=True)
  manager.wait_until_finished()
  xla = UNet(features=(4, 8), out_channels=3, conv_impl="xla")
  like = {"params": xla.init(jax.random.key(7), x)["params"]}  # other values, same tree
  restored = checkpoint.restore_state(manager, 1, like)["params"]
  jax.tree.map(np.testing.assert_array_equal, restored, params)
  np.testing.assert_allclose(xla.apply({"params": restored}, x), folded.apply({"params": params}, x), atol=1e-5)
