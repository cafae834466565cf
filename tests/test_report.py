"""Report utilities: tables (summaries, paired Wilcoxon, markdown), figures, NIfTI export, report.md."""
import os

import nibabel as nib
import numpy as np
import pytest

from mri_poison.report import figures
from mri_poison.report import markdown
from mri_poison.report import nifti
from mri_poison.report import tables


def _rows():
  rng = np.random.default_rng(0)
  rows = []
  for case in range(8):
    clean = 0.8 + 0.05 * rng.random()
    rows.append({"model": "clean", "attack": "clean", "eps": 0.0, "case": f"c{case}", "dice": clean})
    rows.append({"model": "clean", "attack": "fgsm", "eps": 0.1, "case": f"c{case}", "dice": clean - 0.3 - 0.01 * case})
  return rows


def test_summarize_and_paired_wilcoxon():
  rows = _rows()
  summary = tables.summarize(rows, ["model", "attack", "eps"], ["dice"])
  assert [(r["attack"], r["n"]) for r in summary] == [("clean", 8), ("fgsm", 8)]
  clean = np.array([r["dice"] for r in rows if r["attack"] == "clean"])
  np.testing.assert_allclose(summary[0]["dice_mean"], clean.mean())
  np.testing.assert_allclose(summary[0]["dice_std"], clean.std(ddof=1))  # sample SD, as documented
  res = tables.paired_test(rows, {"model": "clean", "attack": "clean"}, {"attack": "fgsm", "eps": 0.1}, "dice",
                           comparison="clean vs fgsm")
  # Every one of 8 paired differences is positive: the exact two-sided p is 2 / 2^8.
  assert res["n"] == 8 and res["comparison"] == "clean vs fgsm"
  np.testing.assert_allclose(res["p_value"], 2 / 2**8)
  assert res["median_diff"] > 0.29 and res["mean_a"] > res["mean_b"]
  with pytest.raises(ValueError, match="no paired rows"):
    tables.paired_test(rows, {"attack": "clean"}, {"attack": "pgd"}, "dice")


def test_markdown_table_formats():
  text = tables.markdown_table([{"a": 1, "b": 0.123456, "c": "x|y", "d": 1e-6}], headers={"a": "A"})
  lines = text.strip().split("\n")
  assert lines[0] == "| A | b | c | d |" and lines[1] == "|---|---|---|---|"
  assert lines[2] == "| 1 | 0.123 | x\\|y | 1.0e-06 |"
  assert tables.format_p(0.01) == "0.01 *" and tables.format_p(0.2) == "0.2"


def test_figures_written(tmp_path):
  curves = {"undefended": {"fgsm": ([0.0, 0.01, 0.1], [0.85, 0.8, 0.4]), "pgd": ([0.0, 0.01, 0.1], [0.85, 0.8, 0.2])},
            "adversarial": {"fgsm": ([0.0, 0.01, 0.1], [0.8, 0.8, 0.6])}}
  path = figures.dice_vs_eps(curves, tmp_path / "fig" / "d.png",
                             ci={"undefended": {"fgsm": ([0.8, 0.7, 0.3], [0.9, 0.9, 0.5])}})
  assert os.path.getsize(path) > 1000
  rng = np.random.default_rng(0)
  image = rng.normal(size=(16, 16, 8, 4)).astype(np.float32)
  label = np.zeros((16, 16, 8), np.int32)
  label[4:9, 4:9, 5] = 3
  label[5:7, 5:7, 2] = 1
  path = figures.example_slice(image, image + 0.05, label, label, np.zeros_like(label), tmp_path / "s.png")
  assert os.path.getsize(path) > 1000
  assert sorted(os.listdir(tmp_path)) == ["fig", "s.png"]
  assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp.png")]  # nothing half-written left
  with pytest.raises(ValueError, match="grid"):
    figures.example_slice(image, image, label[:8], label, label, tmp_path / "bad.png")
  path = figures.line_panels({"m": {"pgd": ([0, 1, 2], [0.3, 0.9, 1.4])}}, tmp_path / "l.png", xlabel="t",
                             ylabel="CE")
  assert os.path.getsize(path) > 1000
  with pytest.raises(ValueError, match="panel"):
    figures.line_panels({}, tmp_path / "none.png", xlabel="t", ylabel="CE")


def test_nifti_keeps_affine_and_values(tmp_path):
  affine = np.diag([1.5, 1.0, 2.0, 1.0])
  affine[:3, 3] = (-10, 5, 3)
  image = np.random.default_rng(1).normal(size=(6, 5, 4, 2)).astype(np.float32)
  labels = np.arange(6 * 5 * 4).reshape(6, 5, 4) % 4
  p_img = nifti.save_volume(tmp_path / "img.nii.gz", image, affine)
  p_lab = nifti.save_volume(tmp_path / "lab.nii.gz", labels, affine)
  img, lab = nib.load(p_img), nib.load(p_lab)
  np.testing.assert_allclose(img.affine, affine)
  np.testing.assert_array_equal(np.asarray(img.dataobj), image)
  np.testing.assert_array_equal(np.asarray(lab.dataobj), labels)
  assert lab.get_data_dtype() == np.int16
  with pytest.raises(ValueError, match="affine"):
    nifti.save_volume(tmp_path / "x.nii.gz", image, np.eye(3))
  assert sorted(os.listdir(tmp_path)) == ["img.nii.gz", "lab.nii.gz"]


def test_report_markdown(tmp_path):
  r = markdown.Report("Study")
  r.heading("Results").paragraph("Some text.").table([{"x": 1.0}], caption="Table 1.")
  r.image(str(tmp_path / "figures" / "a.png"), "fig", base_dir=str(tmp_path)).bullets(["one", "two"])
  path = r.write(tmp_path / "report.md")
  text = open(path).read()
  assert text.startswith("# Study\n")
  assert "## Results" in text and "| x |" in text and "| 1.000 |" in text
  assert "![fig](figures/a.png)" in text and "- two\n" in text
