"""Study 2: report.md assembly, with a generated "Findings and caveats" section (words from the numbers)."""
from __future__ import annotations

import math
import os

from mri_poison.data.datasets import describe_source
from mri_poison.defenses import adversarial as adv_lib
from mri_poison.report import markdown
from mri_poison.report import tables
from mri_poison.studies import learnt as learnt_lib
from mri_poison.attacks import zoo
from mri_poison.studies.robustify.evaluation import ADAPTIVE, NOISE, SOURCE, SUCCESS_COLUMNS, attack_text
from mri_poison.studies.robustify.training import MODELS, training_budgets

_VICTIM_TEXT = {"unet": "U-Net", "resenc_unet": "residual-encoder U-Net (`resenc_unet`)"}
PAPER = ("The paper's numbers (arXiv 1908.00656, on BraTS 2019 volumes, its own 3D U-Net and settings; not "
         "ours): FGSM / i-FGSM / targeted i-FGSM cut Dice by up to 65 %; defensive distillation did "
         "significantly better than adversarial training; no defence reached clean performance. It evaluates "
         "the distilled model only through its deployed softmax (T = 1).")


def _fmt_ci(v, low, high, digits=3) -> str:
  f = lambda x: tables.format_value(float(x), digits)
  return f"{f(v)} [{f(low)}, {f(high)}]"


def _p(p) -> str:
  return "nan" if p is None or (isinstance(p, float) and math.isnan(p)) else tables.format_p(p)


