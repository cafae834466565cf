"""Study 4: tables, statistics, figures and report.md, all derived from the evaluation cells."""
from __future__ import annotations

import os

import numpy as np

from mri_poison import io_utils
from mri_poison import metrics
from mri_poison.ops import morphology
from mri_poison.report import figures
from mri_poison.report import markdown
from mri_poison.report import tables

PAPER = {"psnr_db": 50.03, "dsc_clean_pct": 82.18, "dsc_protected_pct": 6.80}
METHOD_TEXT = {
    "none": "no protection (clean training data)",
    "random": "random sign noise of the same L-inf budget on the brain",
    "minmin": "error-minimising noise (min-min, Huang et al. 2021) on the brain",
    "umed": "UMed: contour (CDC U-Net) + texture (LBP-clipped U-Net) perturbations on the tumour and its band",
}


def _ci(values, seed=0):
  ci = metrics.bootstrap_ci(values, n_boot=2000, seed=seed)
  return ci["low"], ci["high"]


def victim_rows(table, cells, plan, test_ids) -> list[dict]:
  rows = []
  for name, method, regime, fraction in plan:
    row = {"victim": name, "method": method, "regime": regime, "fraction": fraction}
    for m in ("dice_WT", "dice_TC", "dice_ET", "dice_mean"):
      v = table.values(cells[name], m, test_ids)
      row[f"{m}_mean"], row[f"{m}_sd"] = float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0
    row["ci_low"], row["ci_high"] = _ci(table.values(cells[name], "dice_mean", test_ids))
    rows.append(row)
  return rows


def quality_rows(table, methods, train_ids, quality_cells) -> list[dict]:
  rows = []
  for m in methods:
    row = {"method": m}
    for q in ("psnr", "ssim", "share_roi", "share_band", "linf_scaled"):
      v = table.values(quality_cells[m], q, train_ids)
      row[f"{q}_mean"], row[f"{q}_sd"] = float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0
    rows.append(row)
  return rows


def comparisons(table, cells, plan, methods, regimes, test_ids) -> list[dict]:
  """Paired (by test case) mean-Dice comparisons; the primary family (method vs none, standard) Holm-corrected."""
  names = {n for n, *_ in plan}
  dice = lambda n: table.values(cells[n], "dice_mean", test_ids)
  out = []

  def add(family, a, b, what):
    r = metrics.paired_comparison(dice(a), dice(b))
    out.append({"family": family, "comparison": what, "a": a, "b": b, **r})

  for m in methods[1:]:
    add("primary", "none/standard", f"{m}/standard", f"clean-trained minus {m}-trained victim")
  for regime in regimes[1:]:
    for m in methods[1:]:
      add("counter-measure", f"none/{regime}", f"{m}/{regime}", f"{regime}: clean-trained minus {m}-trained")
      add("recovery", f"{m}/{regime}", f"{m}/standard", f"{m}: {regime} minus standard training")
  for n in sorted(x for x in names if "@" in x):
    add("partial", "none/standard", n, f"clean-trained minus {n}")
  primary = [r for r in out if r["family"] == "primary"]
  adjusted = metrics.holm([r["p_value"] for r in primary]) if primary else []
  for r, p in zip(primary, adjusted):
    r["p_holm"] = float(p)
  for r in out:
    r.setdefault("p_holm", float("nan"))
  return out


def dice_figure(rows, methods, regimes, path) -> str:
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(methods), 3.4))
  width = 0.8 / max(len(regimes), 1)
  for j, regime in enumerate(regimes):
    sel = {r["method"]: r for r in rows if r["regime"] == regime and r["fraction"] == 1.0}
    xs = np.arange(len(methods)) + (j - (len(regimes) - 1) / 2) * width
    means = [sel[m]["dice_mean_mean"] for m in methods]
    err = [sel[m]["dice_mean_sd"] for m in methods]
    ax.bar(xs, means, width, yerr=err, capsize=2, label=regime)
  ax.set_xticks(np.arange(len(methods)))
  ax.set_xticklabels(methods)
  ax.set_ylabel("clean-test mean Dice (WT, TC, ET)")
  ax.set_ylim(0, 1)
  ax.legend(title="victim training", fontsize=7, ncol=2)
  ax.set_title("Victims trained on protected data, tested on clean data (mean +- SD)")
  return figures.save_figure(fig, path)


