"""Study 4: tables, statistics, figures and report.md, all derived from the evaluation cells."""
from __future__ import annotations

import os

import numpy as np

from mri_poison import io_utils
from mri_poison import metrics
from mri_poison.data.case import REGIONS
from mri_poison.data.preprocess import brain_mask
from mri_poison.ops import morphology
from mri_poison.poison import protections
from mri_poison.report import figures
from mri_poison.report import markdown
from mri_poison.report import tables
from mri_poison.studies import learnt as learnt_lib

PAPER = {"psnr_db": 50.03, "dsc_clean_pct": 82.18, "dsc_protected_pct": 6.80}
# A counter-measure that lowers the clean-trained victim by more than this (mean Dice) is no fair test of a
# protection: protected victims fall with it [ours].
COUNTER_COST_MAX = 0.1


def victim_kind(name: str) -> str:
  """"seed" (a replicate of a standard victim with another training seed), "sweep", "partial" or "main"."""
  if "@seed=" in name:
    return "seed"
  if "@eps=" in name:
    return "sweep"
  return "partial" if "@" in name else "main"


def _ci(values, seed=0):
  ci = metrics.bootstrap_ci(values, n_boot=2000, seed=seed)
  return ci["low"], ci["high"]


def victim_rows(table, cells, plan, test_ids) -> list[dict]:
  rows = []
  for name, method, regime, fraction, eps in plan:
    row = {"victim": name, "method": method, "regime": regime, "fraction": fraction, "eps": eps}
    for m in ("dice_WT", "dice_TC", "dice_ET", "dice_mean"):
      v = table.values(cells[name], m, test_ids)
      row[f"{m}_mean"], row[f"{m}_sd"] = float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0
    row["ci_low"], row["ci_high"] = _ci(table.values(cells[name], "dice_mean", test_ids))
    rows.append(row)
  return rows


def quality_rows(table, names, train_ids, quality_cells) -> list[dict]:
  rows = []
  for m in names:
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
    for m in (m for m in methods[1:] if f"{m}/{regime}" in names):
      add("counter-measure", f"none/{regime}", f"{m}/{regime}", f"{regime}: clean-trained minus {m}-trained")
      add("recovery", f"{m}/{regime}", f"{m}/standard", f"{m}: {regime} minus standard training")
  for n in sorted(x for x in names if victim_kind(x) == "partial"):
    add("partial", "none/standard", n, f"clean-trained minus {n}")
  for n in sorted(x for x in names if victim_kind(x) == "sweep"):
    add("sweep", "none/standard", n, f"clean-trained minus {n}")
  # Seed-averaged: each test case's Dice averaged over a victim's training seeds (standard + its replicates)
  replicas = lambda m: [f"{m}/standard"] + sorted(x for x in names if x.startswith(f"{m}/standard@seed="))
  if len(replicas("none")) > 1:
    for m in methods[1:]:
      if len(replicas(m)) > 1:
        a = np.mean([dice(x) for x in replicas("none")], axis=0)
        b = np.mean([dice(x) for x in replicas(m)], axis=0)
        r = metrics.paired_comparison(a, b)
        out.append({"family": "seed-averaged", "comparison": f"clean-trained minus {m}-trained, per-case Dice "
                    f"averaged over {len(replicas('none'))} / {len(replicas(m))} training seeds",
                    "a": f"none/standard x{len(replicas('none'))} seeds",
                    "b": f"{m}/standard x{len(replicas(m))} seeds", **r})
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
    sel = {r["method"]: r for r in rows if r["regime"] == regime and victim_kind(r["victim"]) == "main"}
    xs = np.arange(len(methods)) + (j - (len(regimes) - 1) / 2) * width
    means = [sel[m]["dice_mean_mean"] if m in sel else np.nan for m in methods]
    err = [sel[m]["dice_mean_sd"] if m in sel else 0.0 for m in methods]
    ax.bar(xs, means, width, yerr=err, capsize=2, label=regime)
  ax.set_xticks(np.arange(len(methods)))
  ax.set_xticklabels(methods)
  ax.set_ylabel("clean-test mean Dice (WT, TC, ET)")
  ax.set_ylim(0, 1.25)  # headroom: the legend sits above the bars
  ax.legend(title="victim training", fontsize=7, ncol=len(regimes), loc="upper center")
  ax.set_title("Victims trained on protected data, tested on clean data (mean +- SD)")
  return figures.save_figure(fig, path)


