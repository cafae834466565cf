"""Contour band and interior: they partition the mask (with the band's outer half outside it), 2D and 3D."""
import jax.numpy as jnp
import numpy as np
import pytest

from mri_poison.ops import morphology


def _blob(shape, seed):
  rng = np.random.default_rng(seed)
  grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(float)
  centre = np.asarray(shape) / 2 + rng.uniform(-2, 2, len(shape))
  radius = np.asarray(shape) / 3 * rng.uniform(0.8, 1.2, len(shape))
  return (np.sum(((grid - centre) / radius) ** 2, -1) <= 1) | (rng.random(shape) < 0.02)


@pytest.mark.parametrize("shape,ndim", [((20, 18), 2), ((16, 18, 16), 3), ((3, 16, 16), 2)])
@pytest.mark.parametrize("width", [3, 5])
def test_band_and_interior_partition_the_mask(shape, ndim, width):
  spatial = shape[len(shape) - ndim:]
  mask = np.stack([_blob(spatial, seed=width + i) for i in range(int(np.prod(shape[:len(shape) - ndim])))])
  mask = mask.reshape(shape)
  band = np.asarray(morphology.contour_band(mask, width, ndim))
  inner = np.asarray(morphology.interior(mask, width, ndim))
  grown = np.asarray(morphology.dilate(mask, width, ndim))
  assert not np.any(band & inner)
  np.testing.assert_array_equal(inner | (band & mask), mask)  # I and C & M partition M
  np.testing.assert_array_equal(inner | band, grown)  # the protection's support is dilate(M)
  np.testing.assert_array_equal(inner, np.asarray(morphology.erode(mask, width, ndim)))
  assert band.any() and inner.any()


def test_square_band_counts():
  mask = np.zeros((9, 9), bool)
  mask[2:7, 2:7] = True  # 5x5
  band = np.asarray(morphology.contour_band(mask, 3))
  assert band.sum() == 7 * 7 - 3 * 3  # one voxel each side of the boundary
  assert np.asarray(morphology.interior(mask, 3)).sum() == 9
  assert np.asarray(morphology.contour_band(mask, 1)).sum() == 0  # a 1-voxel box changes nothing


def test_batched_equals_per_example_and_border_not_eroded():
  masks = np.stack([_blob((16, 16), s) for s in range(3)])
  batched = np.asarray(morphology.contour_band(jnp.asarray(masks), 3, 2))
  for m, b in zip(masks, batched):
    np.testing.assert_array_equal(np.asarray(morphology.contour_band(m, 3, 2)), b)
  full = np.ones((6, 6), bool)
  assert np.asarray(morphology.erode(full, 3)).all()  # outside the grid counts as mask for erosion


def test_bad_width():
  with pytest.raises(ValueError, match="width"):
    morphology.dilate(np.ones((4, 4), bool), 0)
