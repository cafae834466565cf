"""Tests for the versioned phantom front and the BraTS-format writer (writer -> loader round trip)."""
import os

import nibabel as nib
import numpy as np
import pytest

from mri_poison.data import phantom, phantom_v1, phantom_v2
from mri_poison.data.case import MODALITIES
from mri_poison.data.loaders import load_brats_case


def test_versions_dispatch_and_default():
  assert phantom.DEFAULT_VERSION == "v2"
  np.testing.assert_array_equal(phantom.make_case(3, (16, 16, 16)).image,
                                phantom_v2.make_case(3, (16, 16, 16)).image)
  np.testing.assert_array_equal(phantom.make_case(3, (16, 16, 16), version="v1").image,
                                phantom_v1.make_case(3, (16, 16, 16)).image)
  opts = {"tumour_contrast": 0.3}
  np.testing.assert_array_equal(phantom.make_case(3, (16, 16, 16), options=opts).image,
                                phantom_v2.make_case(3, (16, 16, 16), options=opts).image)
  with pytest.raises(ValueError, match="data.phantom_version"):
    phantom.make_case(0, (16, 16, 16), version="v3")


@pytest.mark.parametrize("naming,names,et_value", [
    ("2021", ("BraTS2021_00001", "_t1", "_t1ce", "_t2", "_flair", "_seg"), 4),
    ("2023", ("BraTS-GLI-00001-000", "-t1n", "-t1c", "-t2w", "-t2f", "-seg"), 3),
])
def test_write_brats_dir_round_trip(tmp_path, naming, names, et_value):
  dirs = phantom.write_brats_dir(tmp_path, 2, naming=naming, shape=(24, 24, 24), seed=0)  # case 1: an enhancing tumour
  cid = names[0]
  assert [os.path.basename(d) for d in dirs][1] == cid
  expected = sorted(f"{cid}{suffix}.nii.gz" for suffix in names[1:])
  assert sorted(os.listdir(dirs[1])) == expected  # no temporary files left behind
  ref = phantom.make_case(0 + 1, (24, 24, 24))
  seg = np.asarray(nib.load(os.path.join(dirs[1], f"{cid}{names[-1]}.nii.gz")).dataobj)
  assert seg.dtype == np.uint8 and et_value in np.unique(seg)
  # The loader users run on real BraTS folders reads back the case: labels exact, intensities to the rounding.
  loaded = load_brats_case(dirs[1])
  assert loaded.modalities == MODALITIES and loaded.image.shape == ref.image.shape
  np.testing.assert_array_equal(loaded.label, ref.label)
  np.testing.assert_allclose(loaded.affine, ref.affine, atol=1e-5)
  assert np.abs(loaded.image - ref.image).max() <= 0.5 + 1e-3
  assert ((loaded.image > 0) == (ref.image > 0)).all()  # rounding never zeroes a brain voxel
  rows = phantom.summarize(dirs)
  assert rows[1]["case_id"] == cid and rows[1]["shape"] == (24, 24, 24)
  assert rows[1]["voxels"] == {k: int((ref.label == k).sum()) for k in (1, 2, 3)}
  text = phantom.format_summary(rows, str(tmp_path), seconds=1.0)
  assert cid in text and "total: 2 cases, 10 files" in text


def test_write_v1_and_ct(tmp_path):
  (v1_dir,) = phantom.write_brats_dir(tmp_path / "v1", 1, shape=(16, 16, 16), version="v1")
  np.testing.assert_array_equal(load_brats_case(v1_dir).label, phantom_v1.make_case(0, (16, 16, 16)).label)
  (case_dir,) = phantom.write_brats_dir(tmp_path / "ct", 1, naming="2023", shape=(16, 16, 16),
                                        modalities=("t1ce", "ct"))
  assert sorted(os.listdir(case_dir)) == ["BraTS-GLI-00000-000-ct.nii.gz", "BraTS-GLI-00000-000-seg.nii.gz",
                                          "BraTS-GLI-00000-000-t1c.nii.gz"]
  with pytest.raises(ValueError, match="naming"):
    phantom.write_brats_dir(tmp_path / "never", 1, naming="2019")
  assert not (tmp_path / "never").exists()
