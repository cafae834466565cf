"""Study 4's report.md, worded from the result rows `analysis` writes (findings and diagnosis generated from
them); `study.render` calls `write_report` on the rows read back from results/."""
from __future__ import annotations

import os

import numpy as np

from mri_poison import io_utils
from mri_poison.poison import protections
from mri_poison.report import markdown
from mri_poison.report import tables
from mri_poison.studies import learnt as learnt_lib
from mri_poison.studies.unlearnable.analysis import figure_paths, seed_runs

PAPER = {"psnr_db": 50.03, "dsc_clean_pct": 82.18, "dsc_protected_pct": 6.80}
DIFFERENCE = {"lower": "lower than the clean-trained victim", "higher": "higher than the clean-trained victim",
              "no clear difference": "no clear difference from the clean-trained victim"}


def _claims(res) -> dict:
  """{(subject, claim): row} of results/claims.csv (analysis.claim_rows decides; this module words)."""
  return {(r["subject"], r["claim"]): r for r in res["claims"]}


def diagnosis(config, res, headline) -> list[str]:
  """Generated sentences on why a protection does or does not work here (shortcut, surrogate fit, sweep);
  res: the result rows by `analysis.RESULT_TABLES` key."""
  out, claims = [], _claims(res)
  eps = float(config.protect.eps)
  contrast = headline.get("tumour_contrast_over_eps")
  if contrast is not None and np.isfinite(contrast):
    out.append(f"Tumour contrast in budgets: tumour and surrounding brain differ by {contrast:.0f} x the budget "
               f"(median over training cases of the largest per-channel mean difference / (eps x range), eps = "
               f"{eps * 255:.3g}/255). Hypothesis, not a measured cause: the larger this ratio, the weaker a "
               "budget-sized shortcut is next to the real feature; the phase map (data difficulty x budget) is where "
               "it is tested.")
  for r in res["quality"]:
    c = claims.get((r["method"], "the perturbation strengthens the real tumour contrast"))
    if c is not None:
      out.append(f"Direction of `{r['method']}`: its perturbation adds {c['value']:+.2f} budgets to the tumour-vs-brain "
                 "contrast " + ("(error-minimising noise here mostly makes the tumour stand out MORE, which helps a "
                                "victim learn the real feature rather than hiding it)." if c["verdict"] == "yes" else
                                "(it does not systematically strengthen the real contrast)."))
  for r in res["shortcut"]:
    c = claims.get((r["method"], "the victim relies on the perturbation (a shortcut)"))
    if c is None:
      continue
    out.append(f"Shortcut check `{r['method']}`: the victim scores {r['train_protected_dice']:.3f} Dice on the "
               f"protected training cases it was trained on and {r['train_clean_dice']:.3f} on the same cases "
               f"unprotected (gap {r['gap']:+.3f}): " + (
                   "it relies on the perturbation (a shortcut was learned)." if c["verdict"] == "yes" else
                   "it does not rely on the perturbation (no shortcut learned; it learned the real tumour appearance)."))
  info = headline.get("protection_info", {})
  for r in res["quality"]:
    c = claims.get((r["method"], "the protection converged"))
    if c is None:
      continue
    inf = info[r["method"]]
    verdict = ("converged: the noise, not the tumour, is what the surrogate fits" if c["verdict"] == "yes" else
               f"NOT CONVERGED (ratio above {c['threshold']:g}): no error-minimising noise was produced, so this "
               "protection's victim numbers are not a result about the method")
    victim = (f"; the victim trained on it has ratio {inf['victim_hallmark']:.2f}" if "victim_hallmark" in inf
              else "")
    out.append(f"Hallmark `{r['method']}`: the surrogate's voxel CE is {inf['surrogate_ce_protected']:.4f} on the "
               f"protected and {inf['surrogate_ce_clean']:.4f} on the clean training slices, ratio {c['value']:.2f}"
               f"{victim}" + (f"; min-min stopped at round {inf['stopped_at']} (-1: never reached the accuracy rule)"
                              if "stopped_at" in inf else "") + f" -- {verdict}.")
  if res["sweep"]:
    method = str(config.protect.sweep_method)
    c = claims[(method, "a budget in the sweep lowers Dice (CI above 0)")]
    psnr = {r["eps_255"]: r["psnr"] for r in res["sweep"]}.get(c["value"])
    levels = ", ".join(f"{r['eps'] * 255:.3g}/255: {r['dice']:.3f} ({r['psnr']:.1f} dB)" for r in res["sweep"])
    out.append(f"Budget sweep of `{method}` (exploratory): clean-test Dice by budget {levels}. "
               + (f"The smallest budget lowering Dice by >= {c['threshold']:g} (CI excluding 0) is {c['value']:.3g}/255 "
                  f"at PSNR {psnr:.1f} dB" + (" -- far below the paper's 50 dB imperceptibility." if psnr < 40 else ".")
                  if c["verdict"] == "yes" else
                  f"No budget in the sweep lowers Dice by >= {c['threshold']:g} with a CI excluding 0."))
  return out


