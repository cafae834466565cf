"""Tests for the v1 procedural phantom (kept unchanged so that results made with it reproduce)."""
import time

import numpy as np
import pytest
from scipy import ndimage

from mri_poison.data import phantom_v1 as phantom
from mri_poison.data.case import Case, brats_regions

SHAPE = (32, 32, 32)
ALL = ("t1", "t1ce", "t2", "flair", "ct")
SEEDS = (0, 1, 2, 3)


@pytest.fixture(scope="module")
def cases():
  return {s: phantom.make_case_and_tissue(s, SHAPE, modalities=ALL) for s in SEEDS}


def _mean(case, mod, mask):
  return float(case.image[..., case.modalities.index(mod)][mask].mean())


def test_case_contract(cases):
  for case, tissue in cases.values():
    assert isinstance(case, Case)
    assert case.image.shape == SHAPE + (5,) and case.image.dtype == np.float32
    assert case.label.shape == SHAPE and case.label.dtype == np.int32
    assert case.modalities == ALL
    assert np.isfinite(case.image).all()
    np.testing.assert_allclose(np.diag(case.affine)[:3], case.spacing)
    np.testing.assert_allclose(case.spacing, [200.0 / 32] * 3)
    # Grid centre at world 0.
    centre = case.affine @ np.array([15.5, 15.5, 15.5, 1.0])
    np.testing.assert_allclose(centre[:3], 0.0, atol=1e-9)
    # Scanner-like positive range for MR, background exactly 0, strictly positive inside the head.
    mr = case.image[..., :4]
    assert 300 < mr.max() < 2000
    head = tissue != phantom.BG
    assert (case.image[~head] == 0).all()
    assert (case.image[head] >= 1.0).all()
    assert 0.2 < head.mean() < 0.8


def test_determinism_and_seed_variation(cases):
  case0, _ = cases[0]
  again = phantom.make_case(0, SHAPE, modalities=ALL)
  np.testing.assert_array_equal(again.image, case0.image)
  np.testing.assert_array_equal(again.label, case0.label)
  # A channel does not depend on which other channels were asked for.
  only_t1ce = phantom.make_case(0, SHAPE, modalities=("t1ce",))
  np.testing.assert_array_equal(only_t1ce.image[..., 0], case0.image[..., 1])
  np.testing.assert_array_equal(only_t1ce.label, case0.label)
  # Different seeds: different tumours (position / size), not just different noise.
  centres = []
  for s in SEEDS:
    label = cases[s][0].label
    centres.append(np.argwhere(label > 0).mean(0))
    for t in SEEDS:
      if t < s:
        other = cases[t][0].label
        wt_a, wt_b = label > 0, other > 0
        assert (wt_a & wt_b).sum() / (wt_a | wt_b).sum() < 0.8  # Jaccard of whole tumours
  assert np.ptp(np.array(centres), axis=0).max() > 2.0


def test_labels_present_nested_and_inside_brain(cases):
  for seed in range(12):
    case, tissue = cases[seed] if seed in cases else phantom.make_case_and_tissue(seed, SHAPE, modalities=("t1",))
    label = case.label
    assert set(np.unique(label).tolist()) == {0, 1, 2, 3}, seed
    regions = brats_regions(label)
    wt, tc, et = regions[..., 0], regions[..., 1], regions[..., 2]
    assert (et <= tc).all() and (tc <= wt).all()
    # Necrosis is enclosed by enhancing tumour; the tumour core is wrapped in oedema (6-neighbourhood).
    necrosis = label == 1
    assert not (ndimage.binary_dilation(necrosis) & ~tc).any(), seed
    assert not (ndimage.binary_dilation(tc) & ~wt).any(), seed
    # Never in the scalp or skull; the tumour core is not touching the outside of the head.
    assert not np.isin(tissue[wt], (phantom.BG, phantom.SCALP, phantom.SKULL)).any()
    assert wt.mean() < 0.15