def write_report(config, workdir, res: dict, headline: dict, figs: dict, example: dict) -> None:
  """report.md from the study's tables `res` (summary, comparisons, robust, sanity, halving, masking,
  perceptibility, targeted, attacks_of, temperatures), headline numbers, figure paths and the example."""
  acfg, d, ecfg = config.attack, config.data, config.eval
  ref, n = headline["reference_eps"], int(headline["n_val"])
  summary, comparisons = res["summary"], res["comparisons"]
  r = markdown.Report("Study 2: gradient attacks and defences on a 3D U-Net")
  r.paragraph(
      "Reproduces the protocol of arXiv 1908.00656 (J Digit Imaging 2021) with the tools of this repository and "
      "evaluates it as a reviewer would: a 3D U-Net segments brain tumours from four MRI contrasts into four "
      "labels; it and two defences (defensive distillation, adversarial training) are attacked over a geometric "
      "budget grid up to collapse, each by several attacks, and judged by the per-volume worst case over them "
      "(the *adaptive* attack), with a few pre-declared primary comparisons Holm-corrected. "
      f"Config variant `{config.variant}`; data source `{d.source}`; {n} validation volumes. "
      f"Computing these results took {_cost_text(headline['cost'])}; this run took "
      f"{headline['wall_seconds']:.0f} s ({headline['cells_computed']} evaluation cells computed, the rest reused). "
      "Settings marked *default chosen here* are not given by the paper's abstract.")
  r.heading("Findings and caveats")
  r.bullets(findings(config, res, headline))

  learnt_lib.report_table(r, headline["gate"], config.gate, "Clean undefended model")

  r.heading("Headline: the adaptive attack")
  r.image(figs["adaptive"], "mean Dice vs eps under the adaptive attack", base_dir=workdir)
  halving = {h["model"]: h for h in res["halving"] if h["attack"] == ADAPTIVE}
  masking = {m["model"]: m for m in res["masking"]}
  rows = []
  for m in MODELS:
    s = next(x for x in summary if x["model"] == m and x["attack"] == ADAPTIVE and x["eps"] == ref)
    h = halving.get(m, {})
    rows.append({"model": m, "clean": headline["clean_dice"][m], "t1": masking[m]["dice_t1_best"],
                 "adaptive": s["dice_mean_mean"], "ci": f"[{s['dice_mean_ci_low']:.3f}, {s['dice_mean_ci_high']:.3f}]",
                 "drop": s["drop_pct"],
                 "half": _fmt_ci(h.get("eps_half", float("nan")), h.get("ci_low", float("nan")),
                                 h.get("ci_high", float("nan")))})
  r.table(rows, ["model", "clean", "t1", "adaptive", "ci", "drop", "half"], formats={"drop": lambda v: f"{v:.1f}"},
          caption=f"Mean Dice (average of the learnt regions over volumes) clean, under the strongest T = 1 CE attack "
                  f"(the paper's protocol: best mean of {', '.join(_deployed_ce(acfg))}) "
                  f"and under the adaptive attack at eps = {ref:g}; relative drop = 100 (1 - adaptive mean "
                  "Dice / clean mean Dice) of the same model; eps_1/2: the budget at which the adaptive mean Dice "
                  "curve halves (interpolated in log eps between grid points) with a bootstrap 95 % CI over cases "
                  "(inf: not reached on the grid).",
          headers={"t1": "T=1 CE attack", "adaptive": "adaptive", "ci": "adaptive 95 % CI", "drop": "drop %",
                   "half": "eps_1/2 [95 % CI]"})
  r.heading("Primary comparisons (pre-declared, Holm-corrected)", level=3)
  primary = [c for c in comparisons if c["family"] == "primary"]
  r.table(primary, ["comparison", "model_a", "attack", "eps", "mean_a", "mean_b", "mean_diff", "ci_low", "ci_high",
                    "p_value", "p_holm", "n", "n_effective"],
          caption="Mean Dice, paired by case (two-sided Wilcoxon signed-rank; zero differences dropped, "
                  "n_effective = cases left). `X vs undefended`: a = defence X, b = undefended model, both under "
                  "the adaptive attack (diff > 0: the defence helps). `clean vs attack`: a = clean, b = attacked "
                  "undefended model (diff > 0: the attack hurts). mean_diff with a percentile bootstrap 95 % CI; "
                  "p_holm: Holm over these rows only (one family). Every other test in results/wilcoxon.csv is "
                  "exploratory (uncorrected, p_holm empty).",
          formats={"p_value": tables.format_p, "p_holm": tables.format_p})
  r.paragraph(PAPER)

  r.heading("Protocol")
  steps, frac = int(acfg.steps), float(acfg.step_frac)
  adv = config.adversarial
  budgets = training_budgets(config)
  warm = str(config.distill.get("init", "scratch")) == "scaled_base"
  r.bullets([
      f"Data: {describe_source(d)}; 4 contrasts {tuple(d.modalities)}, z-scored per contrast inside the brain "
      f"mask (background 0), cropped to the brain and padded/cropped to {tuple(d.shape)}; labels "
      "0 background, 1 necrotic/non-enhancing core, 2 oedema, 3 enhancing tumour. "
      f"{n} validation cases split off by seed {int(d.seed)}.",
      f"Model: 3D {_VICTIM_TEXT.get(config.model.get('name', 'unet'), config.model.get('name'))}, features "
      f"{tuple(config.model.features)}, {config.model.norm} norm, "
      f"{config.model.dtype} (first layer {config.model.get('input_dtype', 'float32')}, so no perturbation is "
      f"rounded away); " + (f"deployed and attacked through Gaussian-blended sliding-window inference, window "
                            f"{tuple(ecfg.window) or tuple(d.patch_shape)}, overlap {float(ecfg.overlap):g}"
                            if bool(ecfg.get("sliding_window", False)) else "whole-volume prediction")
      + f". Training: batch {int(d.batch_size)}, AdamW lr {float(config.train.lr):g}, loss {config.train.loss} "
      "(*default chosen here*).",
      "Models (folders under `models/`) and their training budgets: " + "; ".join(
          f"`{name}`: {b}" for name, b in budgets.items()) + ". The undefended, distilled and adversarial "
      "models get the same number of fine-tuning steps after `base`, so a defence is not confounded with "
      "extra training.",
      f"Defensive distillation (T = {float(config.distill.temperature):g}, *default chosen here*): teacher "
      "trained on logits / T, student on the teacher's soft per-voxel probabilities at T (T^2-scaled CE), "
      "deployed at T = 1. " + (
          "Warm start (`distill.init = scaled_base`, *default chosen here*): teacher and student start from the "
          "base model with its output layer scaled by T, so their softmax at T equals the base model's at 1 "
          "and their deployed logits are about T times the base model's. The distilled model is therefore a "
          "fine-tuned copy of the base network with T-fold logits, not an independently trained one: its "
          "clean Dice stays near the base model's, and any robustness at T = 1 can come from the saturated "
          "softmax alone (see the masking diagnostics)." if warm else
          "Teacher and student are trained from scratch (`distill.init = scratch`)."),
      f"Adversarial training: {str(adv.attack).upper()} examples"
      + (" from a uniform random start" if str(adv.attack) == "pgd" else "")
      + f" ({int(adv.steps)} steps of {float(adv.step_frac):g} eps, eps = {float(adv.eps):g}, true labels) replace "
      f"{adv_lib.mix_ratio(adv):.0%} of every batch, made with the current weights; "
      + ("fine-tuned from the base model" if adv.init == "base" else "trained from scratch")
      + f" (*default chosen here*; training eps {'=' if float(adv.eps) == ref else '!='} the reference eps {ref:g}).",
      f"Attacks (L-inf, brain voxels only, true labels): eps grid {tuple(float(e) for e in acfg.eps)} "
      + ("in z-score units" if str(acfg.get('eps_mode', 'absolute')) == "absolute"
         else "as fractions of each case's per-channel intensity range over the brain")
      + f"; iterative attacks N = {steps} steps of alpha = {frac:g} eps; random-start attacks "
      f"{int(acfg.restarts)} restart(s); margin kappa = {float(acfg.get('margin_kappa', 0.0)):g}; target map "
      f"`{acfg.target}` (*defaults chosen here*; the paper names FGSM, i-FGSM and targeted i-FGSM).",
  ] + [f"`{a}`: {attack_text(a)}{_settings_text(a, acfg)}" for a in tuple(acfg.attacks) + (NOISE, ADAPTIVE)]
    + ([f"`transfer_model`'s source: `{acfg.transfer_model}`"] if "transfer_model" in acfg.attacks else []))
  r.paragraph(
      "Metric conventions: Dice on the BraTS regions WT = {1,2,3}, TC = {1,3}, ET = {3}; a region empty in both "
      "prediction and reference scores Dice 1, empty in exactly one scores 0 (the BraTS challenge convention; "
      "HD95 is not reported here, its empty-mask penalty would be 373 mm). Relative drop: 100 (1 - attacked "
      "mean Dice / clean mean Dice) of the same model over the same cases. Wilcoxon: two-sided signed-rank, "
      "paired by case, zero differences dropped; with n cases the smallest possible p is 2 / 2^n. Sample "
      "standard deviation over cases (n - 1); CIs: percentile bootstrap of the mean over cases.")

  r.heading("Dice under every attack")
  r.image(figs["dice"], "Dice vs eps", base_dir=workdir)
  srows = [x for x in summary if x["eps"] == ref or x["attack"] == "clean"]
  r.table(srows, ["model", "attack", "eps", "dice_WT_mean", "dice_TC_mean", "dice_ET_mean", "dice_mean_mean",
                  "dice_mean_std", "dice_mean_ci_low", "dice_mean_ci_high", "drop_pct"],
          caption=f"Per-region mean Dice at eps = {ref:g} (every eps: results/summary.csv). SD: sample standard "
                  "deviation over cases (n - 1); CI: 95 % percentile bootstrap of the mean; drop %: "
                  "100 (1 - attacked mean Dice / clean mean Dice) of the same model.",
          headers={"dice_WT_mean": "WT", "dice_TC_mean": "TC", "dice_ET_mean": "ET", "dice_mean_mean": "mean",
                   "dice_mean_std": "SD", "dice_mean_ci_low": "CI low", "dice_mean_ci_high": "CI high",
                   "drop_pct": "drop %"}, formats={"drop_pct": lambda v: f"{v:.1f}"})

  r.heading("What each attack adds to the adaptive threat", level=3)
  r.table(res["members"], ["model", "attack", "worst_fraction", "dice_alone", "mean_b", "mean_a", "mean_diff",
                           "ci_low", "ci_high", "p_value"],
          caption=f"At eps = {ref:g}, per model and attack: the share of volumes on which it is the adaptive "
                  "threat's worst, its own mean Dice, the adaptive mean Dice with every attack and without this "
                  "one, and their paired difference (> 0: this attack found lower Dice than all the others on "
                  "some volumes; bootstrap 95 % CI, Wilcoxon p; exploratory, uncorrected).",
          headers={"worst_fraction": "worst on", "dice_alone": "alone", "mean_b": "adaptive",
                   "mean_a": "without it", "mean_diff": "gain", "ci_low": "CI low", "ci_high": "CI high",
                   "p_value": "p"})

  r.heading("Budgets: where Dice halves, and how visible each budget is")
  r.table(res["halving"], ["model", "attack", "clean", "eps_half", "ci_low", "ci_high", "never_halved_fraction"],
          caption="eps_1/2: the budget at which the per-case-mean Dice curve (eps 0 = clean) falls to half the "
                  "clean mean, interpolated linearly in log eps between grid points (linearly below the first); "
                  "CI: 95 % percentile bootstrap over cases; never_halved_fraction: resamples whose curve does "
                  "not halve on the grid (inf).")
  pct = res["perceptibility"]
  pct_attack = "pgd" if any(p["attack"] == "pgd" for p in pct) else (pct[0]["attack"] if pct else "")
  prow = []
  for e in sorted({p["eps"] for p in pct}):
    a = next((p for p in pct if p["attack"] == pct_attack and p["eps"] == e), {})
    nz = next((p for p in pct if p["attack"] == NOISE and p["eps"] == e), {})
    prow.append({"eps": e, "psnr_attack": a.get("psnr", float("nan")), "ssim_attack": a.get("ssim", float("nan")),
                 "psnr_noise": nz.get("psnr", float("nan")), "ssim_noise": nz.get("ssim", float("nan"))})
  r.table(prow, ["eps", "psnr_attack", "ssim_attack", "psnr_noise", "ssim_noise"],
          caption=f"Perceptibility on the undefended model's volumes: PSNR (dB) and SSIM (mean over channels, "
                  f"Gaussian window) of the `{pct_attack}` and random-sign volumes against the clean volume, "
                  "data range = the clean volume's range; mean over cases (every attack: "
                  "results/perceptibility.csv).",
          headers={"psnr_attack": f"PSNR {pct_attack}", "ssim_attack": f"SSIM {pct_attack}",
                   "psnr_noise": "PSNR noise", "ssim_noise": "SSIM noise"})

  r.heading("Targeted attacks: did the must-change voxels change?")
  r.table([t for t in res["targeted"]],
          ["model", "attack", "eps"] + list(SUCCESS_COLUMNS) + ["tumour_left_clean"],
          caption=f"Target map `{acfg.target}`; mean over cases. reached: share of the voxels that must change "
                  "(target != label) predicted as their target; dice_target: mean Dice of the tumour classes "
                  "between prediction and target map (for `erase_tumour` the share of classes wiped out); "
                  "tumour_left: predicted tumour voxels / reference tumour voxels (tumour_left_clean: the same "
                  "on the clean volume). tumour_left counts tumour predicted anywhere in the brain: an attack on the "
                  "must-change voxels only can erase the true tumour while new false tumour appears elsewhere "
                  "(then reached and tumour_left both rise). `targeted_margin` optimises the must-change voxels "
                  "only; "
                  "`ifgsm_targeted` (when run) the CE over the whole brain, as the paper's.")

  r.heading("Masking diagnostics and sanity checks")
  r.table(res["masking"], ["model", "saturated_fraction", "zero_grad_fraction", "dice_t1_best", "dice_adaptive",
                           "t1_adaptive_gap", "dice_pgd", "dice_transfer", "max_eps", "dice_adaptive_max_eps",
                           "collapses", "ce_rose_fraction"],
          caption=f"At eps = {ref:g} unless stated. saturated_fraction: brain voxels whose float32 max softmax "
                  "probability is exactly 1 on the clean volume (CE gradients vanish there); zero_grad_fraction: "
                  "exactly-zero input gradients of CE; t1_adaptive_gap: strongest T = 1 CE attack minus adaptive "
                  "mean Dice (> 0: T = 1 attacks overstate robustness); dice_transfer < dice_pgd: the undefended "
                  "model's examples hurt more than the model's own gradient (masked gradient); collapses: "
                  f"adaptive mean Dice at the largest eps below {float(ecfg.get('collapse_dice', 0.1)):g}; "
                  "ce_rose_fraction: mean over untargeted direct attacks of the share of cases whose plain CE "
                  "rose from the clean input.")
  r.image(figs["ce"], "plain CE along each attack", base_dir=workdir)
  r.paragraph("Plain CE of the deployed model to the true labels along each attack (iterate 0: clean input; "
              "1..N: the iterates the attack took its gradient at; last: the returned volume), whatever loss the "
              "attack optimises (margin, SegPGD's moving weights, CE at T, target margin).")
  r.table([x for x in res["sanity"] if x["eps"] == ref],
          ["model", "attack", "loss", "loss_adv", "loss_noise", "beats_noise_fraction", "dice_adv", "dice_noise",
           "ce_gain", "ce_increased_fraction", "ce_monotone_fraction"],
          caption=f"Per model and attack (eps = {ref:g}; every eps: results/sanity.csv): the attack's loss (CE, "
                  "or target CE for targeted attacks) on its volumes vs on random sign noise of the same eps (an "
                  "attack must beat noise); ce_gain: plain CE on the attacked minus the clean volume; "
                  "ce_monotone_fraction: share of steps along which plain CE did not fall.")

  r.heading("Exploratory tests (uncorrected)")
  mean_rows = [w for w in comparisons if w["family"] == "exploratory" and w["region"] == "mean"
               and (w["eps"] == ref or w["attack"] == "clean") and w["comparison"] != "clean vs attack"]
  r.table(mean_rows, ["comparison", "attack", "eps", "mean_a", "mean_b", "mean_diff", "ci_low", "ci_high", "p_value",
                      "n_effective"],
          caption=f"Model comparisons under each single attack at eps = {ref:g} and on clean inputs, mean Dice "
                  "(per region, every eps and the attack-vs-clean tests: results/wilcoxon.csv). Uncorrected: read "
                  "as exploratory.",
          formats={"p_value": tables.format_p})
  r.heading("Robust fraction (3D AutoAttack-style)")
  r.table([x for x in res["robust"] if x["eps"] == ref],
          ["model", "eps", "attack", "threshold", "robust_alone", "robust_sequential"],
          caption=f"A volume is broken when its mean Dice < {float(ecfg.robust_factor):g} x the model's "
                  "clean mean Dice; `robust_sequential`: attacks run in order on the volumes still robust "
                  f"(eps = {ref:g}; every eps: results/robust_fraction.csv).")
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
      "`results/per_case.csv`: model, attack (with `adaptive` and its `worst_attack`), eps, case, Dice "
      "WT/TC/ET/mean, CE and target CE.",
      "`results/summary.csv`, `results/wilcoxon.csv` (column `family`: primary / exploratory), "
      "`results/halving_budget.csv`, `results/adaptive_members.csv`, `results/masking.csv`, "
      "`results/perceptibility.csv`, `results/targeted.csv`, "
      "`results/robust_fraction.csv`, `results/sanity.csv`, `results/headline.json`.",
      "`results/cells.csv`: every evaluation cell as long-form rows (victim, threat, budget, case, metric, value, "
      "cell key), including PSNR/SSIM, the plain-CE trajectory `ce_step<t>` and targeted success per case; the "
      "tables above are derived from it, and a rerun with more eps or attacks adds only new cells.",
      "`models/{base,undefended,teacher,distilled,adversarial}/`: checkpoints, config.json, metrics.jsonl of each "
      "model.",
      "`config.json`, `manifest.json`: the resolved config and the run's versions/devices.",
  ])
  r.write(os.path.join(workdir, "report.md"))


