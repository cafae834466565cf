"""Tests for preprocessing: mask, z-score, geometry (crop / pad / resample keep world coordinates), 2D slices."""
import numpy as np
import pytest

from mri_poison.data import preprocess
from mri_poison.data.case import Case, DataError

SHAPE = (20, 18, 16)


def _affine():
  # Rotated (90 degrees about z), anisotropic, offset: catches index/axis mix-ups a diagonal affine would hide.
  affine = np.zeros((4, 4))
  affine[0, 1], affine[1, 0], affine[2, 2], affine[3, 3] = -1.2, 0.9, 2.0, 1.0
  affine[:3, 3] = (10.0, -4.0, 7.5)
  return affine


def _case(seed=0, shape=SHAPE, box=((4, 15), (3, 12), (5, 13))):
  """A 2-modality case: a brain box of positive noise (one modality zero on part of it), a tumour blob."""
  rng = np.random.default_rng(seed)
  image = np.zeros(shape + (2,), np.float32)
  brain = tuple(slice(a, b) for a, b in box)
  image[brain + (0,)] = rng.uniform(50, 150, image[brain + (0,)].shape)
  image[brain + (1,)] = rng.uniform(300, 900, image[brain + (1,)].shape)
  image[box[0][0]:box[0][0] + 2, box[1][0]:box[1][1], box[2][0]:box[2][1], 0] = 0  # brain where t1 is dark
  label = np.zeros(shape, np.int32)
  label[7:11, 5:9, 8:11] = 2
  label[8:10, 6:8, 9:10] = 3
  label[8, 6, 9] = 1
  spacing = tuple(float(s) for s in np.sqrt((_affine()[:3, :3] ** 2).sum(0)))
  return Case(image=image, modalities=("t1", "flair"), label=label, affine=_affine(), spacing=spacing,
              case_id=f"syn-{seed}")


def _world(affine, index):
  return (affine @ np.append(np.asarray(index, np.float64), 1.0))[:3]


def _tag(case, index, value=-12345.0):
  """Marks one voxel with a unique value so it can be found again after a geometric step."""
  image = case.image.copy()
  image[tuple(index) + (0,)] = value
  return case.replace(image=image)


def _find(case, value=-12345.0):
  (index,) = np.argwhere(case.image[..., 0] == value)
  return index


def test_brain_mask_is_nonzero_in_any_modality():
  case = _case()
  mask = preprocess.brain_mask(case.image)
  assert mask.dtype == bool and mask.shape == SHAPE
  assert mask.sum() == 11 * 9 * 8  # the whole box, including the slab where only flair is nonzero
  np.testing.assert_array_equal(mask, (case.image[..., 0] != 0) | (case.image[..., 1] != 0))
  assert mask[4, 5, 6] and case.image[4, 5, 6, 0] == 0


def test_zscore_inside_mask():
  case = _case()
  mask = preprocess.brain_mask(case.image)
  out = preprocess.zscore(case.image, mask)
  assert out.dtype == np.float32 and out.shape == case.image.shape
  for c in range(2):
    inside = out[..., c][mask].astype(np.float64)
    assert abs(inside.mean()) < 1e-5 and abs(inside.std() - 1.0) < 1e-5
    assert np.all(out[..., c][~mask] == 0)
    # A monotone map of the input inside the mask.
    np.testing.assert_allclose(inside, (case.image[..., c][mask] - case.image[..., c][mask].mean())
                               / case.image[..., c][mask].std(), rtol=1e-4, atol=1e-5)
  # A constant modality gives 0, not NaN; an empty mask gives all zeros.
  const = np.where(mask[..., None], 5.0, 0.0).astype(np.float32)
  assert np.all(preprocess.zscore(const, mask) == 0)
  assert np.all(preprocess.zscore(case.image, np.zeros(SHAPE, bool)) == 0)


