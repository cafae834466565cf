"""The SANTA-style GAN modules: shapes, the domain style and AdaIN, the shortest-path term."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mri_poison.models import gan
from mri_poison.poison.translation import shortest_path_loss

GEN = gan.Generator(features=4, n_down=2, n_res=1, style_dim=8)
# Jitted once per method: Flax applied eagerly dispatches op by op, which is slower than compiling here.
apply = jax.jit(lambda p, *a: GEN.apply({"params": p}, *a))
encode = jax.jit(lambda p, x: GEN.apply({"params": p}, x, method=gan.Generator.encode))
decode = jax.jit(lambda p, z, d: GEN.apply({"params": p}, z, d, method=gan.Generator.decode))


@pytest.fixture(scope="module")
def gen_params():
  return jax.jit(lambda k: GEN.init(k, jnp.zeros((1, 16, 16, 1)), jnp.ones((1,)))["params"])(jax.random.PRNGKey(0))


def test_generator_and_discriminator_shapes(gen_params):
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 1))
  y = apply(gen_params, x, jnp.ones((2,)))
  assert y.shape == (2, 16, 16, 1) and float(jnp.max(jnp.abs(y))) <= 1.0
  mu = encode(gen_params, x)
  assert mu.shape == (2, 4, 4, 16)  # two stride-2 stages, 4 -> 8 -> 16 channels
  out, feats = decode(gen_params, mu, jnp.full((2,), 0.5))
  assert out.shape == (2, 16, 16, 1) and len(feats) == 1 + 2  # n_res + n_down decoder stages
  disc = gan.PatchDiscriminator(features=4, n_layers=3)
  assert jax.eval_shape(lambda: disc.init_with_output(jax.random.PRNGKey(2), jnp.zeros((3, 32, 32, 1)))[0]).shape == (
      3, 4, 4, 1)
  # 3D volumes go through the same modules (shapes only: no compile needed).
  g3 = gan.Generator(features=2, n_down=1, n_res=1)
  out3 = jax.eval_shape(lambda: g3.init_with_output(jax.random.PRNGKey(3), jnp.zeros((2, 8, 8, 8, 1)),
                                                    jnp.zeros((2,)))[0])
  assert out3.shape == (2, 8, 8, 8, 1)
  clf = gan.SliceClassifier((4, 8))
  assert jax.eval_shape(lambda: clf.init_with_output(jax.random.PRNGKey(4), jnp.zeros((5, 16, 16, 1)))[0]).shape == (5,)


def test_style_at_d0_and_d1_is_the_two_embeddings(gen_params):
  style = jax.jit(lambda d: GEN.apply({"params": gen_params}, d, method=gan.Generator.style))
  e0, e1 = gen_params["e0"], gen_params["e1"]
  np.testing.assert_allclose(style(0.0)[0], e0, rtol=1e-6)
  np.testing.assert_allclose(style(1.0)[0], e1, rtol=1e-6)
  np.testing.assert_allclose(style(jnp.array([0.25]))[0], 0.75 * e0 + 0.25 * e1, rtol=1e-5, atol=1e-6)
  assert float(jnp.max(jnp.abs(e0 - e1))) > 0.1
  # The decoder sees only the style: decoding at d = 1 with e1 set to e0 equals decoding at d = 0.
  z = jax.random.normal(jax.random.PRNGKey(5), (2, 4, 4, 16))
  dec = lambda p, d: decode(p, z, jnp.full((2,), d))[0]
  swapped = {**gen_params, "e1": gen_params["e0"]}
  np.testing.assert_allclose(dec(swapped, 1.0), dec(gen_params, 0.0), rtol=1e-5, atol=1e-6)
  assert float(jnp.max(jnp.abs(dec(gen_params, 1.0) - dec(gen_params, 0.0)))) > 1e-3


def test_adain_is_one_plus_gamma_times_instance_norm_plus_beta():
  h = jax.random.normal(jax.random.PRNGKey(6), (2, 5, 5, 3)) * 3.0 + 1.0
  s = jax.random.normal(jax.random.PRNGKey(7), (2, 8))
  module = gan.AdaIN()
  out, variables = jax.jit(lambda k: module.init_with_output(k, h, s))(jax.random.PRNGKey(8))
  params = variables["params"]
  gb = s @ params["affine"]["kernel"] + params["affine"]["bias"]
  gamma, beta = gb[:, None, None, :3], gb[:, None, None, 3:]
  mean, var = h.mean(axis=(1, 2), keepdims=True), h.var(axis=(1, 2), keepdims=True)
  np.testing.assert_allclose(out, (1 + gamma) * (h - mean) / jnp.sqrt(var + 1e-5) + beta, rtol=1e-4, atol=1e-5)


def test_path_term_zero_iff_the_decoder_ignores_d(gen_params):
  z = jax.random.normal(jax.random.PRNGKey(9), (3, 4, 4, 16))
  dc, delta = jnp.array([0.0, 0.5, 0.97]), jnp.array([0.05, 0.07, 0.1])
  ignores_d = lambda z, d: [2.0 * z, jnp.tanh(z)]
  assert float(shortest_path_loss(ignores_d, z, dc, delta)) == 0.0
  # Linear in d with slope a: every finite difference is a (gap >= 0.1 is never hit at these deltas but d=0 clips).
  linear = lambda z, d: [z * 3.0 * d[:, None, None, None]]
  d1, d2 = jnp.clip(dc + delta, 0, 1), jnp.clip(dc - delta, 0, 1)
  expected = jnp.mean(jnp.square(z * 3.0 * ((d1 - d2) / jnp.maximum(d1 - d2, 0.1))[:, None, None, None]))
  np.testing.assert_allclose(shortest_path_loss(linear, z, dc, delta), expected, rtol=1e-5)
  feats = lambda z, d: decode(gen_params, z, d)[1]
  assert float(shortest_path_loss(feats, z, dc, delta)) > 1e-4