def partial_figure(rows, method, path) -> str:
  import matplotlib.pyplot as plt
  pts = sorted([(0.0, r) for r in rows if r["victim"] == "none/standard"]
               + [(r["fraction"], r) for r in rows if r["method"] == method and r["regime"] == "standard"],
               key=lambda t: t[0])
  fig, ax = plt.subplots(figsize=(4, 3))
  f = [p[0] * 100 for p in pts]
  m = np.asarray([p[1]["dice_mean_mean"] for p in pts])
  lo, hi = np.asarray([p[1]["ci_low"] for p in pts]), np.asarray([p[1]["ci_high"] for p in pts])
  ax.plot(f, m, "o-")
  ax.fill_between(f, lo, hi, alpha=0.25)
  ax.set_xlabel(f"% of training cases protected ({method})")
  ax.set_ylabel("clean-test mean Dice")
  ax.set_ylim(0, 1)
  return figures.save_figure(fig, path)


def example_figure(train_cases, protected, methods, width, path) -> str:
  """Clean / protected / perturbation x20 (with the contour band outlined) on the first case's largest tumour slice."""
  import matplotlib.pyplot as plt
  case = train_cases[0]
  z = int(np.argmax((case.label > 0).sum(axis=(0, 1))))
  channel = case.modalities.index("flair") if "flair" in case.modalities else 0
  x = case.image[:, :, z, channel]
  band = np.asarray(morphology.contour_band(case.label[:, :, z] > 0, width, 2))
  shown = [m for m in methods if m != "none"]
  fig, axes = plt.subplots(len(shown), 3, figsize=(7.5, 2.5 * len(shown)), squeeze=False)
  for i, m in enumerate(shown):
    xp = protected[m][0].image[:, :, z, channel]
    delta = xp - x
    lim = float(np.abs(x).max()) or 1.0
    axes[i, 0].imshow(x.T, cmap="gray", origin="lower")
    axes[i, 1].imshow(xp.T, cmap="gray", origin="lower")
    axes[i, 2].imshow(np.clip(20 * delta, -lim, lim).T, cmap="seismic", vmin=-lim, vmax=lim, origin="lower")
    axes[i, 2].contour(band.T.astype(float), levels=[0.5], colors="k", linewidths=0.6, origin="lower")
    axes[i, 0].set_ylabel(m)
    for a, t in zip(axes[i], ("clean", "protected", "perturbation x20, contour band")):
      a.set_title(t, fontsize=8)
      a.set_xticks([])
      a.set_yticks([])
  fig.suptitle(f"{case.case_id}, slice z={z}, {case.modalities[channel]}", fontsize=9)
  return figures.save_figure(fig, path)