def _deployed_ce(acfg) -> list[str]:
  """The configured attacks on the deployed logits with a CE loss (the paper's protocol), in the zoo's order."""
  return [a for a in zoo.names() if a in acfg.attacks and zoo.get(a).deployed_ce]


def _settings_text(attack: str, acfg) -> str:
  """" (steps 3, step_frac 0.8)": the zoo entry's own settings, the ones its cells depend on."""
  if attack == ADAPTIVE:
    return ""
  settings = zoo.get(attack).settings(acfg, 1.0)
  shown = {k: v for k, v in settings.items() if k != "temperature"}  # the victim's, not the attack's
  return " (" + ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items()) + ")" \
      if shown else ""


def _cost_text(cost) -> str:
  train = sum(cost["train_seconds"].values())
  return f"{train + cost['eval_seconds']:.0f} s of compute ({train:.0f} s training, {cost['eval_seconds']:.0f} s evaluation)"


def gate_finding(gate) -> str:
  """One sentence on which regions the clean model learnt (and so carry results)."""
  kept, dropped = learnt_lib.learnt(gate), learnt_lib.not_learnt_text(gate)
  if not dropped:
    return f"The clean model learnt every region ({', '.join(kept)}); mean Dice averages all three."
  return (f"Not learnt, so no result: {dropped}."
          + (f" Every mean Dice, drop and test below averages {', '.join(kept)} only." if kept else ""))


