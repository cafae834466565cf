"""Segmenting a new scan: labels on the scan's own grid and affine, in its folder's convention; the launcher."""
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from experiments.configs import robustify as robustify_config
from mri_poison.data import loaders, phantom, preprocess
from mri_poison.studies.robustify import training
from mri_poison.train import evaluate, loop, segment

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A study-like workdir with one tiny 3D model (models/undefended), and two scans (BraTS 2021 and 2023 names)."""
  root = tmp_path_factory.mktemp("segment")
  config = robustify_config.get_config("runlocal")
  config.data.update(dict(phantom_shape=(24, 24, 24), shape=(16, 16, 16), patch_shape=(16, 16, 16)))  # the tests' 16^3
  config.model.features = (4, 8)
  config.train.update(dict(steps=2, ckpt_every=2, log_every=1))
  loop.train_model(training._sub_config(config), str(root / "study" / "models" / "undefended"))  # pylint: disable=protected-access
  (case_2021,) = phantom.write_brats_dir(root / "in2021", 1, naming="2021", shape=(32, 32, 32), seed=3)
  (case_2023,) = phantom.write_brats_dir(root / "in2023", 1, naming="2023", shape=(32, 32, 32), seed=3)
  return root, str(case_2021), str(case_2023)


def test_labels_overlay_the_scan_and_equal_the_models_prediction(trained, tmp_path):
  root, case_dir, _ = trained
  apply_fn, params, config = loop.load_model(str(root / "study"), "undefended")
  out = str(tmp_path / "pred.nii.gz")
  summary = segment.write_segmentation(apply_fn, params, config, case_dir, out)
  scan = nib.load(os.path.join(case_dir, os.path.basename(case_dir) + "_t1.nii.gz"))
  pred = nib.load(out)
  assert pred.shape == scan.shape == tuple(summary["shape"]) and summary["convention"] == "2021"
  np.testing.assert_allclose(pred.affine, scan.affine)
  labels = np.asarray(pred.dataobj)
  assert set(np.unique(labels)) <= {0, 1, 2, 4}
  # The same prediction computed the plain way: preprocess (no pad/crop), predict, argmax, paste at the crop.
  case = loaders.load_case(case_dir, tuple(config.data.modalities))
  prep = preprocess.preprocess_case(case.replace(label=None))
  direct = np.argmax(np.asarray(evaluate.predict_case(apply_fn, params, prep, config)), axis=-1)
  corner = np.rint(np.linalg.solve(case.affine, prep.affine[:, 3])[:3]).astype(int)
  box = tuple(slice(c, c + n) for c, n in zip(corner, prep.shape))
  contract = np.where(labels == 4, 3, labels)
  np.testing.assert_array_equal(contract[box], direct)
  outside = np.ones(labels.shape, bool)
  outside[box] = False
  assert not contract[outside].any()


def test_resampled_model_and_2023_names(trained, tmp_path):
  root, _, case_dir = trained
  apply_fn, params, config = loop.load_model(str(root / "study" / "models" / "undefended"))  # a model folder
  config.data.spacing = (12.0, 12.0, 12.0)  # a model trained at 12 mm: the scan (6.25 mm voxels) is resampled
  labels, affine = segment.segment_case(apply_fn, params, config, case_dir)
  case = loaders.load_case(case_dir)
  assert labels.shape == case.shape and np.allclose(affine, case.affine)
  out = segment.write_segmentation(apply_fn, params, config, case_dir, str(tmp_path / "p.nii.gz"))
  assert out["convention"] == "2023" and set(out["voxels"]) <= {1, 2, 3}
  np.testing.assert_array_equal(loaders.to_convention(np.array([0, 1, 2, 3]), "2021"), [0, 1, 2, 4])
  np.testing.assert_array_equal(loaders.to_convention(np.array([0, 1, 2, 3]), "msd"), [0, 2, 1, 3])
  with pytest.raises(ValueError, match="expected a .nii.gz"):
    segment.write_segmentation(apply_fn, params, config, case_dir, str(tmp_path / "p.png"))


def test_launcher_writes_the_prediction_and_names_a_missing_model(trained, tmp_path):
  root, case_dir, _ = trained
  out = tmp_path / "pred.nii.gz"
  run = lambda *a: subprocess.run([sys.executable, "-m", "experiments.segment", *a], cwd=REPO, capture_output=True,
                                  text=True, timeout=300)
  ok = run(f"--workdir={root / 'study'}", "--model=undefended", f"--input={case_dir}", f"--output={out}")
  assert ok.returncode == 0, ok.stderr[-2000:]
  assert "wrote" in ok.stdout and nib.load(str(out)).shape == (32, 32, 32)
  bad = run(f"--workdir={root / 'study'}", "--model=distilled", f"--input={case_dir}", f"--output={out}x.nii.gz")
  assert bad.returncode == 1 and "not a trained model folder" in bad.stderr