def finish(config, workdir, table, cells, plan, methods, train_ids, test, protected, train_cases, data, info,
           written, timings) -> dict:
  from mri_poison.studies import common
  from mri_poison.studies.unlearnable.study import EVAL_VERSION
  results, fig_dir = os.path.join(workdir, "results"), os.path.join(workdir, "figures")
  p = config.protect
  regimes = tuple(config.counter.regimes)
  test_ids = list(test["case_id"])
  train_digest = common.tree_digest([c.image for c in train_cases])
  quality_cells = {m: common.make_cell("protection", m, float(p.eps),
                                       params=common.tree_digest([c.image for c in protected[m]]), settings={},
                                       cases=train_ids, version=EVAL_VERSION, data=train_digest) for m in methods}
  vrows = victim_rows(table, cells, plan, test_ids)
  qrows = quality_rows(table, methods, train_ids, quality_cells)
  comp = comparisons(table, cells, plan, methods, regimes, test_ids)
  per_case = [dict(victim=n, case=c, **{m: float(table.values(cells[n], m, [c])[0])
                                        for m in ("dice_WT", "dice_TC", "dice_ET", "dice_mean")})
              for n, *_ in plan for c in test_ids]
  io_utils.write_csv(os.path.join(results, "per_case.csv"), per_case)
  io_utils.write_csv(os.path.join(results, "victims.csv"), vrows)
  io_utils.write_csv(os.path.join(results, "quality.csv"), qrows)
  io_utils.write_csv(os.path.join(results, "comparisons.csv"), comp)
  width = int(p.umed.width)
  figs = {"dice": dice_figure(vrows, methods, regimes, os.path.join(fig_dir, "dice_vs_method.png")),
          "example": example_figure(train_cases, protected, methods, width, os.path.join(fig_dir, "example.png"))}
  if any("@" in r["victim"] for r in vrows):
    figs["partial"] = partial_figure(vrows, str(p.partial_method), os.path.join(fig_dir, "partial.png"))
  by = {r["victim"]: r for r in vrows}
  q = {r["method"]: r for r in qrows}
  headline = {
      "n_test": len(test_ids), "n_train": len(train_ids), "n_train_slices": int(np.shape(data["image"])[0]),
      "dice": {n: {"mean": r["dice_mean_mean"], "sd": r["dice_mean_sd"], "ci": [r["ci_low"], r["ci_high"]]}
               for n, r in by.items()},
      "psnr_db": {m: q[m]["psnr_mean"] for m in methods},
      "primary": [{k: r[k] for k in ("b", "mean_diff", "ci_low", "ci_high", "p_value", "p_holm", "n_effective")}
                  for r in comp if r["family"] == "primary"],
      "protection_info": info, "protected_folders": written, **timings,
  }
  io_utils.write_json(os.path.join(results, "headline.json"), headline)
  write_report(config, workdir, vrows, qrows, comp, figs, headline)
  return headline


def _verdict(r) -> str:
  if r["ci_low"] > 0 and r.get("p_holm", r["p_value"]) < 0.05:
    return "lower than the clean-trained victim"
  if r["ci_high"] < 0 and r.get("p_holm", r["p_value"]) < 0.05:
    return "higher than the clean-trained victim"
  return "no clear difference from the clean-trained victim"


def findings(config, vrows, qrows, comp, headline) -> list[str]:
  n = headline["n_test"]
  by = {r["victim"]: r for r in vrows}
  q = {r["method"]: r for r in qrows}
  out = []
  for r in (r for r in comp if r["family"] == "primary"):
    m = r["b"].split("/")[0]
    out.append(f"`{m}` (primary, n = {n} clean test cases, effective n {r['n_effective']}): victim Dice "
               f"{by[r['b']]['dice_mean_mean']:.3f} vs {by['none/standard']['dice_mean_mean']:.3f} clean-trained; "
               f"difference {r['mean_diff']:+.3f} (95 % CI {r['ci_low']:+.3f} to {r['ci_high']:+.3f}), Holm p = "
               f"{tables.format_p(r['p_holm'])}: {_verdict(r)}. PSNR of the protected images "
               f"{q[m]['psnr_mean']:.1f} +- {q[m]['psnr_sd']:.1f} dB.")
  for r in (r for r in comp if r["family"] == "recovery"):
    m, regime = r["a"].split("/")
    out.append(f"Counter-measure `{regime}` against `{m}` (exploratory, uncorrected): Dice "
               f"{by[r['a']]['dice_mean_mean']:.3f} vs {by[r['b']]['dice_mean_mean']:.3f} with standard training "
               f"(difference {r['mean_diff']:+.3f}, CI {r['ci_low']:+.3f} to {r['ci_high']:+.3f}, p = "
               f"{tables.format_p(r['p_value'])}).")
  if "umed/standard" in by:
    r = next(r for r in comp if r["b"] == "umed/standard")
    worked = r["ci_low"] > 0.05 and r["p_holm"] < 0.05
    out.insert(0, f"**UMed target check** (a UMed-protected victim clearly below the clean-trained one at PSNR >= 40 "
                  f"dB): Dice {by['umed/standard']['dice_mean_mean']:.3f} vs {by['none/standard']['dice_mean_mean']:.3f}"
                  f", PSNR {q['umed']['psnr_mean']:.1f} dB: "
                  + ("MET." if worked and q["umed"]["psnr_mean"] >= 40 else
                     "NOT MET: at this budget and training length the protection does not make the data unlearnable "
                     "here; the paper's drop (82 % -> 7 %) is not reproduced."))
  out.append("Protections were trained and evaluated on the synthetic phantom, not BraTS: the numbers say whether "
             "the mechanism works on this data at this budget, not what it does on patients. One seed per victim: "
             "the spread between training runs is not in the CIs (they are over test cases)."
             if str(config.data.source) == "phantom" else
             "One seed per victim: the spread between training runs is not in the CIs (they are over test cases).")
  if n < 20:
    out.append(f"n = {n} < 20 test cases: every comparison here is exploratory.")
  return out