def findings(config, res, headline) -> list[str]:
  """The report's findings and caveats; res: the result rows by `analysis.RESULT_TABLES` key."""
  n, comp, claims = headline["n_test"], res["comparisons"], _claims(res)
  by = {r["victim"]: r for r in res["victims"]}
  q = {r["method"]: r for r in res["quality"]}
  kept = headline["learnt_regions"]
  dropped = learnt_lib.not_learnt_text(headline["gate"])
  out = [f"Not learnt by the clean-trained victim, so no result: {dropped}. "
         + (f"Every Dice below averages {', '.join(kept)} only." if kept else
            "No region was learnt: no protection effect is claimed and every number below is exploratory.")
         ] if dropped else []
  if not kept:
    return out
  seeds = seed_runs(res["victims"])
  for r in (r for r in comp if r["family"] == "primary"):
    m = r["b"].split("/")[0]
    verdict = claims[(m, "protected-data victim differs from the clean-trained one")]["verdict"]
    spread = claims.get((m, "the difference exceeds the clean victim's seed-to-seed spread"))
    out.append(f"`{m}` (primary, n = {n} clean test cases, effective n {r['n_effective']}): victim Dice "
               f"{by[r['b']]['dice_mean_mean']:.3f} vs {by['none/standard']['dice_mean_mean']:.3f} clean-trained; "
               f"difference {r['mean_diff']:+.3f} (95 % CI {r['ci_low']:+.3f} to {r['ci_high']:+.3f}), Holm p = "
               f"{tables.format_p(r['p_holm'])}: {DIFFERENCE[verdict]}"
               + (f", but within the clean-trained victim's seed-to-seed spread ({spread['threshold']:.3f}), so not "
                  "attributable to the protection" if spread is not None and spread["verdict"] == "no" else "")
               + f". PSNR of the protected images {q[m]['psnr_mean']:.1f} +- {q[m]['psnr_sd']:.1f} dB.")
  if len(seeds["none"]) > 1:
    runs = "; ".join(f"`{m}` " + ", ".join(f"{v:.3f}" for v in vals) for m, vals in seeds.items() if len(vals) > 1)
    out.append(f"Training-seed spread (standard victims retrained with other seeds on the same data): {runs}. The CIs "
               "above are over test cases for ONE training run each; differences of the size of this spread are "
               "run-to-run noise, not effects of a protection.")
  unfit = lambda m: claims.get((m, "the protection converged"), {}).get("verdict") == "no"
  for r in (r for r in comp if r["family"] == "seed-averaged"):
    m = r["b"].split("/")[0]
    out.append(f"Seed-averaged (exploratory): {r['comparison']}: difference {r['mean_diff']:+.3f} (95 % CI "
               f"{r['ci_low']:+.3f} to {r['ci_high']:+.3f}, p = {tables.format_p(r['p_value'])})"
               + (f"; the protection did not converge (hallmark {claims[(m, 'the protection converged')]['value']:.2f}), "
                  "so this is no result about the method." if unfit(m) else "."))
  primary = {r["b"]: r for r in comp if r["family"] == "primary"}
  for r in (r for r in comp if r["family"] == "counter-measure"):
    m, regime = r["b"].split("/")
    std, own = primary.get(f"{m}/standard"), by[f"none/{regime}"]["dice_mean_mean"]
    c = claims[(r["b"], "the protection survives the counter-measure")]
    cost = by["none/standard"]["dice_mean_mean"] - own
    verdict = {"nothing to undo": "with no protection effect under standard training there is nothing for it to undo",
               "counter-measure too costly": f"the counter-measure itself costs the clean victim {cost:.2f} Dice, so "
                                             "this row cannot tell whether the protection survives it",
               "survives": "the protection survives it",
               "no effect left": "no significant protection effect is left"}[c["verdict"]]
    out.append(f"Counter-measure `{regime}` against `{m}` (exploratory, uncorrected): protection effect under it "
               f"{r['mean_diff']:+.3f} (CI {r['ci_low']:+.3f} to {r['ci_high']:+.3f}, p = "
               f"{tables.format_p(r['p_value'])})" + (f" vs {std['mean_diff']:+.3f} with standard training" if std
                                                      else "")
               + f"; clean-trained victim under it {own:.3f} (standard {by['none/standard']['dice_mean_mean']:.3f}): "
               f"{verdict}.")
  target = claims.get(("umed", "UMed makes the data unlearnable (the paper's claim)"))
  if target is not None:
    cost = [x for x in comp if x["family"] == "counter-measure"]
    if target["verdict"] != "met" and cost:
      regimes = sorted({x["a"].split("/")[1] for x in cost})
      own = "; ".join(f"{g}: {by[f'none/{g}']['dice_mean_mean']:.3f}" for g in regimes if f"none/{g}" in by)
      out.append("With no protection effect to undo, the counter-measure rows measure the counter-measures' own "
                 f"cost: the clean-trained victim scores {by['none/standard']['dice_mean_mean']:.3f} with standard "
                 f"training and {own} under the counter-measures; protected-data victims under a counter-measure "
                 "track the clean-data victim under the same counter-measure (the 'counter-measure' family rows).")
    out.insert(0, f"**UMed target check** (a UMed-protected victim clearly below the clean-trained one at PSNR >= 40 "
                  f"dB): Dice {by['umed/standard']['dice_mean_mean']:.3f} vs {by['none/standard']['dice_mean_mean']:.3f}"
                  f", PSNR {q['umed']['psnr_mean']:.1f} dB: "
                  + {"met": "MET.",
                     "no result": f"NO RESULT: UMed did not converge here (hallmark "
                                  f"{claims.get(('umed', 'the protection converged'), {}).get('value', float('nan')):.2f})"
                                  ", so this run says nothing about whether UMed makes the data unlearnable; the "
                                  "paper's drop (82 % -> 7 %) is not reproduced.",
                     "not met": "NOT MET: at this budget and training length the protection does not make the data "
                                "unlearnable here; the paper's drop (82 % -> 7 %) is not reproduced."}[target["verdict"]])
  out.extend(diagnosis(config, res, headline))
  out.append("Protections were trained and evaluated on the synthetic phantom, not BraTS: the numbers say whether "
             "the mechanism works on this data at this budget, not what it does on patients. One training run per "
             "victim (except the seed replicates): the spread between training runs is not in the CIs (they are over test "
             "cases)."
             if str(config.data.source) == "phantom" else
             "One training run per victim (except the seed replicates): the spread between training runs is not in "
             "the CIs (they are over test cases).")
  if n < 20:
    out.append(f"n = {n} < 20 test cases: every comparison here is exploratory.")
  return out


