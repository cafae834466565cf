"""CDC (theta = 0 is a plain conv) and UMed's bounded contour / texture perturbations."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mri_poison.models import perturbators as pert
from mri_poison.ops import morphology, texture


def test_cdc_theta_zero_is_plain_conv_and_theta_subtracts_centre_term():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3))
  cdc = pert.CDConv(5, theta=0.0)
  params = jax.jit(cdc.init)(jax.random.PRNGKey(1), x)["params"]
  plain = nn.Conv(5, (3, 3), padding="SAME").apply({"params": params["conv"]}, x)
  np.testing.assert_allclose(cdc.apply({"params": params}, x), plain, atol=1e-6)
  half = pert.CDConv(5, theta=0.5).apply({"params": params}, x)
  w_sum = params["conv"]["kernel"].sum(axis=(0, 1))
  np.testing.assert_allclose(half, plain - 0.5 * jnp.einsum("bxyi,io->bxyo", x, w_sum), atol=1e-5)
  # theta = 1 on a constant image: every tap sees the centre value, so away from the border only the bias is left.
  const = jnp.full((1, 8, 8, 3), 2.0)
  one = pert.CDConv(5, theta=1.0).apply({"params": params}, const)
  np.testing.assert_allclose(one[0, 2:-2, 2:-2], jnp.broadcast_to(params["conv"]["bias"], (4, 4, 5)), atol=1e-5)


def test_perturbations_respect_eps_and_support():
  key = jax.random.PRNGKey(0)
  x = jax.random.normal(key, (2, 16, 16, 4))
  yy, xx = np.mgrid[:16, :16]
  mask = jnp.asarray(np.broadcast_to((yy - 8) ** 2 + (xx - 7) ** 2 <= 16, (2, 16, 16)))
  band, inner = morphology.contour_band(mask, 3), morphology.interior(mask, 3)
  raw = 50.0 * jax.random.normal(jax.random.PRNGKey(2), x.shape)  # saturates tanh
  eps = jnp.asarray([0.1, 0.2, 0.05, 0.3])
  d_c = pert.contour_delta(raw, band, eps)
  lbp = texture.lbp(x)
  d_t = pert.texture_delta(raw, lbp, inner, eps)
  assert np.all(np.abs(d_c) <= eps + 1e-7) and np.all(np.abs(d_t) <= eps * lbp + 1e-7)
  np.testing.assert_array_equal(np.asarray(d_c)[~np.asarray(band)], 0.0)
  np.testing.assert_array_equal(np.asarray(d_t)[~np.asarray(inner)], 0.0)
  total = np.abs(np.asarray(d_c + d_t)).sum(-1)
  assert total[~np.asarray(morphology.dilate(mask, 3))].max() == 0.0 and total.max() > 0
  assert np.isclose(np.abs(np.asarray(d_c)).max(), 0.3, atol=1e-3)  # the budget is reached, not just respected
