"""ops.warp: identity and translation warps, Jacobians of affine fields, convex up-sampling, folding."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mri_poison.ops import warp

# Compiled once per shape: op-by-op dispatch of the samplers' many small ops is slow on a loaded CPU.
_warp = jax.jit(warp.warp)
_warp_labels = jax.jit(warp.warp_labels)

def _image(shape, seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), shape)


def _labels(shape, seed=1):
  return jax.random.randint(jax.random.PRNGKey(seed), shape, 0, 4).astype(jnp.int32)


@pytest.mark.parametrize("spatial", [(12, 10), (8, 7, 6)])
def test_identity_field_leaves_image_and_label_unchanged(spatial):
  x, y = _image((2, *spatial, 3)), _labels((2, *spatial))
  zero = jnp.zeros((2, *spatial, len(spatial)))
  np.testing.assert_array_equal(np.asarray(_warp(x, zero)), np.asarray(x))
  np.testing.assert_array_equal(np.asarray(_warp_labels(y, zero)), np.asarray(y))


@pytest.mark.parametrize("spatial,shift", [((12, 10), (2, -3)), ((8, 7, 6), (1, 0, -2))])
def test_translation_moves_image_and_label_by_the_shift(spatial, shift):
  x, y = _image((1, *spatial, 2)), _labels((1, *spatial))
  disp = jnp.broadcast_to(jnp.asarray(shift, jnp.float32), (1, *spatial, len(spatial)))
  xw, yw = np.asarray(_warp(x, disp)), np.asarray(_warp_labels(y, disp))
  # out(p) = in(p + t) where p + t is inside the grid, background (0) outside.
  src = tuple(slice(max(t, 0), n + min(t, 0)) for t, n in zip(shift, spatial))
  dst = tuple(slice(max(-t, 0), n - max(t, 0)) for t, n in zip(shift, spatial))
  np.testing.assert_allclose(xw[(0, *dst)], np.asarray(x)[(0, *src)], atol=1e-6)
  np.testing.assert_array_equal(yw[(0, *dst)], np.asarray(y)[(0, *src)])
  outside = np.ones(spatial, bool)
  outside[dst] = False
  assert np.all(xw[0][outside] == 0) and np.all(yw[0][outside] == 0)
  # A half-voxel shift interpolates linearly between neighbours.
  half = jnp.zeros((1, *spatial, len(spatial))).at[..., 0].set(0.5)
  np.testing.assert_allclose(np.asarray(_warp(x, half))[0, :-1], 0.5 * (np.asarray(x)[0, :-1] + np.asarray(x)[0, 1:]),
                             atol=1e-6)


@pytest.mark.parametrize("d", [2, 3])
def test_jacobian_determinant_of_an_affine_field(d):
  spatial = (9, 8, 7)[:d]
  a = np.eye(d) + 0.1 * np.random.default_rng(0).standard_normal((d, d))
  grid = np.asarray(warp.identity_grid(spatial))
  disp = grid @ (a - np.eye(d)).T + np.arange(1, d + 1)  # u(p) = (A - I) p + t: the map p -> A p + t
  det = np.asarray(warp.jacobian_determinant(jnp.asarray(disp[None], jnp.float32)))
  np.testing.assert_allclose(det, np.linalg.det(a), rtol=1e-4)
  assert float(warp.folded_fraction(jnp.asarray(disp[None], jnp.float32))[0]) == 0.0
  # A reflection folds every voxel.
  flip = jnp.asarray(-2.0 * grid[None], jnp.float32).at[..., 1:].set(0.0)
  assert float(warp.folded_fraction(flip)[0]) == 1.0
  assert float(warp.folding_penalty(flip, 0.1)[0]) == pytest.approx(1.1 ** 2, rel=1e-4)


@pytest.mark.parametrize("method", ["linear", "bspline"])
def test_upsampling_is_convex_so_ball_budgets_hold_exactly(method):
  m = warp.interpolation_matrix(24, 4, method)
  assert m.min() >= 0 and np.allclose(m.sum(axis=1), 1.0)
  cp = warp.project_ball(10.0 * jax.random.normal(jax.random.PRNGKey(0), (3, 4, 4, 2)), 2.5)
  assert float(jnp.max(jnp.linalg.norm(cp, axis=-1))) <= 2.5 + 1e-5
  dense = warp.upsample(cp, (24, 20), method)
  assert float(jnp.max(warp.max_displacement(dense))) <= 2.5 + 1e-5
  # Scaling and squaring keeps the largest displacement within the velocity's, and stays fold-free here.
  u = jax.jit(warp.integrate_velocity, static_argnums=1)(dense, 6)
  assert float(jnp.max(warp.max_displacement(u))) <= 2.5 + 1e-5
  assert float(jnp.max(warp.folded_fraction(u))) == 0.0
  assert float(jnp.min(warp.smoothness(u))) > 0


def test_warped_labels_keep_the_label_set():
  y = _labels((2, 16, 16, 16))
  disp = 3.0 * jax.random.normal(jax.random.PRNGKey(3), (2, 16, 16, 16, 3))
  yw = np.asarray(_warp_labels(y, disp))
  assert yw.dtype == np.int32 and set(np.unique(yw)) <= {0, 1, 2, 3}