def write_report(config, workdir, res, headline, phase_map: dict | None = None) -> str:
  """Writes workdir/report.md from the result rows `res` (by `analysis.RESULT_TABLES` key), the headline and,
  given, the phase map's results; returns its path."""
  d, p, c, figs = config.data, config.protect, config.counter, figure_paths(workdir, res)
  vrows, qrows, comp, srows, wrows = (res[k] for k in ("victims", "quality", "comparisons", "shortcut", "sweep"))
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
  r.bullets(findings(config, res, headline))
  learnt_lib.report_table(r, headline["gate"], config.gate, "Clean-trained standard victim (test cases)")
  r.heading("Victims (clean-test Dice)")
  r.image(figs["dice"], "Dice vs method", base_dir=workdir)
  r.table(vrows, ["victim", "dice_mean_mean", "dice_mean_sd", "ci_low", "ci_high", "dice_WT_mean", "dice_TC_mean",
                  "dice_ET_mean"],
          caption="Mean Dice over WT, TC, ET per clean test case: mean, SD, bootstrap 95 % CI of the mean; per region.",
          headers={"dice_mean_mean": "Dice", "dice_mean_sd": "SD", "ci_low": "CI low", "ci_high": "CI high",
                   "dice_WT_mean": "WT", "dice_TC_mean": "TC", "dice_ET_mean": "ET"})
  if "partial" in figs:
    r.image(figs["partial"], "partial protection", base_dir=workdir)
  if srows:
    r.heading("Shortcut check: victims on their own training data")
    r.table(list(srows), ["victim", "train_protected_dice", "train_clean_dice", "gap"],
            caption="Mean Dice of each standard victim on the training cases it saw (protected) and on the same cases "
                    "without protection. A victim that learned the protection's shortcut has a large positive gap.",
            headers={"train_protected_dice": "Dice protected train", "train_clean_dice": "Dice clean train"})
  if wrows:
    r.heading(f"Budget sweep: {config.protect.sweep_method} (sanity check of the shortcut mechanism)")
    r.image(figs["sweep"], "budget sweep", base_dir=workdir)
    r.table(list(wrows), ["victim", "eps_255", "psnr", "dice", "ci_low", "ci_high", "drop", "drop_ci_low",
                          "drop_ci_high", "p_value"],
            caption="Victims trained on data protected at larger budgets (eps x 255), tested on clean data; drop = "
                    "clean-trained minus this victim (bootstrap 95 % CI, Wilcoxon p uncorrected: exploratory).",
            headers={"eps_255": "eps x 255", "psnr": "PSNR", "dice": "Dice", "ci_low": "CI low", "ci_high": "CI high",
                     "drop_ci_low": "drop CI low", "drop_ci_high": "drop CI high", "p_value": "p"},
            formats={"p_value": tables.format_p})
  r.heading("Imperceptibility and where the perturbation lies")
  r.table(qrows, ["method", "psnr_mean", "psnr_sd", "ssim_mean", "share_roi_mean", "share_band_mean",
                  "linf_scaled_mean", "contrast_alignment"],
          caption="Per training case, on [0, 1]-scaled intensities (each case and channel by its own max - min): PSNR "
                  "(dB, whole volume; 200 = identical), SSIM (mean over channels), share of sum |delta| inside the "
                  "tumour dilated by the band (ROI + band) and inside the contour band, largest |delta|; contrast "
                  "alignment: how many budgets the perturbation adds to the tumour-vs-brain contrast (0: none; "
                  "> 0: it makes the real feature stronger, the opposite of hiding it).",
          headers={"psnr_mean": "PSNR", "psnr_sd": "SD", "ssim_mean": "SSIM", "share_roi_mean": "share ROI+band",
                   "share_band_mean": "share band", "linf_scaled_mean": "L-inf",
                   "contrast_alignment": "contrast alignment"})
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
      "Protections: " + "; ".join(f"`{m}`: {protections.get(m).text}" for m in tuple(p.methods)) + ".",
      f"Surrogate and victims: U-Net features {tuple(config.model.features)}, {config.model.norm} norm; victims "
      f"{int(config.train.steps)} steps, batch {int(d.batch_size)}, AdamW lr {float(config.train.lr):g}, CE + Dice "
      "(*defaults chosen here*).",
      f"Min-min ({p.minmin.mode}-wise, Huang et al.'s schedule): rounds of {int(p.minmin.train_steps)} surrogate "
      f"steps (Adam lr {float(p.minmin.lr):g}) then a pass over every training slice of {int(p.minmin.pgd_steps)} "
      f"sign steps of {float(p.minmin.step_frac):g} eps on its noise (minimising CE + Dice), at most "
      f"{int(p.minmin.steps)} rounds; stops once the surrogate's class-balanced voxel accuracy on the protected "
      f"brain voxels >= {float(p.minmin.stop_accuracy):g} (stopped at round "
      f"{headline['protection_info'].get('minmin', {}).get('stopped_at', 'n/a')}; -1 = never) [rounds and lr "
      "*defaults chosen here*]. A protection whose hallmark ratio (surrogate CE protected / clean) ends above "
      f"{float(p.get('hallmark_max', 0.3)):g} is labelled not converged.",
      f"UMed: contour band width {int(p.umed.width)} (dilate - erode), CDC theta {float(p.umed.theta):g}, "
      f"perturbators lr {float(p.umed.lr):g}, surrogate updated every k = {int(p.umed.k)} steps (lr "
      f"{float(p.umed.surrogate_lr):g}), {int(p.umed.steps)} steps of which the first "
      f"{int(p.umed.get('surrogate_warmup', 0))} train the surrogate alone on clean slices (0: from scratch, as the "
      "paper), generators updated on the other k - 1 of every k steps only, texture clipped by standard LBP (>=), "
      f"perturbator U-Nets {tuple(p.umed.features)} [ref: theta 0.5, lr 1e-4, k 5, 7-voxel band kernel; the rest "
      "*defaults chosen here*].",
      "Random: random sign noise, +-eps x range on every brain voxel. Class-wise: one fixed random sign pattern "
      "per label class (background, necrosis, oedema, enhancing), +-eps x range where the label has that class "
      "(the classification literature's easiest shortcut; a sanity check of the mechanism).",
      (f"Budget sweep: `{p.sweep_method}` at eps = " + ", ".join(f"{float(e) * 255:.3g}/255" for e in p.sweep_eps)
       + " (standard victims) [*ours*]." if tuple(p.sweep_eps) else "No budget sweep."),
      (f"Training-seed replicates: standard victims of {tuple(config.replicates.methods)} retrained with seeds "
       f"{tuple(int(x) for x in config.replicates.seeds)} (besides train.seed = {int(config.train.seed)}) [*ours*]."
       if tuple(config.replicates.methods) else "No training-seed replicates."),
      f"Counter-measures: adversarial training ({c.adversarial.attack}, eps = {float(c.adversarial.eps_scaled):.4g} "
      f"scaled = {float(c.adversarial.eps_scaled) * 255:.3g}/255, mix ratio {float(c.adversarial.mix_ratio):g}); strong "
      f"augmentation (flips, gain +-{float(c.augment.scale):g}, offset +-{float(c.augment.shift):g}, Gaussian blur "
      f"sigma ~ U(0, {float(c.augment.blur_sigma):g}) w.p. {float(c.augment.blur_prob):g}); purification "
      f"(`{c.purify.kind}`: sigma {float(c.purify.sigma):g} / {int(c.purify.levels)} levels); transfer (a victim "
      f"U-Net {tuple(c.transfer.features)}, {c.transfer.norm} norm, {c.transfer.activation}, against the "
      f"surrogate's {tuple(config.surrogate.features)}, {config.surrogate.norm} norm, "
      f"{config.surrogate.activation}) [*defaults chosen here*].",
      f"Partial protection: {p.partial_method} on a random {tuple(float(f) for f in p.fractions)} share of the "
      "training cases, the rest clean.",
      "Dice: the BraTS convention (both empty -> 1, one empty -> 0) per region on whole test volumes.",
  ])
  folders = headline["protected_folders"]  # in protect.methods order (headline.json sorts its keys)
  nifti = [folders[m] for m in p.methods if m in folders]
  tfds_sets = [folders[f"{m} (tfds)"] for m in p.methods if f"{m} (tfds)" in folders]
  if nifti:
    r.paragraph("Protected training data as BraTS-2021-style NIfTI folders (float32 z-scored images, seg with ET = 4), "
                "readable with `--config.data.source=brats --config.data.root=<folder>`: "
                + ", ".join(f"`{v}`" for v in nifti) + ".")
  if tfds_sets:
    r.paragraph("The whole protected training splits as TFDS datasets (array_record volume records, the `brats` "
                "builder's layout), readable with `--config.data.source=tfds --config.data.tfds_name=<name> "
                "--config.data.data_dir=<workdir>/protected_tfds` or `tfds.data_source`: "
                + ", ".join(f"`{v}`" for v in tfds_sets) + ".")
  r.heading("Files")
  r.bullets(["`results/cells.csv`: every evaluation cell (victims on the test split; protection quality on the "
             "training split) as long-form rows.",
             "`results/victims.csv`, `results/quality.csv`, `results/comparisons.csv`, `results/per_case.csv`, "
             "`results/headline.json`; `results/claims.csv`: every verdict worded above (claim, statistic, value, "
             "threshold, verdict).",
             "`protect/<method>/`: the min-min and UMed fit runs; `models/<victim>/`: each victim's training run."])
  text = r.text()
  if phase_map is not None:
    text = text.rstrip("\n") + "\n" + "\n".join(phase_map_section(phase_map)) + "\n"
  path = os.path.join(workdir, "report.md")
  io_utils.write_text(path, text)
  return path


