"""Study 1: the translation GAN as a stage (trained in workdir/models/gan) and its quality on held-out cases.

`run_gan(config, workdir)` is what `python -m experiments.train_gan` calls: trains the GAN on the training
split, synthesises the target contrast of the validation cases, and writes results/gan_quality.csv (PSNR,
SSIM, MAE against the real target, per case), figures/gan_grid.png (source / synthetic / real) and report.md.
"""
from __future__ import annotations

import os
import time

import numpy as np

from mri_poison import cellstore
from mri_poison import io_utils
from mri_poison import metrics
from mri_poison.poison import translation
from mri_poison.report import figures
from mri_poison.report import markdown
from mri_poison.studies import common

QUALITY = ("psnr", "ssim", "mae")
# Enhancing tumour minus the rest of the brain (mean z), in the synthetic and the real target: does the GAN make
# the bright ET rim that the segmenters learn from? NaN for a case without ET.
ET_CONTRAST = ("et_contrast_synthetic", "et_contrast_real")


def train(config, workdir: str, train_cases) -> dict:
  """Generator params, trained (or resumed / reused) in workdir/models/gan."""
  return translation.train_gan(config.gan, config.data, os.path.join(workdir, "models", "gan"), train_cases)


def et_contrast(volume, label, brain) -> float:
  """Mean of `volume` on enhancing tumour (label 3) minus its mean on non-tumour brain; NaN without ET."""
  et, rest = label == 3, brain & (label == 0)
  return float(volume[et].mean() - volume[rest].mean()) if et.any() and rest.any() else float("nan")


def quality_rows(synthetic, cases, target: int) -> list[dict]:
  """Per case: PSNR, SSIM (joint data range of the two volumes) and MAE of the synthetic vs the real target, and
  the ET contrast of each (`et_contrast`; NaN for a case without ET or without labels)."""
  rows = []
  for s, c in zip(synthetic, cases):
    real = c.image[..., target]
    row = {"case": c.case_id, "psnr": metrics.psnr(s, real), "ssim": metrics.ssim(s, real),
           "mae": float(np.mean(np.abs(s - real)))}
    if c.label is not None:
      brain = (c.image != 0).any(-1)
      row.update(et_contrast_synthetic=et_contrast(s, c.label, brain), et_contrast_real=et_contrast(real, c.label, brain))
    rows.append(row)
  return rows


def quality_summary(rows) -> dict:
  """{metric: {"mean", "sd", "n"}} over the cases where the metric is defined (ET contrast: cases with ET)."""
  out = {}
  for m in QUALITY + ET_CONTRAST:
    v = np.array([r.get(m, np.nan) for r in rows], float)
    v = v[np.isfinite(v)]
    if v.size:
      out[m] = {"mean": float(v.mean()), "sd": float(v.std()), "n": int(v.size)}
  return out


def quality_table(summary, target: str) -> list[dict]:
  """Rows of the translation-quality table: PSNR / SSIM / MAE, then the ET contrast of synthetic and real."""
  names = {"et_contrast_synthetic": f"ET contrast, synthetic {target} (z)",
           "et_contrast_real": f"ET contrast, real {target} (z)"}
  return [{"metric": names.get(m, m), "mean": summary[m]["mean"], "sd": summary[m]["sd"],
           "cases": summary[m].get("n", "")} for m in QUALITY + ET_CONTRAST if m in summary]


def _figure_slice(case) -> int:
  """The axial slice with the most enhancing tumour, else the most tumour, else the most brain (never a blank
  slice picked by argmax over zeros)."""
  masks = ([case.label == 3, case.label > 0] if case.label is not None else []) + [(case.image != 0).any(-1)]
  for mask in masks:
    counts = mask.sum(axis=(0, 1))
    if counts.max() > 0:
      return int(np.argmax(counts))
  return case.image.shape[2] // 2


