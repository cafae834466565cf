"""LBP (standard, >=): 1 on constant images, bounded in [0, 1], the documented bit layout."""
import numpy as np
import pytest

from mri_poison.ops import texture


@pytest.mark.parametrize("ndim,shape", [(2, (2, 9, 7, 3)), (3, (6, 5, 4, 2))])
def test_constant_is_one_and_random_is_bounded(ndim, shape):
  # Flat tissue: every neighbour equals the centre, so every bit is set and UMed's texture budget is full there.
  np.testing.assert_array_equal(np.asarray(texture.lbp(np.full(shape, 3.7, np.float32), ndim)), 1.0)
  x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
  code = np.asarray(texture.lbp(x, ndim))
  assert code.shape == shape and code.min() >= 0.0 and code.max() <= 1.0
  assert 0.2 < code.mean() < 0.8  # random textures: about half the neighbours are brighter


def test_codes():
  x = np.zeros((5, 5, 1), np.float32)
  x[2, 2] = -1.0  # a dark pixel: every neighbour brighter -> all 8 bits
  assert float(texture.lbp(x)[2, 2, 0]) == 1.0
  x = np.zeros((5, 5, 1), np.float32)
  x[2, 2], x[1, 1] = 0.5, 1.0  # only the top-left neighbour (bit 0) of (2, 2) is not darker than it
  assert float(texture.lbp(x)[2, 2, 0]) == pytest.approx(1 / 255)
  x[1, 1] = 0.5  # an equal neighbour counts (s(0) = 1)
  assert float(texture.lbp(x)[2, 2, 0]) == pytest.approx(1 / 255)
  x[2, 2] = 2.0  # a local maximum: no bit
  assert float(texture.lbp(x)[2, 2, 0]) == 0.0
  v = np.zeros((3, 3, 3, 1), np.float32)
  v[1, 1, 1] = -1.0  # 3D: 6 brighter face neighbours
  assert float(texture.lbp(v, 3)[1, 1, 1, 0]) == 1.0


def test_bad_rank():
  with pytest.raises(ValueError, match="lbp"):
    texture.lbp(np.zeros((4, 4)), 2)
