"""Study 2: report.md assembly, with a generated "Findings and caveats" section."""
from __future__ import annotations

import os


from mri_poison.report import markdown
from mri_poison.report import tables
from mri_poison.studies.robustify.evaluation import ATTACK_TEXT, NOISE
from mri_poison.studies.robustify.training import MODELS


# ------------------------------------------------------------------------------------------------ report.md


def write_report(config, workdir, summary, wil, robust, sanity_rows, headline, dice_fig, example) -> None:
  acfg, d = config.attack, config.data
  ref = headline["reference_eps"]
  attacks = tuple(acfg.attacks) + (NOISE,)
  r = markdown.Report("Study 2: gradient attacks and defences on a 3D U-Net")
  r.paragraph(
      "Reproduces the protocol of arXiv 1908.00656 (J Digit Imaging 2021) with the tools of this repository: "
      "a 3D U-Net segments brain tumours from four MRI contrasts into four labels; it is attacked with "
      "gradient attacks of growing budget, and two defences (defensive distillation, adversarial training) are "
      "compared with the undefended model by paired Wilcoxon signed-rank tests. "
      f"Config variant `{config.variant}`; data source `{d.source}`; {headline['n_val']} validation volumes. "
      f"Computing these results took {_cost_text(headline['cost'])}; this run took "
      f"{headline['wall_seconds']:.0f} s ({headline['cells_computed']} evaluation cells computed, the rest reused). "
      "Settings marked *default chosen here* are not given by the paper's abstract.")
  r.heading("Findings and caveats")
  r.bullets(findings(config, summary, wil, headline))
  r.heading("Headline")
  clean = headline["clean_dice"]
  rows = []
  for m in MODELS:
    row = {"model": m, "clean": clean[m]}
    row.update(headline["dice_at_reference_eps"][m])
    rows.append(row)
  r.table(rows, ["model", "clean"] + list(attacks),
          caption=f"Mean Dice (average of WT, TC, ET over volumes), clean and under each attack at eps = {ref:g}.")
  r.paragraph(
      "Equal training budget: a base model is trained first; the undefended, distilled and adversarially trained "
      "models each continue from it for the same number of fine-tuning steps (plain loss, distillation at T, "
      "adversarial batches), so differences between them are the defences', not extra training.")
  r.heading("Protocol")
  steps, frac = int(acfg.steps), float(acfg.step_frac)
  adv = config.adversarial
  r.bullets([
      f"Data: `{d.source}` volumes, 4 contrasts {tuple(d.modalities)}, z-scored per contrast inside the brain "
      f"mask (background 0), cropped to the brain and padded/cropped to {tuple(d.shape)}; labels "
      "0 background, 1 necrotic/non-enhancing core, 2 oedema, 3 enhancing tumour. "
      f"{int(d.n_val)} validation cases split off by seed {int(d.seed)}.",
      f"Model: 3D U-Net, features {tuple(config.model.features)}, {config.model.norm} norm, "
      f"{config.model.dtype}; whole-volume prediction. Training: {int(config.train.steps)} steps, batch "
      f"{int(d.batch_size)}, AdamW lr {float(config.train.lr):g}, loss {config.train.loss} (*default chosen here*).",
      f"Defensive distillation: teacher trained with its logits divided by T = {float(config.distill.temperature):g}; "
      "student trained at T on the teacher's soft per-voxel probabilities at T (T^2-scaled cross-entropy), "
      "deployed at T = 1 [paper: distillation; T *default chosen here*]. "
      + ("Teacher and student start from the base model with its output layer scaled by T (the same "
         "softmax at T), then train at T (*default chosen here*: from scratch, short runs never grow the "
         "logits T-fold)." if str(config.distill.get("init", "scratch")) == "scaled_base"
         else "Teacher and student are trained from scratch."),
      f"Adversarial training: {adv.attack.upper()} examples (true labels, eps = {float(adv.eps):g}) replace "
      f"{float(adv.ratio):.0%} of every batch, made with the current weights; "
      + ("fine-tuned from the base model" if adv.init == "base" else "trained from scratch")
      + " (*default chosen here*).",
      f"Attacks (L-inf, z-score units, brain voxels only, true labels): eps grid {tuple(eps for eps in acfg.eps)}; "
      f"iterative attacks N = {steps} steps of alpha = {frac:g} eps; PGD-type attacks with a random start and "
      f"{int(acfg.restarts)} restart(s); targeted i-FGSM target `{acfg.target}` (*defaults chosen here*; the paper "
      "names FGSM, i-FGSM and targeted i-FGSM).",
  ] + [f"`{a}`: {ATTACK_TEXT[a]}" for a in attacks])
  r.paragraph(
      "Metric conventions: Dice on the BraTS regions WT = {1,2,3}, TC = {1,3}, ET = {3}; a region empty in both "
      "prediction and reference scores Dice 1, empty in exactly one scores 0 (the BraTS challenge convention; "
      "HD95 is not reported here, its empty-mask penalty would be 373 mm). Wilcoxon: two-sided signed-rank, "
      "paired by case, zero differences dropped (scipy's default); with n cases the smallest possible p is "
      "2 / 2^n, so a * (p < 0.05) needs n >= 6.")
  r.heading("Dice under attack")
  r.image(dice_fig, "Dice vs eps", base_dir=workdir)
  srows = [x for x in summary if x["eps"] == ref or x["attack"] == "clean"]
  r.table(srows, ["model", "attack", "eps", "dice_WT_mean", "dice_TC_mean", "dice_ET_mean", "dice_mean_mean",
                  "dice_mean_std", "dice_mean_ci_low", "dice_mean_ci_high", "drop_pct"],
          caption=f"Per-region mean Dice at eps = {ref:g} (every eps: results/summary.csv). SD: sample standard "
                  "deviation over cases (n - 1); CI: 95 % percentile bootstrap of the mean; drop %: "
                  "100 (1 - attacked mean Dice / clean mean Dice) of the same model.",
          headers={"dice_WT_mean": "WT", "dice_TC_mean": "TC", "dice_ET_mean": "ET", "dice_mean_mean": "mean",
                   "dice_mean_std": "SD", "dice_mean_ci_low": "CI low", "dice_mean_ci_high": "CI high",
                   "drop_pct": "drop %"})
  r.heading("Wilcoxon signed-rank tests")
  mean_rows = [w for w in wil if w["region"] == "mean" and (w["eps"] == ref or w["attack"] == "clean")]
  r.table(mean_rows, ["comparison", "model_a", "attack", "eps", "mean_a", "mean_b", "mean_diff", "ci_low", "ci_high",
                      "p_value", "p_holm", "n", "n_effective"],
          caption=f"Mean Dice, eps = {ref:g} (per region and every eps: results/wilcoxon.csv). mean_diff = mean of "
                  "a - b with its 95 % bootstrap CI; p_holm: Holm-corrected over every test on the same region in "
                  "results/wilcoxon.csv; n_effective: cases with a non-zero difference. "
                  "`clean vs attack`: a = clean, b = attacked (diff > 0: the attack hurts). `X vs undefended`: "
                  "a = defence X, b = undefended model under the same attack (diff > 0: the defence helps).",
          formats={"p_value": tables.format_p, "p_holm": tables.format_p})
  r.heading("Robust fraction (3D AutoAttack-style)")
  r.table([x for x in robust if x["eps"] == ref],
          ["model", "eps", "attack", "threshold", "robust_alone", "robust_sequential"],
          caption=f"A volume is broken when its mean Dice < {float(config.eval.robust_factor):g} x the model's "
                  "clean mean Dice; `robust_sequential`: attacks run in order on the volumes still robust "
                  f"(eps = {ref:g}; every eps: results/robust_fraction.csv).")
  r.heading("Sanity checks")
  r.table([x for x in sanity_rows if x["eps"] == ref],
          ["model", "attack", "loss", "zero_grad_fraction", "loss_adv", "loss_noise", "beats_noise_fraction",
           "dice_adv", "dice_noise", "loss_increased_fraction", "monotone_fraction"],
          caption="Per model and attack (eps = " + f"{ref:g}" + "): fraction of exactly-zero input gradients of "
                  "the CE loss on clean volumes (gradient masking shows up here), the attack's loss on its "
                  "adversarial volumes vs on random sign noise of the same eps (an attack must beat noise), "
                  "and whether the loss went the right way over the iterations.")
  r.heading("Example")
  r.image(example["figure"], "example slice", base_dir=workdir)
  r.paragraph(
      f"Case {example['case']}, {example['attack']} at eps = {example['eps']:g} on the undefended model (largest "
      f"|perturbation| {example['linf']:.3g}). Panels: clean FLAIR, adversarial FLAIR, perturbation x10, "
      "ground truth, clean and adversarial predictions (red: necrotic core, green: oedema, yellow: enhancing).")
  if example["volumes"]:
    r.paragraph("Clean (preprocessed) and adversarial volumes and both predictions as NIfTI with the case's "
                "affine; the header's description field gives the channel order (images) or the label codes: "
                + ", ".join(f"`{os.path.relpath(p, workdir)}`" for p in example["volumes"]) + ".")
  r.heading("Files")
  r.bullets([
      "`results/per_case.csv`: model, attack, eps, case, Dice WT/TC/ET/mean, CE and target CE.",
      "`results/summary.csv`, `results/wilcoxon.csv`, `results/robust_fraction.csv`, `results/sanity.csv`, "
      "`results/headline.json`.",
      "`results/cells.csv`: every evaluation cell as long-form rows (victim, threat, budget, case, metric, value, "
      "cell key); the tables above are derived from it, and a rerun with more eps or attacks adds only new cells.",
      "`models/{base,undefended,teacher,distilled,adversarial}/`: checkpoints, config.json, metrics.jsonl of each "
      "model.",
      "`config.json`, `manifest.json`: the resolved config and the run's versions/devices.",
  ])
  r.write(os.path.join(workdir, "report.md"))