def write_report(config, workdir, vrows, qrows, comp, figs, headline) -> None:
  d, p, c = config.data, config.protect, config.counter
  r = markdown.Report("Study 4: unlearnable examples for segmentation (min-min, UMed)")
  r.paragraph(
      "Protect the training split, train a fresh victim U-Net from scratch on it, test on the clean test split "
      f"(arXiv 2403.14250, UMed; baseline: error-minimising noise). Config variant `{config.variant}`; data "
      f"`{d.source}`; {headline['n_train']} training cases ({headline['n_train_slices']} axial slices), "
      f"{headline['n_test']} clean test cases; wall time {headline['wall_s']:.0f} s (protection "
      f"{headline['protect_s']:.0f} s, victims {headline['victims_s']:.0f} s).")
  r.heading("Paper's numbers (on its data, not ours)")
  r.paragraph(f"UMed abstract: average PSNR {PAPER['psnr_db']} dB; clean average DSC of models trained on protected "
              f"data falls from {PAPER['dsc_clean_pct']} % to {PAPER['dsc_protected_pct']} %.")
  r.heading("Findings and caveats")
  r.bullets(findings(config, vrows, qrows, comp, headline))
  r.heading("Victims (clean-test Dice)")
  r.image(figs["dice"], "Dice vs method", base_dir=workdir)
  r.table(vrows, ["victim", "dice_mean_mean", "dice_mean_sd", "ci_low", "ci_high", "dice_WT_mean", "dice_TC_mean",
                  "dice_ET_mean"],
          caption="Mean Dice over WT, TC, ET per clean test case: mean, SD, bootstrap 95 % CI of the mean; per region.",
          headers={"dice_mean_mean": "Dice", "dice_mean_sd": "SD", "ci_low": "CI low", "ci_high": "CI high",
                   "dice_WT_mean": "WT", "dice_TC_mean": "TC", "dice_ET_mean": "ET"})
  if "partial" in figs:
    r.image(figs["partial"], "partial protection", base_dir=workdir)
  r.heading("Imperceptibility and where the perturbation lies")
  r.table(qrows, ["method", "psnr_mean", "psnr_sd", "ssim_mean", "share_roi_mean", "share_band_mean",
                  "linf_scaled_mean"],
          caption="Per training case, on [0, 1]-scaled intensities (each case and channel by its own max - min): PSNR "
                  "(dB, whole volume; 200 = identical), SSIM (mean over channels), share of sum |delta| inside the "
                  "tumour dilated by the band (ROI + band) and inside the contour band, largest |delta|.",
          headers={"psnr_mean": "PSNR", "psnr_sd": "SD", "ssim_mean": "SSIM", "share_roi_mean": "share ROI+band",
                   "share_band_mean": "share band", "linf_scaled_mean": "L-inf"})
  r.image(figs["example"], "examples", base_dir=workdir)
  r.heading("Paired comparisons")
  r.table(comp, ["family", "a", "b", "mean_diff", "ci_low", "ci_high", "p_value", "p_holm", "n", "n_effective"],
          caption="Mean Dice difference a - b over the clean test cases (bootstrap 95 % CI), two-sided Wilcoxon "
                  "signed-rank p; Holm correction over the primary family only (each protection vs none, standard "
                  "training). Counter-measure, recovery and partial rows are exploratory.",
          formats={"p_value": tables.format_p, "p_holm": tables.format_p})
  r.heading("Protocol")
  r.bullets([
      f"Data: `{d.source}`, modalities {tuple(d.modalities)}, z-scored per modality in the brain, grid "
      f"{tuple(d.shape)}; 2D axial whole slices {tuple(d.patch_shape)}; labels 0-3 (BraTS regions WT, TC, ET).",
      f"Budget: eps = {float(p.eps):.4g} (= {float(p.eps) * 255:.3g}/255) on intensities scaled to [0, 1] per case "
      "and channel (max - min of the z-scored case), i.e. eps x range in z-units [ref: 4/255]. Protected images are "
      "clipped to the case's [min, max].",
      f"Surrogate and victims: U-Net features {tuple(config.model.features)}, {config.model.norm} norm; victims "
      f"{int(config.train.steps)} steps, batch {int(d.batch_size)}, AdamW lr {float(config.train.lr):g}, CE + Dice "
      "(*defaults chosen here*).",
      f"Min-min ({p.minmin.mode}-wise): {int(p.minmin.inner_steps)} sign steps of {float(p.minmin.step_frac):g} eps "
      f"per outer step, surrogate Adam lr {float(p.minmin.lr):g}, at most {int(p.minmin.steps)} steps; stops when "
      f"the EMA of the surrogate's CE + Dice on protected batches <= {float(p.minmin.stop_loss):g} "
      f"(stopped at step {headline['protection_info'].get('minmin', {}).get('stopped_at', 'n/a')}; -1 = ran all "
      "steps) [*defaults chosen here*, schedule after Huang et al.].",
      f"UMed: contour band width {int(p.umed.width)} (dilate - erode), CDC theta {float(p.umed.theta):g}, "
      f"perturbators lr {float(p.umed.lr):g}, surrogate updated every k = {int(p.umed.k)} steps (lr "
      f"{float(p.umed.surrogate_lr):g}), {int(p.umed.steps)} steps, perturbator U-Nets {tuple(p.umed.features)} "
      "[ref: width 3, theta 0.5, lr 1e-4, k 5; the rest *defaults chosen here*].",
      "Random: random sign noise, +-eps x range on every brain voxel.",
      f"Counter-measures: adversarial training ({c.adversarial.attack}, eps = {float(c.adversarial.eps_scaled):.4g} "
      f"scaled = {float(c.adversarial.eps_scaled) * 255:.3g}/255, ratio {float(c.adversarial.ratio):g}); strong "
      f"augmentation (flips, gain +-{float(c.augment.scale):g}, offset +-{float(c.augment.shift):g}, Gaussian blur "
      f"sigma ~ U(0, {float(c.augment.blur_sigma):g}) w.p. {float(c.augment.blur_prob):g}); purification "
      f"(`{c.purify.kind}`: sigma {float(c.purify.sigma):g} / {int(c.purify.levels)} levels) "
      "[*defaults chosen here*].",
      f"Partial protection: {p.partial_method} on a random {tuple(float(f) for f in p.fractions)} share of the "
      "training cases, the rest clean.",
      "Dice: the BraTS convention (both empty -> 1, one empty -> 0) per region on whole test volumes.",
  ])
  if headline["protected_folders"]:
    r.paragraph("Protected training data as BraTS-2021-style NIfTI folders (float32 z-scored images, seg with ET = 4), "
                "readable with `--config.data.source=brats --config.data.root=<folder>`: "
                + ", ".join(f"`{v}`" for v in headline["protected_folders"].values()) + ".")
  r.heading("Files")
  r.bullets(["`results/cells.csv`: every evaluation cell (victims on the test split; protection quality on the "
             "training split) as long-form rows.",
             "`results/victims.csv`, `results/quality.csv`, `results/comparisons.csv`, `results/per_case.csv`, "
             "`results/headline.json`.",
             "`protect/<method>/`: the min-min and UMed fit runs; `models/<victim>/`: each victim's training run."])
  r.write(os.path.join(workdir, "report.md"))