def test_crop_to_brain_box_margin_and_world_coordinates():
  case = _tag(_case(), (9, 7, 10))
  for margin, expected in [(0, (11, 9, 8)), (4, (19, 16, 15)), (6, SHAPE)]:  # clipped at the grid edge
    cropped = preprocess.crop_to_brain(case, margin=margin)
    assert cropped.shape == expected
    index = _find(cropped)
    np.testing.assert_allclose(_world(cropped.affine, index), _world(case.affine, (9, 7, 10)), atol=1e-9)
    assert cropped.label.sum() == case.label.sum()  # the tumour is inside the brain: nothing lost
    assert preprocess.brain_mask(cropped.image).sum() == preprocess.brain_mask(case.image).sum()
  with pytest.raises(DataError, match="syn-0.*empty"):
    preprocess.crop_to_brain(case.replace(image=np.zeros_like(case.image)))


def test_pad_or_crop_centred_and_world_coordinates():
  case = _tag(_case(), (9, 7, 10))
  out = preprocess.pad_or_crop(case, (24, 12, 17))  # pad x by 4, crop y by 6, pad z by 1 (odd)
  assert out.shape == (24, 12, 17) and out.label.shape == (24, 12, 17)
  index = _find(out)
  np.testing.assert_array_equal(index, (9 + 2, 7 - 3, 10 + 0))
  np.testing.assert_allclose(_world(out.affine, index), _world(case.affine, (9, 7, 10)), atol=1e-9)
  np.testing.assert_array_equal(out.image[:2], 0)  # padding is background
  np.testing.assert_array_equal(out.image[-2:], 0)
  np.testing.assert_array_equal(out.label[2:22, :, :16], case.label[:, 3:15, :])
  # Round trip back to the original grid restores the kept voxels and the affine.
  back = preprocess.pad_or_crop(out, SHAPE)
  np.testing.assert_allclose(back.affine, case.affine, atol=1e-12)
  np.testing.assert_array_equal(back.image[:, 3:15], case.image[:, 3:15])


def test_resample_shape_spacing_and_geometry():
  case = _case()
  # Image = world x coordinate of each voxel centre (a linear field), so linear interpolation must reproduce
  # the world x of the new voxel centres exactly if (and only if) the new affine is right.
  index = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), -1).astype(np.float64)
  world_x = (index @ case.affine[:3, :3].T + case.affine[:3, 3])[..., 0]
  case = case.replace(image=np.stack([world_x, world_x], -1).astype(np.float32))
  out = preprocess.resample(case, 1.5)
  old_spacing = np.asarray(case.spacing)  # (0.9, 1.2, 2.0)
  expected_shape = tuple(int(round(n * s / 1.5)) for n, s in zip(SHAPE, old_spacing))
  assert out.shape == expected_shape == (12, 14, 21)
  np.testing.assert_allclose(out.spacing, old_spacing * np.asarray(SHAPE) / expected_shape)
  np.testing.assert_allclose(out.spacing, 1.5, rtol=0.05)  # requested up to voxel-count rounding
  np.testing.assert_allclose(np.sqrt((out.affine[:3, :3] ** 2).sum(0)), out.spacing)
  new_index = np.stack(np.meshgrid(*[np.arange(n) for n in out.shape], indexing="ij"), -1).astype(np.float64)
  new_world_x = (new_index @ out.affine[:3, :3].T + out.affine[:3, 3])[..., 0]
  interior = (slice(1, -1),) * 3  # edge voxels extrapolate (mode="nearest")
  np.testing.assert_allclose(out.image[interior + (0,)], new_world_x[interior], atol=1e-3)
  # Field of view preserved: the outer voxel corners map to the same world points.
  for corner in [(-0.5, -0.5, -0.5), tuple(np.asarray(SHAPE) - 0.5)]:
    new_corner = (np.asarray(corner) + 0.5) * np.asarray(out.shape) / np.asarray(SHAPE) - 0.5
    np.testing.assert_allclose(_world(out.affine, new_corner), _world(case.affine, corner), atol=1e-9)
  # Labels: nearest neighbour, so only values that were there, int32, and roughly the same tumour volume (mm^3).
  assert out.label.dtype == np.int32 and set(np.unique(out.label)) <= set(np.unique(case.label))
  vol = lambda c: (c.label == 2).sum() * np.prod(c.spacing)
  assert abs(vol(out) / vol(case) - 1) < 0.35
  # Already at the spacing: unchanged.
  assert preprocess.resample(case, case.spacing) is case