def _cost_text(cost) -> str:
  train = sum(cost["train_seconds"].values())
  return f"{train + cost['eval_seconds']:.0f} s of compute ({train:.0f} s training, {cost['eval_seconds']:.0f} s evaluation)"


def findings(config, summary, wil, headline) -> list[str]:
  """What the numbers at the reference eps do and do not support, in words (corrected tests only)."""
  ref, n = headline["reference_eps"], int(headline["n_val"])
  mean_rows = [w for w in wil if w["region"] == "mean"]
  n_tests = sum(1 for w in wil if w["region"] == "mean")
  best_p = min(1.0, n_tests * 2.0 / 2 ** n) if n else 1.0
  out = []

  def listing(rows, label):
    parts = [f"{label(w)} {w['mean_diff']:+.3f} [{w['ci_low']:+.3f}, {w['ci_high']:+.3f}]" for w in rows]
    sig = [label(w) for w in rows if w["p_holm"] < 0.05]
    up = [label(w) for w in rows if w["ci_low"] > 0 and w["p_holm"] >= 0.05]
    down = [label(w) for w in rows if w["ci_high"] < 0 and w["p_holm"] >= 0.05]
    return ("; ".join(parts) + ". Significant after Holm correction: " + (", ".join(sig) or "none")
            + (". CI above 0 but not significant (exploratory): " + ", ".join(up) if up else "")
            + (". CI below 0 but not significant (exploratory): " + ", ".join(down) if down else "") + ".")

  attacked = [w for w in mean_rows if w["comparison"] == "clean vs attack" and w["model_a"] == "undefended"
              and w["eps"] == ref]
  if attacked:
    out.append(f"Attacks on the undefended model at eps = {ref:g}, clean minus attacked mean Dice [95 % CI]: "
               + listing(attacked, lambda w: w["attack"]))
  for model in sorted({w["model_a"] for w in mean_rows if w["comparison"].endswith("vs undefended")}):
    rows = [w for w in mean_rows if w["comparison"] == f"{model} vs undefended" and w["eps"] in (ref, 0.0)
            and w["attack"] != "random_sign"]
    out.append(f"{model.capitalize()} minus undefended mean Dice [95 % CI] on clean inputs and under each attack "
               f"at eps = {ref:g}: " + listing(rows, lambda w: w["attack"]))
  out.append(
      f"Sample size: n = {n} validation cases. With {n_tests} mean-Dice tests corrected together, the smallest "
      f"attainable Holm-corrected p is about {best_p:.2g}"
      + (" (above 0.05, so no comparison can be significant: read every difference above as exploratory)"
         if best_p >= 0.05 else "; results below that power are exploratory")
      + ("; percentile-bootstrap CIs from fewer than 10 cases are too narrow." if n < 10 else "."))
  out.append(
      "Data: " + ("procedural phantom heads at a small grid with a small model and few training steps; these numbers "
                  "show how the attacks and defences behave in this pipeline, not how robust a BraTS-trained "
                  "segmenter is. Run the `brats` variant on real data for that."
                  if str(config.data.source) == "phantom" else f"source `{config.data.source}`."))
  out.append(
      "Defensive distillation is attacked through its deployed softmax at T = 1, where its outputs saturate; a "
      "Dice advantage under these attacks may be gradient masking rather than robustness (the zero-gradient "
      "fraction in the sanity table is a first check; an adaptive attack at the training temperature is the "
      "real test).")
  clean = [r for r in summary if r["attack"] == "clean"]
  worst = min((r for r in summary if r["attack"] != "clean"), key=lambda r: r["dice_mean_mean"], default=None)
  if worst is not None and clean:
    out.append(f"Largest budget effect: {worst['model']} under {worst['attack']} at eps = {worst['eps']:g} has "
               f"mean Dice {worst['dice_mean_mean']:.3f} ({worst['drop_pct']:.0f} % below its clean Dice)"
               + ("; the grid does not reach collapse (Dice near 0), so larger budgets are untested."
                  if worst["dice_mean_mean"] > 0.1 else "."))
  return out