def phase_map_section(result: dict) -> list[str]:
  """The phase map's section of report.md (`phase_map.run`'s result, as results/phase_map.json holds it)."""
  axis = result["axis"].split(".")[-1]
  lines = ["", "## Phase map: where protections work", "",
           f"Victims trained on protected data, tested on clean data, across `{result['axis']}` (the data's "
           "difficulty) and the budget; drop = clean victim - protected victim, mean Dice of WT / TC / ET, 95 % "
           "bootstrap CI over test cases (one training run per point: exploratory).", "",
           "![phase map](phase_map/figures/phase_map.png)", "",
           f"| {axis} | budget | method | regions learnt | drop (95 % CI) | PSNR dB | hallmark |",
           "|---|---|---|---|---|---|---|"]
  for p in result["points"]:
    hm = "-" if p["hallmark"] is None else f"{p['hallmark']:.2f}" + ("" if p["converged"] else " (not converged)")
    regions = p.get("learnt_regions")
    learnt = "-" if regions is None else ", ".join(regions) or "none (drop over all three, no result)"
    lines.append(f"| {p['value']:g} | {p['eps'] * 255:.3g}/255 | {p['method']} | {learnt} | {p['drop']:+.3f} "
                 f"({p['drop_low']:+.3f}, {p['drop_high']:+.3f}) | {p['psnr']:.1f} | {hm} |")
  lines.append("")
  for m in result["methods"]:  # in config order, the budgets by data value (the JSON file sorts its keys)
    hits = sorted((float(v), e) for v, e in result["boundary"][m].items() if e is not None)
    lines.append(f"- `{m}`: " + ("; ".join(f"at {axis} {v:g}: from {e * 255:.3g}/255" for v, e in hits) if hits else
                                 "no point with a drop CI above 0.05 on this grid") + ".")
  return lines