def test_mr_contrasts_order_as_in_real_scans(cases):
  for case, tissue in cases.values():
    et, necrosis, oedema = case.label == 3, case.label == 1, case.label == 2
    wm, gm, csf = tissue == phantom.WM, tissue == phantom.GM, tissue == phantom.CSF
    assert _mean(case, "t1ce", et) > 1.5 * _mean(case, "t1", et)  # enhancement only after contrast
    assert _mean(case, "t1ce", et) > _mean(case, "t1ce", wm)
    assert _mean(case, "t1ce", necrosis) < _mean(case, "t1ce", et)  # necrosis dark on T1-Ce
    assert _mean(case, "flair", oedema) > 1.3 * _mean(case, "flair", wm)
    assert _mean(case, "t2", oedema) > 1.3 * _mean(case, "t2", wm)
    assert _mean(case, "flair", csf) < _mean(case, "flair", wm)  # fluid suppressed
    assert _mean(case, "t2", csf) > _mean(case, "t2", wm)
    assert _mean(case, "t1", csf) < _mean(case, "t1", gm)
    assert _mean(case, "t1", wm) > _mean(case, "t1", gm)
    assert _mean(case, "t2", gm) > _mean(case, "t2", wm)


def test_ct_bone_bright_tumour_nearly_invisible(cases):
  for case, tissue in cases.values():
    wm, et = tissue == phantom.WM, case.label == 3
    bone = tissue == phantom.SKULL
    rel = lambda mod: abs(_mean(case, mod, et) - _mean(case, mod, wm)) / _mean(case, mod, wm)
    assert rel("ct") < 0.05 and rel("t1ce") > 0.15
    assert rel("ct") < 0.2 * rel("t1ce")
    assert _mean(case, "ct", bone) > 1.5 * _mean(case, "ct", wm)


def test_bias_field_and_rician_noise(cases):
  case, tissue = cases[0]
  t1 = case.image[..., 0]
  wm = tissue == phantom.WM
  # Noise: neighbouring WM voxels differ (sd of differences well above 0, below the tissue contrast).
  interior = ndimage.binary_erosion(wm, iterations=1)
  diff = (t1[1:] - t1[:-1])[interior[1:] & interior[:-1]]
  assert 5 < diff.std() < 100
  # Bias: WM intensity differs between octants of the head by several percent (noise averages out there).
  coords = np.argwhere(interior)
  octant = ((coords >= 16) * np.array([4, 2, 1])).sum(1)
  values = t1[tuple(coords.T)]
  means = np.array([values[octant == k].mean() for k in range(8) if (octant == k).sum() > 50])
  assert means.std() / means.mean() > 0.02


def test_spacing_override_and_bad_arguments():
  case = phantom.make_case(5, (16, 20, 24), modalities=("flair",), spacing=(1.0, 1.5, 2.0))
  assert case.shape == (16, 20, 24) and case.spacing == (1.0, 1.5, 2.0)
  np.testing.assert_allclose(np.diag(case.affine), [1.0, 1.5, 2.0, 1.0])
  with pytest.raises(ValueError, match="unknown phantom modalities"):
    phantom.make_case(0, (16, 16, 16), modalities=("t1", "pet"))
  with pytest.raises(ValueError, match="anatomy"):
    phantom.make_case(0, (16, 16, 16), anatomy="atlas")


def test_mni152_anatomy():
  pytest.importorskip("nilearn")
  case, tissue = phantom.make_case_and_tissue(0, SHAPE, anatomy="mni152")
  assert set(np.unique(case.label).tolist()) == {0, 1, 2, 3}
  assert (tissue == phantom.WM).sum() > 0.02 * tissue.size
  # MNI coordinates: the origin (anterior commissure) lies inside the grid.
  ijk = np.linalg.solve(case.affine, [0.0, 0.0, 0.0, 1.0])[:3]
  assert ((ijk > 0) & (ijk < np.array(SHAPE) - 1)).all()


def test_mni152_without_nilearn_says_how_to_install():
  try:
    import nilearn  # pylint: disable=unused-import
    pytest.skip("nilearn installed")
  except ImportError:
    pass
  with pytest.raises(ImportError, match="pip install nilearn"):
    phantom.make_case(0, (16, 16, 16), anatomy="mni152")


def test_speed_is_reasonable():
  phantom.make_case(0, SHAPE)
  start = time.perf_counter()
  for s in range(3):
    phantom.make_case(s, SHAPE)
  per_case = (time.perf_counter() - start) / 3
  # Loose: the real budget (< 0.5 s per 64^3 on one core) is checked by the benchmark, not here.
  assert per_case < 1.0, per_case