def test_preprocess_case_pipeline():
  case = _tag(_case(), (9, 7, 10), value=1e4)  # a bright voxel (in the mask): stays the max after z-scoring
  out = preprocess.preprocess_case(case, shape=(16, 16, 16), margin=2)
  assert out.shape == (16, 16, 16) and out.image.dtype == np.float32
  mask = preprocess.brain_mask(out.image)
  assert mask.sum() == 11 * 9 * 8  # whole brain fits in the grid
  inside = out.image[..., 1][mask].astype(np.float64)
  assert abs(inside.mean()) < 1e-5 and abs(inside.std() - 1) < 1e-5
  assert out.label.sum() == case.label.sum()
  index = np.unravel_index(np.argmax(out.image[..., 0]), out.shape)
  np.testing.assert_allclose(_world(out.affine, index), _world(case.affine, (9, 7, 10)), atol=1e-9)
  # With resampling: spacing close to requested, grid as asked.
  resampled = preprocess.preprocess_case(case, shape=(12, 12, 12), spacing=(1.5, 1.5, 1.5))
  assert resampled.shape == (12, 12, 12)
  np.testing.assert_allclose(resampled.spacing, 1.5, rtol=0.1)
  with pytest.raises(DataError, match="syn-0.*all zero"):
    preprocess.preprocess_case(case.replace(image=np.zeros_like(case.image)))


def test_extract_slices_fraction_shapes_and_determinism():
  case = _case(shape=(12, 10, 40))
  case.label[:] = 0
  case.label[3:6, 3:6, 5:15] = 2  # 10 tumour slices along z, 30 without
  images, labels = preprocess.extract_slices(case, tumour_fraction=0.5, n=8, seed=3)
  assert images.shape == (8, 12, 10, 2) and labels.shape == (8, 12, 10)
  assert images.dtype == np.float32 and labels.dtype == np.int32
  assert (labels.reshape(8, -1).max(1) > 0).sum() == 4
  again = preprocess.extract_slices(case, tumour_fraction=0.5, n=8, seed=3)
  np.testing.assert_array_equal(again[0], images)
  idx = {s: tuple(preprocess.slice_indices(case.label, tumour_fraction=0.5, n=8, seed=s)) for s in range(6)}
  assert len(set(idx.values())) > 1  # the seed matters
  z = idx[3]
  np.testing.assert_array_equal(images, np.moveaxis(case.image[:, :, list(z)], 2, 0))
  # n=None: every tumour slice, plus tumour-free ones to reach the fraction.
  _, labels = preprocess.extract_slices(case, tumour_fraction=0.25)
  has = labels.reshape(len(labels), -1).max(1) > 0
  assert has.sum() == 10 and len(labels) == 40
  _, labels = preprocess.extract_slices(case, tumour_fraction=0.75)
  assert (labels.reshape(len(labels), -1).max(1) > 0).sum() == 10 and len(labels) == 13  # round(10 / 3) free
  _, labels = preprocess.extract_slices(case, tumour_fraction=1.0)
  assert len(labels) == 10 and labels.reshape(10, -1).max(1).min() > 0
  # Another axis: slices are (Y, Z) planes.
  images, labels = preprocess.extract_slices(case, axis=0, tumour_fraction=0.5, n=4)
  assert images.shape == (4, 10, 40, 2) and (labels.reshape(4, -1).max(1) > 0).sum() == 2
  with pytest.raises(ValueError, match="10 tumour"):
    preprocess.extract_slices(case, tumour_fraction=1.0, n=11)
  with pytest.raises(DataError, match="needs a label"):
    preprocess.extract_slices(case.replace(label=None))