def partial_figure(rows, method, path) -> str:
  import matplotlib.pyplot as plt
  pts = sorted([(0.0, r) for r in rows if r["victim"] == "none/standard"]
               + [(r["fraction"], r) for r in rows if r["method"] == method and r["regime"] == "standard"
                  and victim_kind(r["victim"]) in ("main", "partial")],
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


def shortcut_rows(table, shortcut_cells, plan, train_ids) -> list[dict]:
  """Per standard victim: Dice on the protected training data it saw vs on the same cases unprotected."""
  rows = []
  for name, method, *_ in plan:
    if (name, "train_protected") not in shortcut_cells:
      continue
    row = {"victim": name, "method": method}
    for split in ("train_protected", "train_clean"):
      cell = shortcut_cells[(name, split)]
      row[f"{split}_dice"] = float(np.mean(table.values(cell, "dice_mean", train_ids)))
    row["gap"] = row["train_protected_dice"] - row["train_clean_dice"]
    rows.append(row)
  return rows


def sweep_rows(vrows, qrows, comp, config) -> list[dict]:
  """The budget sweep (config protect.sweep_eps of protect.sweep_method) beside the clean-trained victim."""
  p = config.protect
  method = str(p.sweep_method)
  q = {r["method"]: r for r in qrows}
  c = {r["b"]: r for r in comp if r["family"] in ("primary", "sweep")}
  rows = []
  for r in vrows:
    if r["method"] != method or r["regime"] != "standard" or victim_kind(r["victim"]) not in ("main", "sweep"):
      continue
    name = r["victim"].split("/")[0]
    if name not in q or r["victim"] not in c:
      continue
    cr = c[r["victim"]]
    rows.append({"victim": r["victim"], "eps": r["eps"], "eps_255": r["eps"] * 255, "psnr": q[name]["psnr_mean"],
                 "dice": r["dice_mean_mean"], "ci_low": r["ci_low"], "ci_high": r["ci_high"],
                 "drop": cr["mean_diff"], "drop_ci_low": cr["ci_low"], "drop_ci_high": cr["ci_high"],
                 "p_value": cr["p_value"]})
  return sorted(rows, key=lambda r: r["eps"])


def sweep_figure(rows, clean_dice, method, path) -> str:
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(4.2, 3.2))
  e = [r["eps_255"] for r in rows]
  ax.semilogx(e, [r["dice"] for r in rows], "o-", base=2, label=f"{method}-protected victim")
  ax.fill_between(e, [r["ci_low"] for r in rows], [r["ci_high"] for r in rows], alpha=0.25)
  ax.axhline(clean_dice, color="k", ls="--", lw=0.8, label="clean-trained victim")
  for r in rows:
    ax.annotate(f"{r['psnr']:.0f} dB", (r["eps_255"], r["dice"]), fontsize=7, xytext=(3, -10),
                textcoords="offset points")
  ax.set_xlabel("budget eps x 255 (on [0, 1]-scaled intensities)")
  ax.set_ylabel("clean-test mean Dice")
  ax.set_ylim(0, 1)
  ax.legend(fontsize=7)
  return figures.save_figure(fig, path)


