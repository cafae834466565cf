"""UNet: shapes (2D/3D), dtype handling (float32 first layer), temperature, deep supervision, up-sampling
equivalence, layout."""
import functools
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mri_poison.models import conv as conv_lib
from mri_poison.models import unet as unet_lib
from mri_poison.models.unet import BASIC_UNET_FEATURES, DepthToSpaceUp, UNet


def _key(seed):
  # rbg keys: cheap to compile on every backend, whatever the threefry mode (see mri_poison/__init__.py).
  return jax.random.key(seed, impl="rbg")


def _normal(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _init(model, x, seed=0):
  return jax.jit(model.init)(_key(seed), x)


def test_shapes_2d_and_3d():
  x2 = _normal(1, (2, 32, 32, 4))
  m2 = UNet(features=(8, 16, 32), out_channels=4)
  y2 = jax.jit(m2.apply)(_init(m2, x2), x2)
  assert y2.shape == (2, 32, 32, 4) and y2.dtype == jnp.float32
  x3 = _normal(2, (1, 16, 16, 16, 4))
  m3 = UNet(features=(4, 8, 16), out_channels=3)
  v3 = _init(m3, x3)
  apply3 = jax.jit(m3.apply)
  y3 = apply3(v3, x3)
  assert y3.shape == (1, 16, 16, 16, 3) and y3.dtype == jnp.float32
  assert np.all(np.isfinite(y3))
  # Instance norm after every conv: a positive rescaling of the input leaves the logits unchanged (up to eps).
  np.testing.assert_allclose(apply3(v3, 5.0 * x3), y3, atol=2e-4)


def test_bfloat16_compute_float32_params_and_logits():
  x = _normal(3, (2, 32, 32, 4))
  m32 = UNet(features=(8, 16, 32))
  mbf = UNet(features=(8, 16, 32), dtype=jnp.bfloat16)
  variables = _init(mbf, x)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
  ybf = jax.jit(mbf.apply)(variables, x)
  y32 = jax.jit(m32.apply)(variables, x)
  assert ybf.dtype == jnp.float32
  assert float(jnp.max(jnp.abs(ybf - y32))) > 0  # it really computed in bfloat16
  # bfloat16 keeps ~3 significant digits: a few per cent of relative error through ~10 layers.
  rel = float(jnp.linalg.norm(ybf - y32) / jnp.linalg.norm(y32))
  assert rel < 0.05, rel


def test_temperature_scales_logits_and_compiles_once():
  x = _normal(4, (1, 32, 32, 2))
  m = UNet(features=(4, 8), out_channels=3)
  variables = _init(m, x)
  y = jax.jit(m.apply)(variables, x)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def apply_t(t):
    return m.apply(variables, x, temperature=t)

  for t in (2.0, 0.5, 7.0):
    np.testing.assert_allclose(apply_t(jnp.float32(t)), y / t, rtol=1e-5, atol=1e-5)


def test_deep_supervision_outputs_and_shared_final_head():
  x = _normal(5, (2, 16, 16, 16, 1))
  m_ds = UNet(features=(4, 8, 8, 8), out_channels=2, deep_supervision=True)
  variables = _init(m_ds, x)
  outs = jax.jit(m_ds.apply)(variables, x, temperature=2.0)
  assert isinstance(outs, tuple)
  assert [o.shape for o in outs] == [(2, 16, 16, 16, 2), (2, 8, 8, 8, 2), (2, 4, 4, 4, 2)]
  assert all(o.dtype == jnp.float32 for o in outs)
  # The final output is the plain model's output for the shared params (aux heads are extra 1x1 convs).
  plain = {k: v for k, v in variables["params"].items() if not k.startswith("aux_head")}
  assert set(variables["params"]) - set(plain) == {"aux_head_1", "aux_head_2"}
  y = jax.jit(UNet(features=(4, 8, 8, 8), out_channels=2).apply)({"params": plain}, x, temperature=2.0)
  np.testing.assert_allclose(outs[0], y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("transpose_kernel", [False, True])
def test_depth_to_space_equals_conv_transpose(ndim, transpose_kernel):
  spatial = (3, 4, 5)[:ndim]
  c_in, c_out = 3, 5
  x = _normal(6, (2, *spatial, c_in))
  w = _normal(7, (2,) * ndim + ((c_out, c_in) if transpose_kernel else (c_in, c_out)))
  b = _normal(8, (c_out,))
  dims = conv_lib._dims(ndim)
  ref = jax.lax.conv_transpose(x, w, (2,) * ndim, "VALID", dimension_numbers=dims,
                               transpose_kernel=transpose_kernel,
                               precision=jax.lax.Precision.HIGHEST) + b
  assert ref.shape == (2, *(2 * s for s in spatial), c_out)
  kernel = unet_lib.conv_transpose_to_depth_to_space_kernel(w, transpose_kernel=transpose_kernel)
  up = DepthToSpaceUp(c_out).apply({"params": {"kernel": kernel, "bias": b}}, x)
  np.testing.assert_allclose(up, ref, rtol=1e-5, atol=1e-5)
  # Independent check of the convention on one output voxel: y[2i + a] = x[i] . W[1 - a] (lax default),
  # x[i] . W[a]^T with transpose_kernel.
  tap = (1, 0, 1)[:ndim]
  w_tap = w[tap].T if transpose_kernel else w[tuple(1 - t for t in tap)]
  np.testing.assert_allclose(ref[(0,) + tap], x[(0,) + (0,) * ndim] @ w_tap + b, rtol=1e-5, atol=1e-5)


def _monai_basic_unet_param_count(c_in, c_out, f, k=27):
  # Written from MONAI 1.6.1 basic_unet.py: conv(bias) + InstanceNorm(affine) twice per TwoConv;
  # UpCat = ConvTranspose(k=2, s=2, bias) to in//2 (in at the top level) + TwoConv(cat + up -> out).
  conv = lambda ci, co, kk=k: kk * ci * co + co
  two = lambda ci, co: conv(ci, co) + 2 * co + conv(co, co) + 2 * co
  upcat = lambda i, c, o, halves=True: (8 * i * (i // 2 if halves else i) + (i // 2 if halves else i)
                                        + two(c + (i // 2 if halves else i), o))
  n = two(c_in, f[0]) + sum(two(f[i], f[i + 1]) for i in range(4))
  n += upcat(f[4], f[3], f[3]) + upcat(f[3], f[2], f[2]) + upcat(f[2], f[1], f[1])
  n += upcat(f[1], f[0], f[5], halves=False) + conv(f[5], c_out, 1)
  return n


def test_basic_unet_layout_param_count():
  assert unet_lib.basic_unet_features() == BASIC_UNET_FEATURES == (32, 32, 64, 128, 256, 32)
  assert unet_lib.split_features(BASIC_UNET_FEATURES) == ((32, 32, 64, 128, 256), 32)
  assert unet_lib.split_features((16, 32, 64)) == ((16, 32, 64), 16)
  assert unet_lib.split_features((8,) * 6, final_features=4) == ((8,) * 6, 4)
  m = UNet(features=BASIC_UNET_FEATURES, out_channels=4)
  shapes = jax.eval_shape(lambda: m.init(jax.random.key(0), jnp.zeros((1, 16, 16, 16, 4))))
  n = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(shapes))
  assert n == _monai_basic_unet_param_count(4, 4, BASIC_UNET_FEATURES) == 5_752_068
  p = shapes["params"]
  assert p["down_4"]["conv_1"]["Conv_0"]["kernel"].shape == (3, 3, 3, 256, 256)
  assert p["up_3"]["kernel"].shape == (256, 8 * 128)  # halves: 256 -> 128
  assert p["up_0"]["kernel"].shape == (32, 8 * 32)  # top level keeps its width
  assert p["upcat_0"]["conv_0"]["Conv_0"]["kernel"].shape == (3, 3, 3, 64, 32)
  assert p["final_conv"]["kernel"].shape == (1, 1, 1, 32, 4)


def test_bad_spatial_dims_raise():
  m = UNet(features=(4, 8, 16))
  with pytest.raises(ValueError, match="divisible by 4"):
    jax.eval_shape(lambda: m.init(jax.random.key(0), jnp.zeros((1, 16, 18, 4))))
  with pytest.raises(ValueError, match="norm"):
    jax.eval_shape(lambda: UNet(features=(4,), norm="layer").init(jax.random.key(0), jnp.zeros((1, 8, 8, 1))))


def test_norm_variants_dropout_and_gradients():
  x = _normal(7, (2, 16, 16, 2))
  for norm in ("group", "none"):
    m = UNet(features=(4, 8), out_channels=2, norm=norm)
    assert jax.jit(m.apply)(_init(m, x), x).shape == (2, 16, 16, 2)
  mb = UNet(features=(4, 8), out_channels=2, norm="batch")
  vb = _init(mb, x)
  y, updates = jax.jit(functools.partial(mb.apply, train=True, mutable=["batch_stats"]))(vb, x)
  assert y.shape == (2, 16, 16, 2)
  assert not np.allclose(updates["batch_stats"]["down_0"]["conv_0"]["BatchNorm_0"]["mean"], 0)
  md = UNet(features=(4, 8), out_channels=2, dropout=0.5)
  vd = _init(md, x)
  apply_train = jax.jit(lambda v, key: md.apply(v, x, train=True, rngs={"dropout": key}))
  assert not np.allclose(apply_train(vd, _key(1)), apply_train(vd, _key(2)))
  apply_eval = jax.jit(md.apply)
  np.testing.assert_array_equal(apply_eval(vd, x), apply_eval(vd, x))  # eval is deterministic

  def loss(params):
    logits = md.apply({"params": params}, x)
    return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])

  grads = jax.jit(jax.grad(loss))(vd["params"])
  leaves = jax.tree.leaves(grads)
  assert all(np.all(np.isfinite(g)) for g in leaves)
  assert sum(float(jnp.sum(jnp.abs(g))) for g in leaves) > 0


def test_float32_first_layer_keeps_small_perturbations_under_bfloat16():
  """Under bfloat16 compute an input change of 1e-3 reaches the model (first conv in float32); the old
  all-bfloat16 path (input_dtype="bfloat16") rounds it away on z-scored values of 1..3 (bf16 spacing there is
  2^-7..2^-6, so v + 1e-3 rounds back to v)."""
  rng = np.random.default_rng(8)
  x = jnp.asarray(rng.uniform(1.0, 3.0, (1, 16, 16, 4)), jnp.bfloat16).astype(jnp.float32)  # bf16-exact values
  x_eps = x.at[0, 7, 9, 2].add(1e-3)
  assert float(x_eps[0, 7, 9, 2] - x[0, 7, 9, 2]) == pytest.approx(1e-3, rel=1e-3)
  new = UNet(features=(8, 16), dtype=jnp.bfloat16)  # input_dtype defaults to float32
  old = UNet(features=(8, 16), dtype=jnp.bfloat16, input_dtype="bfloat16")
  variables = _init(new, x)
  assert jax.tree.structure(variables) == jax.tree.structure(_init(old, x))  # same params: checkpoints load
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))

  def run(model, inputs):
    logits, state = jax.jit(functools.partial(model.apply, capture_intermediates=True))(variables, inputs)
    first = state["intermediates"]["down_0"]["conv_0"]["Conv_0"]["__call__"][0]
    return logits, first

  (y_new, conv_new), (y_new_eps, conv_new_eps) = run(new, x), run(new, x_eps)
  (y_old, conv_old), (y_old_eps, conv_old_eps) = run(old, x), run(old, x_eps)
  assert conv_new.dtype == jnp.float32 and conv_old.dtype == jnp.bfloat16 and y_new.dtype == jnp.float32
  # The first conv is linear: its change is the kernel times the 1e-3 step, at the 3x3 neighbourhood.
  kernel = variables["params"]["down_0"]["conv_0"]["Conv_0"]["kernel"]  # (3, 3, C_in, C_out)
  change = np.asarray(conv_new_eps - conv_new)[0]
  want = np.zeros_like(change)
  for i, j in itertools.product(range(3), range(3)):
    want[7 + 1 - i, 9 + 1 - j] = 1e-3 * np.asarray(kernel[i, j, 2])
  np.testing.assert_allclose(change, want, atol=2e-6)
  assert float(jnp.max(jnp.abs(y_new_eps - y_new))) > 0  # ... and it reaches the logits
  np.testing.assert_array_equal(conv_old_eps, conv_old)  # the old path never saw it
  np.testing.assert_array_equal(y_old_eps, y_old)
  # bfloat16 after the first layer: the two paths agree to bfloat16 accuracy.
  assert float(jnp.linalg.norm(y_new - y_old) / jnp.linalg.norm(y_old)) < 0.05


def test_make_model_reads_input_dtype():
  import ml_collections
  from mri_poison.train import state as state_lib
  cfg = ml_collections.ConfigDict(dict(features=(4, 8), dtype="bfloat16"))
  assert state_lib.make_model(cfg).input_dtype == jnp.float32  # older configs: float32 first layer
  cfg.input_dtype = "bfloat16"
  assert state_lib.make_model(cfg).input_dtype == jnp.bfloat16
  cfg.input_dtype = "float8"
  with pytest.raises(ValueError, match="model.input_dtype"):
    state_lib.make_model(cfg)


def test_remat_stores_less_and_changes_nothing():
  """remat=True: identical params and gradients; the backward pass keeps < half the residual bytes."""
  x = jax.random.normal(jax.random.key(0), (1, 16, 16, 2))
  grads, stored = {}, {}
  for remat in (False, True):
    model = UNet(features=(4, 8), out_channels=3, remat=remat)
    params = model.init(jax.random.key(1), x, train=True)["params"]
    def loss(p, model=model):
      return jnp.mean(model.apply({"params": p}, x, train=True) ** 2)
    grads[remat] = jax.jit(jax.grad(loss))(params)
    _, vjp = jax.eval_shape(lambda p, loss=loss: jax.vjp(loss, p), params)
    stored[remat] = sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(vjp))
  assert jax.tree.structure(grads[False]) == jax.tree.structure(grads[True])
  for a, b in zip(jax.tree.leaves(grads[False]), jax.tree.leaves(grads[True])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
  assert stored[True] < 0.5 * stored[False], stored
