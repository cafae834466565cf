"""Tests for the BraTS / MSD NIfTI loaders: round trips, label remaps, discovery, and every kind of bad input."""
import gzip
import logging
import os

import nibabel as nib
import numpy as np
import pytest

from mri_poison.data import loaders
from mri_poison.data.case import MODALITIES, DataError

SHAPE = (16, 14, 12)
SPACING = (1.0, 1.2, 1.5)
SUFFIX = {"2021": ("_", {"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair", "seg": "seg"}),
          "2023": ("-", {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f", "seg": "seg"})}


def _affine(spacing=SPACING, origin=(-7.0, 5.0, 3.0)):
  # An oblique-free but non-trivial affine: flipped x axis (LPS-like) and an offset origin.
  affine = np.diag([-spacing[0], spacing[1], spacing[2], 1.0])
  affine[:3, 3] = origin
  return affine


def _synthetic(seed, shape=SHAPE):
  """Four int16 modalities (distinct per channel, 0 outside an ellipsoid head) and a contract label map."""
  rng = np.random.default_rng(seed)
  grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"), -1)
  head = (grid ** 2).sum(-1) < 0.8
  image = np.stack([np.where(head, rng.integers(1, 1000, shape) + 1000 * c, 0) for c in range(4)], -1)
  label = np.zeros(shape, np.int32)
  label[((grid - [0.3, 0.0, 0.0]) ** 2).sum(-1) < 0.15] = 2  # oedema
  label[((grid - [0.3, 0.0, 0.0]) ** 2).sum(-1) < 0.08] = 3  # enhancing rim
  label[((grid - [0.3, 0.0, 0.0]) ** 2).sum(-1) < 0.03] = 1  # necrotic core
  return image.astype(np.int16), label


def _save(path, data, affine=None, zooms=None):
  """Writes a NIfTI file; header voxel sizes from the affine unless `zooms` says otherwise (a broken header)."""
  img = nib.Nifti1Image(np.asarray(data), _affine() if affine is None else affine)
  zooms = np.sqrt((img.affine[:3, :3] ** 2).sum(0)) if zooms is None else zooms
  img.header.set_zooms(tuple(float(z) for z in zooms) + tuple(1.0 for _ in range(np.ndim(data) - 3)))
  nib.save(img, str(path))
  return str(path)


def _write_case(root, naming="2021", ext=".nii.gz", case_id=None, seed=0, seg=True, modalities=MODALITIES):
  """A BraTS case folder; returns (folder, image, contract label)."""
  image, label = _synthetic(seed)
  case_id = case_id or ("BraTS2021_00007" if naming == "2021" else "BraTS-GLI-00007-000")
  sep, table = SUFFIX[naming]
  folder = os.path.join(str(root), case_id)
  os.makedirs(folder, exist_ok=True)
  for c, m in enumerate(MODALITIES):
    if m in modalities:
      _save(os.path.join(folder, f"{case_id}{sep}{table[m]}{ext}"), image[..., c])
  if seg:
    stored = np.where(label == 3, 4, label) if naming == "2021" else label
    _save(os.path.join(folder, f"{case_id}{sep}seg{ext}"), stored.astype(np.uint8))
  return folder, image, label


def _file(folder, key, naming="2021", ext=".nii.gz"):
  sep, table = SUFFIX[naming]
  cid = os.path.basename(folder)
  return os.path.join(folder, f"{cid}{sep}{table[key]}{ext}")


def _write_msd(root, n=2, labels=True):
  """An MSD Task01 root; returns [(image path, image in MSD channel order (F, T1, T1gd, T2), contract label)]."""
  os.makedirs(os.path.join(str(root), "imagesTr"), exist_ok=True)
  os.makedirs(os.path.join(str(root), "labelsTr"), exist_ok=True)
  out = []
  for i in range(n):
    image, label = _synthetic(10 + i)
    msd_image = image[..., [3, 0, 1, 2]].astype(np.float32)  # (flair, t1, t1ce, t2)
    msd_label = np.select([label == 2, label == 1, label == 3], [1, 2, 3], 0).astype(np.uint8)
    name = f"BRATS_{i + 1:03d}.nii.gz"
    path = _save(os.path.join(str(root), "imagesTr", name), msd_image)
    if labels:
      _save(os.path.join(str(root), "labelsTr", name), msd_label)
    out.append((path, image, label))
  return out


# ---------------------------------------------------------------------------------------------------------------
# Round trips.


@pytest.mark.parametrize("naming", ["2021", "2023"])
@pytest.mark.parametrize("ext", [".nii.gz", ".nii"])
def test_brats_round_trip(tmp_path, naming, ext):
  folder, image, label = _write_case(tmp_path, naming, ext)
  case = loaders.load_brats_case(folder)
  assert case.case_id == os.path.basename(folder)
  assert case.modalities == MODALITIES
  assert case.image.dtype == np.float32 and case.image.shape == SHAPE + (4,)
  np.testing.assert_array_equal(case.image, image.astype(np.float32))
  assert case.label.dtype == np.int32
  np.testing.assert_array_equal(case.label, label)  # 2021's ET=4 arrives as 3
  assert set(np.unique(case.label)) == {0, 1, 2, 3}
  np.testing.assert_allclose(case.affine, _affine())
  np.testing.assert_allclose(case.spacing, SPACING, rtol=1e-6)


def test_modality_subset_order_and_missing_seg(tmp_path):
  folder, image, _ = _write_case(tmp_path, "2023", seg=False)
  case = loaders.load_brats_case(folder, modalities=("flair", "t1"))
  assert case.modalities == ("flair", "t1")
  np.testing.assert_array_equal(case.image, image[..., [3, 0]].astype(np.float32))
  assert case.label is None


def test_extra_modality_uses_its_own_suffix(tmp_path):
  folder, image, _ = _write_case(tmp_path, "2021")
  ct = image[..., 0] // 2
  _save(os.path.join(folder, os.path.basename(folder) + "_ct.nii.gz"), ct)
  case = loaders.load_brats_case(folder, modalities=("ct", "t1ce"))
  np.testing.assert_array_equal(case.image[..., 0], ct.astype(np.float32))
  np.testing.assert_array_equal(case.image[..., 1], image[..., 1].astype(np.float32))


def test_msd_4d_reorder_and_label_remap(tmp_path):
  (path, image, label), _ = _write_msd(tmp_path)
  case = loaders.load_msd_case(path, os.path.join(str(tmp_path), "labelsTr", os.path.basename(path)))
  assert case.case_id == "BRATS_001" and case.modalities == MODALITIES
  np.testing.assert_array_equal(case.image, image.astype(np.float32))  # (F,T1,T1gd,T2) -> (t1,t1ce,t2,flair)
  np.testing.assert_array_equal(case.label, label)  # 1 oedema -> 2, 2 non-enhancing -> 1, 3 stays
  np.testing.assert_allclose(case.affine, _affine())
  np.testing.assert_allclose(case.spacing, SPACING, rtol=1e-6)
  assert loaders.load_msd_case(path).label is None
  t2_only = loaders.load_msd_case(path, modalities=("t2",))
  np.testing.assert_array_equal(t2_only.image[..., 0], image[..., 2].astype(np.float32))


def test_list_cases_and_load_case_msd(tmp_path):
  written = _write_msd(tmp_path / "Task01_BrainTumour", n=3)
  # macOS resource-fork files ship inside the MSD tarball; they are not cases.
  (tmp_path / "Task01_BrainTumour" / "imagesTr" / "._BRATS_001.nii.gz").write_bytes(b"\0" * 10)
  refs = loaders.list_cases(tmp_path)
  assert refs == sorted(p for p, _, _ in written)
  case = loaders.load_case(refs[1])  # finds labelsTr/ by itself
  np.testing.assert_array_equal(case.label, written[1][2])
  np.testing.assert_array_equal(case.image, written[1][1].astype(np.float32))


def test_list_cases_brats_nested_sorted_and_dispatch(tmp_path):
  data = tmp_path / "MICCAI_BraTS2020_TrainingData"
  ids = ["BraTS2021_00011", "BraTS2021_00002", "BraTS2021_00005"]
  for i, cid in enumerate(ids):
    _write_case(data, "2021", case_id=cid, seed=i)
  (data / "notes").mkdir()  # a folder without NIfTI files is not a case
  (data / "name_mapping.csv").write_text("a,b\n")
  refs = loaders.list_cases(tmp_path)
  assert [os.path.basename(r) for r in refs] == sorted(ids)
  case = loaders.load_case(refs[0], ("t2",))
  assert case.case_id == "BraTS2021_00002" and case.image.shape == SHAPE + (1,)
  # The root may itself be a case folder.
  assert loaders.list_cases(refs[0]) == [refs[0]]


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one DataError each, naming the offending file and what was expected.


def _raises(match, fn, *args, **kw):
  with pytest.raises(DataError, match=match) as info:
    fn(*args, **kw)
  return str(info.value)


def test_missing_modality(tmp_path):
  folder, _, _ = _write_case(tmp_path, "2023", modalities=("t1", "t1ce", "flair"))
  msg = _raises("missing modality 't2'", loaders.load_brats_case, folder)
  assert "BraTS-GLI-00007-000-t2w.nii.gz" in msg and folder in msg


def test_different_shapes(tmp_path):
  folder, image, _ = _write_case(tmp_path, "2021")
  _save(_file(folder, "t2"), image[:-1, ..., 2])
  msg = _raises("differs from", loaders.load_brats_case, folder)
  assert _file(folder, "t2") in msg and "(15, 14, 12)" in msg and "(16, 14, 12)" in msg


def test_affine_mismatch_beyond_tolerance(tmp_path):
  folder, image, label = _write_case(tmp_path, "2021")
  # Float rounding in the header is fine...
  _save(_file(folder, "flair"), image[..., 3], affine=_affine() + 1e-5)
  loaders.load_brats_case(folder)
  # ...a 2 mm shift of the segmentation is not.
  _save(_file(folder, "seg"), np.where(label == 3, 4, label).astype(np.uint8), affine=_affine(origin=(-5, 5, 3)))
  msg = _raises("affine differs", loaders.load_brats_case, folder)
  assert _file(folder, "seg") in msg and "tolerance" in msg


@pytest.mark.parametrize("naming,bad", [("2021", 3), ("2023", 4), ("2021", -1)])
def test_label_values_outside_convention(tmp_path, naming, bad):
  folder, _, label = _write_case(tmp_path, naming)
  stored = (np.where(label == 3, 4, label) if naming == "2021" else label).astype(np.int16)
  stored[0, 0, 0] = bad
  _save(_file(folder, "seg", naming), stored)
  msg = _raises(rf"label values \[{bad}\]", loaders.load_brats_case, folder)
  assert _file(folder, "seg", naming) in msg
  assert ("[0, 1, 2, 4]" if naming == "2021" else "[0, 1, 2, 3]") in msg


def test_msd_label_values_outside_convention(tmp_path):
  (path, _, label), = _write_msd(tmp_path, n=1)
  label_path = loaders.msd_label_path(path)
  _save(label_path, np.full(SHAPE, 4, np.uint8))
  msg = _raises(r"label values \[4\].*MSD", loaders.load_case, path)
  assert label_path in msg


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_voxels(tmp_path, value):
  folder, image, _ = _write_case(tmp_path, "2021")
  t1ce = image[..., 1].astype(np.float32)
  t1ce[3, 4, 5] = value
  _save(_file(folder, "t1ce"), t1ce)
  msg = _raises("1 NaN/inf voxels", loaders.load_brats_case, folder)
  assert _file(folder, "t1ce") in msg


def test_truncated_and_corrupt_files(tmp_path):
  folder, _, _ = _write_case(tmp_path, "2021")
  path = _file(folder, "t2")
  raw = open(path, "rb").read()
  with open(path, "wb") as f:
    f.write(raw[: len(raw) // 2])  # truncated download
  msg = _raises("cannot read as NIfTI", loaders.load_brats_case, folder)
  assert path in msg
  with gzip.open(path, "wb") as f:
    f.write(b"this is not a NIfTI header" * 20)  # valid gzip, garbage inside
  assert path in _raises("cannot read as NIfTI", loaders.load_brats_case, folder)
  with open(path, "wb") as f:
    f.write(os.urandom(500))  # not even gzip
  assert path in _raises("cannot read as NIfTI", loaders.load_brats_case, folder)


def test_4d_where_3d_expected(tmp_path):
  folder, image, _ = _write_case(tmp_path, "2021")
  _save(_file(folder, "flair"), np.stack([image[..., 3]] * 2, -1))
  msg = _raises(r"expected a 3D volume .* 4D array of shape \(16, 14, 12, 2\)", loaders.load_brats_case, folder)
  assert _file(folder, "flair") in msg
  # A trailing singleton axis is still one volume.
  _save(_file(folder, "flair"), image[..., 3:4])
  assert loaders.load_brats_case(folder).shape == SHAPE
  # And the converse for MSD: a 3D file where the 4D multi-modal image was expected.
  image_path = _save(tmp_path / "imagesTr_BRATS_009.nii.gz", image[..., 0])
  assert image_path in _raises("expected a 4D image", loaders.load_msd_case, image_path)


@pytest.mark.parametrize("kind", ["missing", "empty", "file", "no_cases"])
def test_bad_dataset_root(tmp_path, kind):
  root = tmp_path / "root"
  if kind == "empty":
    root.mkdir()
  elif kind == "file":
    root.write_text("x")
  elif kind == "no_cases":
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "readme.txt").write_text("x")
  expected = {"missing": "does not exist", "file": "not a directory"}.get(kind, "no cases found")
  msg = _raises(expected, loaders.list_cases, root)
  assert str(root) in msg


def test_bad_case_refs(tmp_path):
  assert "does not exist" in _raises(str(tmp_path / "nope"), loaders.load_case, tmp_path / "nope")
  (tmp_path / "empty_case").mkdir()
  _raises("no BraTS files found", loaders.load_brats_case, tmp_path / "empty_case")


@pytest.mark.parametrize("naming", ["2021", "2023"])
@pytest.mark.parametrize("keep_own", [False, True])
def test_file_named_for_another_case(tmp_path, naming, keep_own):
  folder, image, _ = _write_case(tmp_path, naming)
  other = "BraTS2021_00008" if naming == "2021" else "BraTS-GLI-00008-000"
  sep, table = SUFFIX[naming]
  stray = _save(os.path.join(folder, f"{other}{sep}{table['t2']}.nii.gz"), image[..., 2])
  if not keep_own:  # the case's own T2 is missing and another case's T2 sits in its place
    os.remove(_file(folder, "t2", naming))
  msg = _raises(f"named for case '{other}' but it lies in the folder of case '{os.path.basename(folder)}'",
                loaders.load_brats_case, folder)
  assert stray in msg and os.path.basename(_file(folder, "t2", naming)) in msg
  # The same file in its own case's folder loads.
  os.makedirs(tmp_path / other)
  os.rename(stray, tmp_path / other / os.path.basename(stray))
  for m in ("t1", "t1ce", "flair"):
    os.symlink(_file(folder, m, naming), _file(str(tmp_path / other), m, naming))
  np.testing.assert_array_equal(loaders.load_brats_case(tmp_path / other).image[..., 2], image[..., 2])


def test_spacing_comes_from_the_affine_and_must_match_the_header(tmp_path):
  # An oblique affine: the spacing is the norms of its columns, whatever the rotation.
  folder, _, _ = _write_case(tmp_path, "2021", seg=False)
  angle = 0.3
  rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
  oblique = np.eye(4)
  oblique[:3, :3] = rotation @ np.diag([0.9, 1.1, 2.5])
  for m in MODALITIES:
    _save(_file(folder, m), nib.load(_file(folder, m)).get_fdata().astype(np.int16), affine=oblique)
  np.testing.assert_allclose(loaders.load_brats_case(folder).spacing, (0.9, 1.1, 2.5), rtol=1e-6)
  # A 1 mm header on a 6.25 mm affine would silently scale every distance (HD95) by 6.25.
  folder, image, _ = _write_case(tmp_path / "b", "2021", seg=False)
  coarse = _affine(spacing=(6.25, 6.25, 6.25))
  for m, c in zip(MODALITIES, range(4)):
    _save(_file(folder, m), image[..., c], affine=coarse, zooms=(1.0, 1.0, 1.0) if m == "t1ce" else None)
  msg = _raises(r"header voxel sizes \(1, 1, 1\) mm disagree with the affine's \(6.25, 6.25, 6.25\) mm",
                loaders.load_brats_case, folder, ("t1", "t1ce"))
  assert _file(folder, "t1ce") in msg and "relative tolerance 0.001" in msg
  # Float32 rounding of the header is within tolerance.
  _save(_file(folder, "t1ce"), image[..., 1], affine=coarse, zooms=(6.25 * (1 + 1e-6),) * 3)
  assert loaders.load_brats_case(folder, ("t1", "t1ce")).spacing == (6.25, 6.25, 6.25)


@pytest.mark.parametrize("key", ["flair", "seg"])
def test_spacing_differs_between_files_of_a_case(tmp_path, key):
  folder, image, label = _write_case(tmp_path, "2021")
  data = np.where(label == 3, 4, label).astype(np.uint8) if key == "seg" else image[..., 3]
  _save(_file(folder, key), data, affine=_affine(spacing=(1.0, 1.2 * 1.01, 1.5)))  # header consistent
  # Checked even where the affine tolerance is relaxed: the spacings themselves differ by 1%.
  msg = _raises(r"voxel spacing \(1, 1.212, 1.5\) mm differs from that of .* \(1, 1.2, 1.5\) mm",
                loaders.load_brats_case, folder, affine_tol=1.0)
  assert _file(folder, key) in msg and _file(folder, "t1") in msg


def test_all_zero_modality(tmp_path, caplog):
  folder, image, _ = _write_case(tmp_path, "2023")
  _save(_file(folder, "t2", "2023"), np.zeros_like(image[..., 2]))
  msg = _raises("every voxel is 0", loaders.load_case, folder)
  assert _file(folder, "t2", "2023") in msg and "allow_empty_modality=True" in msg
  with caplog.at_level(logging.WARNING):
    case = loaders.load_case(folder, allow_empty_modality=True)
  assert "every voxel is 0" in caplog.text
  assert not case.image[..., 2].any() and case.image[..., 3].any()
  # MSD: one channel of the 4D image.
  (path, image, _), = _write_msd(tmp_path / "msd", n=1)
  msd = image[..., [3, 0, 1, 2]].astype(np.float32)
  msd[..., 1] = 0  # T1w
  _save(path, msd)
  assert path in _raises("channel 't1': every voxel is 0", loaders.load_case, path)
  assert loaders.load_case(path, ("flair", "t2")).image.any(axis=(0, 1, 2)).all()  # T1 not asked for


def test_dangling_symlink_and_symlink_loop(tmp_path):
  folder, _, _ = _write_case(tmp_path, "2021")
  t1 = _file(folder, "t1")
  os.remove(t1)
  os.symlink(tmp_path / "elsewhere" / "t1.nii.gz", t1)
  msg = _raises("dangling symlink", loaders.load_brats_case, folder)
  assert t1 in msg and str(tmp_path / "elsewhere" / "t1.nii.gz") in msg and "does not exist" in msg
  os.remove(t1)
  os.symlink(tmp_path / "loop_b", t1)
  os.symlink(t1, tmp_path / "loop_b")
  msg = _raises("symlink loop", loaders.load_brats_case, folder)
  assert t1 in msg and "dangling symlink" not in msg
  # A broken case reference and a broken MSD label link are named as such too, not "no label".
  os.symlink(tmp_path / "gone", tmp_path / "case_link")
  assert str(tmp_path / "case_link") in _raises("dangling symlink", loaders.load_case, tmp_path / "case_link")
  (path, _, _), = _write_msd(tmp_path / "msd", n=1)
  label = loaders.msd_label_path(path)
  os.remove(label)
  os.symlink(tmp_path / "gone.nii.gz", label)
  assert label in _raises("dangling symlink", loaders.load_case, path)