def clean_gate(config, clean, test: dict, train_cases) -> list[dict]:
  """The gate (config.gate) on a clean-trained victim's per-case Dice `clean` (n, 3) on the test arrays."""
  return learnt_lib.gate_regions(config.gate, clean, test["label"], val_images=test["image"],
                                 val_brains=brain_mask(test["image"]),
                                 train_cases=[(c.image, c.label, brain_mask(c.image)) for c in train_cases])


def finish(config, workdir, table, cells, plan, methods, train_ids, test, protected, train_cases, data, info,
           written, *, quality_cells, shortcut_cells, timings) -> dict:
  results, fig_dir = os.path.join(workdir, "results"), os.path.join(workdir, "figures")
  p = config.protect
  regimes = tuple(config.counter.regimes)
  test_ids = list(test["case_id"])
  # The gate: regions the clean-trained standard victim learnt; every mean Dice below averages those only.
  clean = np.stack([table.values(cells["none/standard"], f"dice_{r}", test_ids) for r in REGIONS], axis=1)
  gate = clean_gate(config, clean, test, train_cases)
  io_utils.write_csv(os.path.join(results, "gate.csv"), gate)
  table = learnt_lib.LearntDiceView(table, learnt_lib.learnt(gate))
  vrows = victim_rows(table, cells, plan, test_ids)
  qrows = quality_rows(table, list(quality_cells), train_ids, quality_cells)
  for row in qrows:  # derived from the protected volumes (not a cell): cheap, and re-derived on every run
    eps_m = next((e for n, m, _, _, e in plan if n.split("/")[0] == row["method"]), float(p.eps))
    row["contrast_alignment"] = contrast_alignment(train_cases, protected[row["method"]], eps_m)
  comp = comparisons(table, cells, plan, methods, regimes, test_ids)
  srows = shortcut_rows(table, shortcut_cells, plan, train_ids)
  wrows = sweep_rows(vrows, qrows, comp, config) if tuple(p.sweep_eps) else []
  per_case = [dict(victim=n, case=c, **{m: float(table.values(cells[n], m, [c])[0])
                                        for m in ("dice_WT", "dice_TC", "dice_ET", "dice_mean")})
              for n, *_ in plan for c in test_ids]
  io_utils.write_csv(os.path.join(results, "per_case.csv"), per_case)
  io_utils.write_csv(os.path.join(results, "victims.csv"), vrows)
  io_utils.write_csv(os.path.join(results, "quality.csv"), qrows)
  io_utils.write_csv(os.path.join(results, "comparisons.csv"), comp)
  io_utils.write_csv(os.path.join(results, "shortcut.csv"), srows)
  if wrows:
    io_utils.write_csv(os.path.join(results, "sweep.csv"), wrows)
  width = int(p.umed.width)
  figs = {"dice": dice_figure(vrows, methods, regimes, os.path.join(fig_dir, "dice_vs_method.png")),
          "example": example_figure(train_cases, protected, methods, width, os.path.join(fig_dir, "example.png"))}
  by = {r["victim"]: r for r in vrows}
  if any(victim_kind(r["victim"]) == "partial" for r in vrows):
    figs["partial"] = partial_figure(vrows, str(p.partial_method), os.path.join(fig_dir, "partial.png"))
  if wrows:
    figs["sweep"] = sweep_figure(wrows, by["none/standard"]["dice_mean_mean"], str(p.sweep_method),
                                 os.path.join(fig_dir, "sweep.png"))
  q = {r["method"]: r for r in qrows}
  headline = {
      "gate": gate, "learnt_regions": list(learnt_lib.learnt(gate)),
      "n_test": len(test_ids), "n_train": len(train_ids), "n_train_slices": int(np.shape(data["image"])[0]),
      "dice": {n: {"mean": r["dice_mean_mean"], "sd": r["dice_mean_sd"], "ci": [r["ci_low"], r["ci_high"]]}
               for n, r in by.items()},
      "psnr_db": {m: q[m]["psnr_mean"] for m in q},
      "primary": [{k: r[k] for k in ("b", "mean_diff", "ci_low", "ci_high", "p_value", "p_holm", "n_effective")}
                  for r in comp if r["family"] == "primary"],
      "shortcut": {r["victim"]: {k: r[k] for k in ("train_protected_dice", "train_clean_dice", "gap")} for r in srows},
      "sweep": [{k: r[k] for k in ("eps", "psnr", "dice", "drop", "drop_ci_low", "drop_ci_high", "p_value")}
                for r in wrows],
      "tumour_contrast_over_eps": tumour_contrast(train_cases, float(p.eps)),
      "contrast_alignment": {r["method"]: r["contrast_alignment"] for r in qrows},
      "protection_info": info, "protected_folders": written, **timings,
  }
  io_utils.write_json(os.path.join(results, "headline.json"), headline)
  write_report(config, workdir, vrows, qrows, comp, figs, headline, srows, wrows)
  return headline