def defence_verdict(c) -> str:
  """How a defence compares with the undefended model, from its primary comparison row."""
  if c["claimed"]:
    return f"significantly {'MORE' if c['mean_diff'] > 0 else 'LESS'} robust than"
  if c["p_holm"] < 0.05:
    return ("not clearly different from (the signed-rank test rejects, but the bootstrap CI of the mean "
            "difference includes 0)")
  return "not significantly different from"


def findings(config, res: dict, headline: dict) -> list[str]:
  """What the numbers do and do not support, in words (primary = Holm-corrected; the rest exploratory)."""
  ref, n = headline["reference_eps"], int(headline["n_val"])
  comparisons, masking = res["comparisons"], {m["model"]: m for m in res["masking"]}
  halving = {h["model"]: h for h in res["halving"] if h["attack"] == ADAPTIVE}
  primary = [c for c in comparisons if c["family"] == "primary"]
  out = [gate_finding(headline["gate"])]
  if not headline["learnt_regions"]:
    return out + ["No effect is claimed: the clean model learnt no tumour region, so every attack and defence "
                  "number in this report is exploratory (train longer or at a finer grid)."]
  desc = lambda c: (f"{c['mean_diff']:+.3f} [95 % CI {c['ci_low']:+.3f}, {c['ci_high']:+.3f}], Holm p = "
                    f"{_p(c['p_holm'])}, n = {c['n']} (effective {c['n_effective']})")

  attacks = [c for c in primary if c["comparison"] == "clean vs attack"]
  if attacks:
    hurt = [c["attack"] for c in attacks if c["claimed"] and c["mean_diff"] > 0]
    out.append(f"Attacks on the undefended model at eps = {ref:g} (clean minus attacked mean Dice): "
               + "; ".join(f"{c['attack']} {desc(c)}" for c in attacks) + ". "
               + (f"Significant after Holm correction, with a CI above 0: {', '.join(hurt)}." if hurt
                  else "None is significant after Holm correction with a CI above 0."))
  t1_und = masking.get(SOURCE, {}).get("dice_t1_best", float("nan"))
  for c in (c for c in primary if c["comparison"].endswith("vs undefended")):
    d = c["model_a"]
    text = (f"{d.capitalize()} under the adaptive attack at eps = {ref:g}: {defence_verdict(c)} the undefended model "
            f"(defence minus undefended mean Dice {desc(c)}).")
    t1_gain = masking[d]["dice_t1_best"] - t1_und
    if math.isfinite(t1_gain):
      text += (f" Judged only by the T = 1 CE attacks (the paper's protocol; exploratory) the difference of means "
               f"is {t1_gain:+.3f}")
      # "Disappears": a visible T = 1 advantage whose adaptive estimate is under half of it.
      masked = masking[d]["t1_adaptive_gap"] - masking[SOURCE]["t1_adaptive_gap"]
      if t1_gain > 0.01 and c["mean_diff"] < 0.5 * t1_gain:
        text += (f"; {d}'s advantage at T = 1 " + ("disappears" if c["mean_diff"] <= 0 else "mostly disappears")
                 + " under the adaptive attack"
                 + (f": its T = 1 attacks overstate its robustness by {masked:+.3f} more than the undefended "
                    "model's, the signature of gradient masking." if masked > 0.01 else "."))
      elif t1_gain > 0.01:
        text += f"; the advantage persists under the adaptive attack ({c['mean_diff']:+.3f})."
      else:
        text += "."
    clean = next((w for w in comparisons if w["comparison"] == f"{d} vs undefended" and w["attack"] == "clean"
                  and w["region"] == "mean"), None)
    if clean is not None:
      text += (f" Its clean mean Dice differs from the undefended model's by {clean['mean_diff']:+.3f} "
               f"[{clean['ci_low']:+.3f}, {clean['ci_high']:+.3f}] (exploratory, uncorrected p = "
               f"{_p(clean['p_value'])}).")
    out.append(text)
  if halving:
    parts = [f"{m} {_fmt_ci(h['eps_half'], h['ci_low'], h['ci_high'])}" for m, h in halving.items()]
    out.append("Budget at which the adaptive mean Dice halves (eps_1/2 [bootstrap 95 % CI over cases]): "
               + "; ".join(parts) + ". Non-overlapping CIs are a (descriptive) sign of a real difference in "
               "robustness; overlapping ones are not evidence of equality.")
  targeted = [t for t in res["targeted"] if float(t["eps"]) == ref]
  if targeted:
    out.append(f"Targeted (`{config.attack.target}`) at eps = {ref:g}: "
               + "; ".join(f"{t['model']} / {t['attack']}: {t['reached']:.0%} of the must-change voxels reached "
                           f"their target, tumour left {t['tumour_left']:.2f} (clean {t['tumour_left_clean']:.2f})"
                           for t in targeted) + " (descriptive).")
  pct = [p for p in res["perceptibility"] if p["attack"] == "pgd"]
  if pct:
    out.append("Perceptibility of PGD on the undefended model (PSNR dB / SSIM vs clean): "
               + ", ".join(f"eps {p['eps']:g}: {p['psnr']:.1f} / {p['ssim']:.2f}" for p in sorted(pct, key=lambda p: p["eps"]))
               + ".")
    h = halving.get(SOURCE, {}).get("eps_half", float("inf"))
    if math.isfinite(h):
      near = min(pct, key=lambda p: abs(math.log(p["eps"]) - math.log(h)))
      out[-1] += (f" Near the undefended model's eps_1/2 ({h:.2g}), at eps {near['eps']:g}, PGD volumes have SSIM "
                  f"{near['ssim']:.2f} against the clean ones: "
                  + ("the perturbation that halves Dice is clearly visible in the image statistics."
                     if near["ssim"] < 0.9 else "the perturbation that halves Dice is hard to see."))
  sat = [f"{m} {mm['saturated_fraction']:.0%}" for m, mm in masking.items()]
  gaps = [f"{m} {mm['t1_adaptive_gap']:+.3f}" for m, mm in masking.items()]
  transfer = [m for m, mm in masking.items() if mm["dice_transfer"] < mm["dice_pgd"]]
  floor = float(config.eval.get("collapse_dice", 0.1))
  never = [m for m, mm in masking.items() if not mm["dice_clean"] >= 2 * floor]
  collapse = [m for m, mm in masking.items() if not mm["collapses"] and m not in never]
  out.append("Gradient masking: saturated-softmax share of brain voxels " + ", ".join(sat)
             + f"; T = 1 CE attack minus adaptive mean Dice at eps = {ref:g}: " + ", ".join(gaps)
             + ". " + (f"Transfer from the undefended model hurts more than the model's own PGD for: "
                       f"{', '.join(transfer)} (its own gradient is masked)." if transfer
                       else "Transfer never beats the direct PGD attack.")
             + " " + (f"The adaptive attack does not drive Dice near 0 at eps = {max(float(e) for e in config.attack.eps):g} "
                      f"for: {', '.join(collapse)} (either true robustness or an attack too weak: check the "
                      "trajectories)." if collapse else
                      f"Every model collapses (adaptive mean Dice < {floor:g}) at eps = "
                      f"{max(float(e) for e in config.attack.eps):g}: no model is robust to large budgets."
                      if not never else "")
             + (f" No collapse is claimed for {', '.join(never)}: clean mean Dice below {2 * floor:g}, twice the "
                "collapse level." if never else ""))
  n_primary = len(primary)
  best_p = min(1.0, n_primary * 2.0 / 2 ** n) if n else 1.0
  out.append(
      f"Statistics: n = {n} validation cases; {n_primary} pre-declared primary comparisons, Holm-corrected as one "
      f"family (smallest attainable corrected p about {best_p:.2g}); every other test (per region, other eps, "
      "single attacks, distilled vs adversarial) is exploratory and uncorrected."
      + (" With n < 20 the conclusions above are exploratory whatever their p (the study's bar is n >= 20)."
         if n < 20 else ""))
  if str(config.distill.get("init", "scratch")) == "scaled_base":
    out.append("Distillation warm start: the teacher and the student start from the base model with logits x T, "
               "so the distilled model is the base network fine-tuned at T with T-fold deployed logits; its "
               "clean Dice and its saturated softmax both follow from that start, not from distillation alone.")
  out.append(
      "Data: " + (f"{describe_source(config.data)}, at a small grid with a small model and few training steps; these numbers "
                  "show how the attacks and defences behave in this pipeline, not how robust a BraTS-trained "
                  "segmenter is (run the `brats` variant for that). The paper's numbers are on BraTS and are "
                  "quoted as the paper's, not reproduced here."
                  if str(config.data.source) == "phantom" else f"{describe_source(config.data)}."))
  return out
