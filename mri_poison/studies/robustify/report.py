"""Study 2: report.md assembly."""
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
      f"Config variant `{config.variant}`; data source `{d.source}`; {headline['n_val']} validation volumes; "
      f"wall time {headline['wall_seconds']:.0f} s. Settings marked *default chosen here* are not given by "
      "the paper's abstract.")
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
                  "dice_mean_std", "drop_pct"],
          caption=f"Per-region mean Dice at eps = {ref:g} (every eps: results/summary.csv).",
          headers={"dice_WT_mean": "WT", "dice_TC_mean": "TC", "dice_ET_mean": "ET", "dice_mean_mean": "mean",
                   "dice_mean_std": "std", "drop_pct": "drop %"})
  r.heading("Wilcoxon signed-rank tests")
  mean_rows = [w for w in wil if w["region"] == "mean" and (w["eps"] == ref or w["attack"] == "clean")]
  r.table(mean_rows, ["comparison", "model_a", "attack", "eps", "mean_a", "mean_b", "median_diff", "p_value", "n"],
          caption=f"Mean Dice, eps = {ref:g} (per region and every eps: results/wilcoxon.csv). "
                  "`clean vs attack`: a = clean, b = attacked (diff > 0: the attack hurts). `X vs undefended`: "
                  "a = defence X, b = undefended model under the same attack (diff > 0: the defence helps).",
          formats={"p_value": tables.format_p})
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
    r.paragraph("Adversarial volumes and predictions as NIfTI with the case's affine: "
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