def _verdict(r) -> str:
  if r["ci_low"] > 0 and r.get("p_holm", r["p_value"]) < 0.05:
    return "lower than the clean-trained victim"
  if r["ci_high"] < 0 and r.get("p_holm", r["p_value"]) < 0.05:
    return "higher than the clean-trained victim"
  return "no clear difference from the clean-trained victim"


def contrast_alignment(clean_cases, protected_cases, eps: float) -> float:
  """How much a perturbation strengthens the real tumour-vs-brain contrast, in budgets (mean over cases).

  Per case and channel, s = sign(mean(tumour) - mean(other brain)) of the clean image; the alignment is
  mean over tumour voxels of s * delta / (eps x range) minus the same over the other brain voxels, averaged over
  channels. +2 would be the whole budget spent on making the tumour stand out more (delta = +eps in the tumour,
  -eps around it); random noise scores ~0.
  """
  out = []
  for c, pc in zip(clean_cases, protected_cases):
    x, xp = np.asarray(c.image, np.float64), np.asarray(pc.image, np.float64)
    brain = (x != 0).any(axis=-1)
    tumour = np.asarray(c.label) > 0
    other = brain & ~tumour
    if not tumour.any() or not other.any():
      continue
    r = np.where(np.ptp(x, axis=(0, 1, 2)) > 0, np.ptp(x, axis=(0, 1, 2)), 1.0)
    sign = np.sign(x[tumour].mean(axis=0) - x[other].mean(axis=0))
    u = (xp - x) / (eps * r) * sign
    out.append(float(np.mean(u[tumour].mean(axis=0) - u[other].mean(axis=0))))
  return float(np.mean(out)) if out else float("nan")


def tumour_contrast(cases, eps: float) -> float:
  """Median over cases of the largest per-channel |mean(tumour) - mean(other brain)| / (eps x range): how many
  budgets apart tumour and brain are (how much easier the real feature is than a budget-sized shortcut)."""
  out = []
  for c in cases:
    image = np.asarray(c.image, np.float64)
    brain = (image != 0).any(axis=-1)
    tumour = np.asarray(c.label) > 0
    if not tumour.any() or not (brain & ~tumour).any():
      continue
    r = np.where(np.ptp(image, axis=(0, 1, 2)) > 0, np.ptp(image, axis=(0, 1, 2)), 1.0)
    diff = np.abs(image[tumour].mean(axis=0) - image[brain & ~tumour].mean(axis=0))
    out.append(float(np.max(diff / (eps * r))))
  return float(np.median(out)) if out else float("nan")


def _hallmark(info: dict) -> float | None:
  """A trained protection's hallmark (surrogate CE on protected / clean slices); None for a fixed pattern."""
  if "surrogate_ce_protected" not in info:
    return None
  return info.get("hallmark", info["surrogate_ce_protected"] / max(info["surrogate_ce_clean"], 1e-12))