def grid_figure(cases, synthetic, source: int, target: int, names, path: str, n: int = 3) -> str:
  """Rows: cases (those with enhancing tumour first); columns: source / synthetic / real target on the slice
  `_figure_slice` picks."""
  import matplotlib.pyplot as plt
  n = max(1, min(int(n), len(cases)))
  order = sorted(range(len(cases)), key=lambda i: cases[i].label is None or not (cases[i].label == 3).any())
  fig, axes = plt.subplots(n, 3, figsize=(7.5, 2.5 * n), squeeze=False)
  for row, i in enumerate(order[:n]):
    c = cases[i]
    z = _figure_slice(c)
    panels = [(c.image[:, :, z, source], f"{names[0]} (source)"), (synthetic[i][:, :, z], f"synthetic {names[1]}"),
              (c.image[:, :, z, target], f"real {names[1]}")]
    lo, hi = np.percentile(c.image[:, :, z, target], [1, 99])
    for j, (img, title) in enumerate(panels):
      ax = axes[row, j]
      kw = {} if j == 0 else {"vmin": lo, "vmax": hi}
      ax.imshow(np.rot90(img), cmap="gray", **kw)
      ax.set_title(f"{c.case_id}: {title}" if j == 0 else title, fontsize=8)
      ax.axis("off")
  fig.tight_layout()
  return figures.save_figure(fig, path)


def quality_stage(config, workdir, gen_params, gan_digest, val_cases) -> dict:
  """Synthetic validation volumes, per-case quality rows and the figure grid (the grid is a cached stage)."""
  source, target = translation.channels(config.gan, config.data.modalities)
  synthetic = translation.synthesize_volumes(config.gan, gen_params, val_cases, source)
  rows = quality_rows(synthetic, val_cases, target)
  io_utils.write_csv(os.path.join(workdir, "results", "gan_quality.csv"), rows)
  names = (str(config.gan.source), str(config.gan.target))
  n_fig = int(config.eval.n_figure_cases)
  depends = {"gan": gan_digest, "cases": [c.case_id for c in val_cases[:n_fig]], "n": n_fig}
  fig = common.cached_stage(
      os.path.join(workdir, "results", "stages", "gan_grid.json"), depends,
      lambda: os.path.relpath(grid_figure(val_cases, synthetic, source, target, names,
                                          os.path.join(workdir, "figures", "gan_grid.png"), n_fig), workdir),
      valid=lambda p: os.path.exists(os.path.join(workdir, p)))
  summary = quality_summary(rows)
  return {"synthetic": synthetic, "rows": rows, "figure": os.path.join(workdir, fig), "summary": summary}


def run_gan(config, workdir: str, *, splits: dict | None = None) -> dict:
  """Trains the GAN and reports its quality on the validation cases; returns {metric: {"mean", "sd"}}."""
  t0 = time.perf_counter()
  translation.channels(config.gan, config.data.modalities)  # a bad gan.source fails before anything is written
  with common.study_workdir(workdir, config, resumable_keys=("eval.",), seed=int(config.seed)) as (workdir, _):
    if splits is None:
      from mri_poison.data.datasets import load_splits
      splits = load_splits(config.data)
    val = list(splits["val"])
    if int(config.eval.max_cases):
      val = val[:int(config.eval.max_cases)]
    gen_params = train(config, workdir, splits["train"])
    quality = quality_stage(config, workdir, gen_params, cellstore.tree_digest(gen_params), val)
    r = markdown.Report(f"Translation GAN: {config.gan.source} -> {config.gan.target}")
    r.paragraph(
        f"SANTA-style GAN (shared encoder, AdaIN decoder conditioned on d, shortest-path regulariser) trained "
        f"for {int(config.gan.train.steps)} steps on {len(splits['train'])} `{config.data.source}` cases; "
        f"quality on {len(val)} held-out cases in z-score units (whole volume, background included). "
        f"Wall time {time.perf_counter() - t0:.0f} s.")
    r.table(quality_table(quality["summary"], str(config.gan.target)),
            caption="Synthetic vs real target contrast, mean and SD over held-out cases (ET contrast: mean ET "
                    "minus mean non-tumour brain, over the cases with ET).")
    r.image(quality["figure"], "source / synthetic / real", base_dir=workdir)
    r.paragraph("Per case: `results/gan_quality.csv`; training curves: `models/gan/metrics.jsonl`.")
    r.write(os.path.join(workdir, "report.md"))
    io_utils.write_json(os.path.join(workdir, "results", "gan_quality.json"), quality["summary"])
  return quality["summary"]