def diagnosis(config, by, q, headline) -> list[str]:
  """Generated sentences on why a protection does or does not work here (shortcut, surrogate fit, sweep)."""
  out = []
  eps = float(config.protect.eps)
  contrast = headline.get("tumour_contrast_over_eps")
  if contrast is not None and np.isfinite(contrast):
    out.append(f"Tumour contrast in budgets: tumour and surrounding brain differ by {contrast:.0f} x the budget "
               f"(median over training cases of the largest per-channel mean difference / (eps x range), eps = "
               f"{eps * 255:.3g}/255). Hypothesis, not a measured cause: the larger this ratio, the weaker a "
               "budget-sized shortcut is next to the real feature; the phase map (data difficulty x budget) is where "
               "it is tested.")
  for m, a in headline.get("contrast_alignment", {}).items():
    if m in ("minmin", "umed") and np.isfinite(a):
      out.append(f"Direction of `{m}`: its perturbation adds {a:+.2f} budgets to the tumour-vs-brain contrast "
                 + ("(error-minimising noise here mostly makes the tumour stand out MORE, which helps a victim learn "
                    "the real feature rather than hiding it)." if a > 0.25 else
                    "(it does not systematically strengthen the real contrast)."))
  for name, r in headline.get("shortcut", {}).items():
    m = name.split("/")[0]
    if m == "none":
      continue
    learned = r["gap"] > 0.05
    out.append(f"Shortcut check `{m}`: the victim scores {r['train_protected_dice']:.3f} Dice on the protected "
               f"training cases it was trained on and {r['train_clean_dice']:.3f} on the same cases unprotected (gap "
               f"{r['gap']:+.3f}): " + ("it relies on the perturbation (a shortcut was learned)." if learned else
                                        "it does not rely on the perturbation (no shortcut learned; it learned the "
                                        "real tumour appearance)."))
  hallmark_max = float(config.protect.get("hallmark_max", 0.3))
  for m, inf in headline.get("protection_info", {}).items():
    ratio = _hallmark(inf)
    if ratio is not None:
      verdict = ("converged: the noise, not the tumour, is what the surrogate fits" if ratio <= hallmark_max else
                 f"NOT CONVERGED (ratio above {hallmark_max:g}): no error-minimising noise was produced, so this "
                 "protection's victim numbers are not a result about the method")
      victim = (f"; the victim trained on it has ratio {inf['victim_hallmark']:.2f}" if "victim_hallmark" in inf
                else "")
      out.append(f"Hallmark `{m}`: the surrogate's voxel CE is {inf['surrogate_ce_protected']:.4f} on the protected "
                 f"and {inf['surrogate_ce_clean']:.4f} on the clean training slices, ratio {ratio:.2f}{victim}"
                 + (f"; min-min stopped at round {inf['stopped_at']} (-1: never reached the accuracy rule)"
                    if "stopped_at" in inf else "") + f" -- {verdict}.")
  sweep = headline.get("sweep") or []
  if sweep:
    method = str(config.protect.sweep_method)
    hit = [r for r in sweep if r["drop"] >= 0.1 and r["drop_ci_low"] > 0]
    levels = ", ".join(f"{r['eps'] * 255:.3g}/255: {r['dice']:.3f} ({r['psnr']:.1f} dB)" for r in sweep)
    out.append(f"Budget sweep of `{method}` (exploratory): clean-test Dice by budget {levels}. "
               + (f"The smallest budget lowering Dice by >= 0.1 (CI excluding 0) is {hit[0]['eps'] * 255:.3g}/255 at "
                  f"PSNR {hit[0]['psnr']:.1f} dB" + (" -- far below the paper's 50 dB imperceptibility."
                                                     if hit[0]["psnr"] < 40 else ".")
                  if hit else "No budget in the sweep lowers Dice by >= 0.1 with a CI excluding 0."))
  return out


def findings(config, vrows, qrows, comp, headline) -> list[str]:
  n = headline["n_test"]
  by = {r["victim"]: r for r in vrows}
  q = {r["method"]: r for r in qrows}
  kept = headline["learnt_regions"]
  hallmark_max = float(config.protect.get("hallmark_max", 0.3))
  dropped = learnt_lib.not_learnt_text(headline["gate"])
  out = [f"Not learnt by the clean-trained victim, so no result: {dropped}. "
         + (f"Every Dice below averages {', '.join(kept)} only." if kept else
            "No region was learnt: no protection effect is claimed and every number below is exploratory.")
         ] if dropped else []
  if not kept:
    return out
  seeds = {m: [by[n]["dice_mean_mean"] for n in by if n == f"{m}/standard" or n.startswith(f"{m}/standard@seed=")]
           for m in ("none",) + tuple(x for x in {n.split("/")[0] for n in by})}
  spread = float(np.ptp(seeds["none"])) if len(seeds["none"]) > 1 else None
  for r in (r for r in comp if r["family"] == "primary"):
    m = r["b"].split("/")[0]
    within = (spread is not None and _verdict(r) != "no clear difference from the clean-trained victim"
              and abs(r["mean_diff"]) <= spread)
    out.append(f"`{m}` (primary, n = {n} clean test cases, effective n {r['n_effective']}): victim Dice "
               f"{by[r['b']]['dice_mean_mean']:.3f} vs {by['none/standard']['dice_mean_mean']:.3f} clean-trained; "
               f"difference {r['mean_diff']:+.3f} (95 % CI {r['ci_low']:+.3f} to {r['ci_high']:+.3f}), Holm p = "
               f"{tables.format_p(r['p_holm'])}: {_verdict(r)}"
               + (f", but within the clean-trained victim's seed-to-seed spread ({spread:.3f}), so not attributable "
                  "to the protection" if within else "")
               + f". PSNR of the protected images {q[m]['psnr_mean']:.1f} +- {q[m]['psnr_sd']:.1f} dB.")
  if spread is not None:
    runs = "; ".join(f"`{m}` " + ", ".join(f"{v:.3f}" for v in vals) for m, vals in seeds.items() if len(vals) > 1)
    out.append(f"Training-seed spread (standard victims retrained with other seeds on the same data): {runs}. The CIs "
               "above are over test cases for ONE training run each; differences of the size of this spread are "
               "run-to-run noise, not effects of a protection.")
  for r in (r for r in comp if r["family"] == "seed-averaged"):
    ratio = _hallmark(headline.get("protection_info", {}).get(r["b"].split("/")[0], {}))
    out.append(f"Seed-averaged (exploratory): {r['comparison']}: difference {r['mean_diff']:+.3f} (95 % CI "
               f"{r['ci_low']:+.3f} to {r['ci_high']:+.3f}, p = {tables.format_p(r['p_value'])})"
               + (f"; the protection did not converge (hallmark {ratio:.2f}), so this is no result about the method."
                  if ratio is not None and ratio > hallmark_max else "."))
  primary = {r["b"]: r for r in comp if r["family"] == "primary"}
  for r in (r for r in comp if r["family"] == "counter-measure"):
    # The protection's effect is judged within a regime (clean- minus protected-trained, both under it): a
    # counter-measure can also lower the clean victim, and then protected victims fall with it.
    m, regime = r["b"].split("/")
    std, own = primary.get(f"{m}/standard"), by[f"none/{regime}"]["dice_mean_mean"]
    cost = by["none/standard"]["dice_mean_mean"] - own
    if std is None or not std["ci_low"] > 0:
      verdict = "with no protection effect under standard training there is nothing for it to undo"
    elif cost > COUNTER_COST_MAX:
      verdict = (f"the counter-measure itself costs the clean victim {cost:.2f} Dice, so this row cannot tell "
                 "whether the protection survives it")
    elif r["ci_low"] > 0:
      verdict = "the protection survives it"
    else:
      verdict = "no significant protection effect is left"
    out.append(f"Counter-measure `{regime}` against `{m}` (exploratory, uncorrected): protection effect under it "
               f"{r['mean_diff']:+.3f} (CI {r['ci_low']:+.3f} to {r['ci_high']:+.3f}, p = "
               f"{tables.format_p(r['p_value'])})" + (f" vs {std['mean_diff']:+.3f} with standard training" if std
                                                      else "")
               + f"; clean-trained victim under it {own:.3f} (standard {by['none/standard']['dice_mean_mean']:.3f}): "
               f"{verdict}.")
  if "umed/standard" in by:
    r = next(r for r in comp if r["b"] == "umed/standard")
    worked = r["ci_low"] > 0.05 and r["p_holm"] < 0.05
    cost = [x for x in comp if x["family"] == "counter-measure"]
    if not worked and cost:
      regimes = sorted({x["a"].split("/")[1] for x in cost})
      own = "; ".join(f"{g}: {by[f'none/{g}']['dice_mean_mean']:.3f}" for g in regimes if f"none/{g}" in by)
      out.append("With no protection effect to undo, the counter-measure rows measure the counter-measures' own "
                 f"cost: the clean-trained victim scores {by['none/standard']['dice_mean_mean']:.3f} with standard "
                 f"training and {own} under the counter-measures; protected-data victims under a counter-measure "
                 "track the clean-data victim under the same counter-measure (the 'counter-measure' family rows).")
    ratio = _hallmark(headline.get("protection_info", {}).get("umed", {}))
    unfit = ratio is not None and ratio > hallmark_max
    out.insert(0, f"**UMed target check** (a UMed-protected victim clearly below the clean-trained one at PSNR >= 40 "
                  f"dB): Dice {by['umed/standard']['dice_mean_mean']:.3f} vs {by['none/standard']['dice_mean_mean']:.3f}"
                  f", PSNR {q['umed']['psnr_mean']:.1f} dB: "
                  + ("MET." if worked and q["umed"]["psnr_mean"] >= 40 else
                     f"NO RESULT: UMed did not converge here (hallmark {ratio:.2f}), so this run says nothing about "
                     "whether UMed makes the data unlearnable; the paper's drop (82 % -> 7 %) is not reproduced." if unfit
                     else "NOT MET: at this budget and training length the protection does not make the data "
                     "unlearnable here; the paper's drop (82 % -> 7 %) is not reproduced."))
  out.extend(diagnosis(config, by, q, headline))
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


def write_report(config, workdir, vrows, qrows, comp, figs, headline, srows=(), wrows=()) -> None:
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
  nifti = {k: v for k, v in headline["protected_folders"].items() if not k.endswith("(tfds)")}
  tfds_sets = {k: v for k, v in headline["protected_folders"].items() if k.endswith("(tfds)")}
  if nifti:
    r.paragraph("Protected training data as BraTS-2021-style NIfTI folders (float32 z-scored images, seg with ET = 4), "
                "readable with `--config.data.source=brats --config.data.root=<folder>`: "
                + ", ".join(f"`{v}`" for v in nifti.values()) + ".")
  if tfds_sets:
    r.paragraph("The whole protected training splits as TFDS datasets (array_record volume records, the `brats` "
                "builder's layout), readable with `--config.data.source=tfds --config.data.tfds_name=<name> "
                "--config.data.data_dir=<workdir>/protected_tfds` or `tfds.data_source`: "
                + ", ".join(f"`{v}`" for v in tfds_sets.values()) + ".")
  r.heading("Files")
  r.bullets(["`results/cells.csv`: every evaluation cell (victims on the test split; protection quality on the "
             "training split) as long-form rows.",
             "`results/victims.csv`, `results/quality.csv`, `results/comparisons.csv`, `results/per_case.csv`, "
             "`results/headline.json`.",
             "`protect/<method>/`: the min-min and UMed fit runs; `models/<victim>/`: each victim's training run."])
  r.write(os.path.join(workdir, "report.md"))
