"""Study 4's analysis: the evaluation cells and what the run knows beyond them turned into the result files
(results/*.csv, results/headline.json) and the figures. report.py words them; `study.render` reads them back."""
from __future__ import annotations

import os

import numpy as np

from mri_poison import io_utils
from mri_poison import metrics
from mri_poison.data.case import REGIONS
from mri_poison.data.preprocess import brain_mask
from mri_poison.ops import morphology
from mri_poison.report import figures
from mri_poison.studies import learnt as learnt_lib
from mri_poison.studies.unlearnable.victims import DICE

QUALITY = ("psnr", "ssim", "share_roi", "share_band", "linf_scaled")
# The tables report.md is written from, results/<file> by their key.
RESULT_TABLES = {"victims": "victims.csv", "quality": "quality.csv", "comparisons": "comparisons.csv",
                 "shortcut": "shortcut.csv", "sweep": "sweep.csv", "claims": "claims.csv"}
CLAIM_FIELDS = ("subject", "claim", "statistic", "value", "threshold", "verdict")
# Thresholds of the verdicts in claims.csv [ours]. A counter-measure that lowers the clean-trained victim by more
# than COUNTER_COST_MAX (mean Dice) is no fair test of a protection: protected victims fall with it.
SHORTCUT_GAP, ALIGNMENT_MIN, SWEEP_DROP, COUNTER_COST_MAX, UMED_DROP, UMED_PSNR = 0.05, 0.25, 0.1, 0.1, 0.05, 40.0
FIGURES = {"dice": "dice_vs_method.png", "example": "example.png", "partial": "partial.png", "sweep": "sweep.png"}


def victim_kind(name: str) -> str:
  """"seed" (a replicate of a standard victim with another training seed), "sweep", "partial" or "main"."""
  if "@seed=" in name:
    return "seed"
  if "@eps=" in name:
    return "sweep"
  return "partial" if "@" in name else "main"


def _mean_sd(table, cell, names, ids) -> dict:
  """{<name>_mean, <name>_sd} of each metric in `names` over the cases `ids` of `cell`."""
  out = {}
  for m in names:
    v = table.values(cell, m, ids)
    out[f"{m}_mean"], out[f"{m}_sd"] = float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0
  return out


def victim_rows(table, cells, plan, test_ids) -> list[dict]:
  rows = []
  for name, method, regime, fraction, eps in plan:
    ci = metrics.bootstrap_ci(table.values(cells[name], "dice_mean", test_ids), n_boot=2000, seed=0)
    rows.append({"victim": name, "method": method, "regime": regime, "fraction": fraction, "eps": eps,
                 **_mean_sd(table, cells[name], DICE, test_ids), "ci_low": ci["low"], "ci_high": ci["high"]})
  return rows


def quality_rows(table, quality_cells, train_ids) -> list[dict]:
  return [{"method": m, **_mean_sd(table, cell, QUALITY, train_ids)} for m, cell in quality_cells.items()]


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


def hallmark(info: dict) -> float | None:
  """A trained protection's hallmark (surrogate CE on protected / clean slices); None for a fixed pattern."""
  if "surrogate_ce_protected" not in info:
    return None
  return info.get("hallmark", info["surrogate_ce_protected"] / max(info["surrogate_ce_clean"], 1e-12))



def _difference(r) -> str:
  """A primary comparison's verdict: Holm p < 0.05 and the CI on one side of 0."""
  if r["ci_low"] > 0 and r.get("p_holm", r["p_value"]) < 0.05:
    return "lower"
  if r["ci_high"] < 0 and r.get("p_holm", r["p_value"]) < 0.05:
    return "higher"
  return "no clear difference"


def seed_runs(vrows) -> dict[str, list[float]]:
  """{method: mean Dice of its standard victim and of each training-seed replicate}, "none" first."""
  by = {r["victim"]: r for r in vrows}
  return {m: [by[n]["dice_mean_mean"] for n in by if n == f"{m}/standard" or n.startswith(f"{m}/standard@seed=")]
          for m in dict.fromkeys(["none"] + [n.split("/")[0] for n in by])}


def claim_rows(config, res, headline) -> list[dict]:
  """Every verdict the report words, as rows (CLAIM_FIELDS): decided here from the result rows `res` (by
  RESULT_TABLES key, without "claims") and the headline, so the report only phrases them. Verdicts are short
  words: "lower" / "higher" / "no clear difference", "yes" / "no", "met" / "not met" / "no result"..."""
  out = []
  add = lambda subject, claim, statistic, value, threshold, verdict: out.append(dict(zip(
      CLAIM_FIELDS, (subject, claim, statistic, float(value), float(threshold), verdict))))
  hallmark_max = float(config.protect.get("hallmark_max", 0.3))
  info = headline.get("protection_info", {})
  by = {r["victim"]: r for r in res["victims"]}
  comp = res["comparisons"]
  runs = seed_runs(res["victims"]).get("none", [])
  spread = float(np.ptp(runs)) if len(runs) > 1 else None
  for r in (r for r in comp if r["family"] == "primary"):
    m = r["b"].split("/")[0]
    verdict = _difference(r)
    add(m, "protected-data victim differs from the clean-trained one", "clean minus protected mean Dice (Holm p < "
        "0.05 and the 95 % CI excludes 0)", r["mean_diff"], 0.05, verdict)
    if spread is not None and verdict != "no clear difference":
      add(m, "the difference exceeds the clean victim's seed-to-seed spread", "|difference| vs the spread",
          abs(r["mean_diff"]), spread, "yes" if abs(r["mean_diff"]) > spread else "no")
  for r in res["shortcut"]:
    if r["method"] != "none":
      add(r["method"], "the victim relies on the perturbation (a shortcut)", "Dice on protected minus clean training "
          "cases", r["gap"], SHORTCUT_GAP, "yes" if r["gap"] > SHORTCUT_GAP else "no")
  for r in res["quality"]:
    ratio = hallmark(info.get(r["method"], {}))
    if ratio is not None:
      add(r["method"], "the protection converged", "hallmark: surrogate CE protected / clean (at most)", ratio,
          hallmark_max, "yes" if ratio <= hallmark_max else "no")
    a = r["contrast_alignment"]
    if r["method"] in ("minmin", "umed") and np.isfinite(a):
      add(r["method"], "the perturbation strengthens the real tumour contrast", "contrast alignment (budgets)", a,
          ALIGNMENT_MIN, "yes" if a > ALIGNMENT_MIN else "no")
  if res["sweep"]:
    hit = [r for r in res["sweep"] if r["drop"] >= SWEEP_DROP and r["drop_ci_low"] > 0]
    add(str(config.protect.sweep_method), "a budget in the sweep lowers Dice (CI above 0)", "smallest such eps x 255",
        hit[0]["eps_255"] if hit else float("nan"), SWEEP_DROP, "yes" if hit else "no")
  primary = {r["b"]: r for r in comp if r["family"] == "primary"}
  for r in (r for r in comp if r["family"] == "counter-measure"):
    # The protection's effect is judged within a regime (clean- minus protected-trained, both under it): a
    # counter-measure can also lower the clean victim, and then protected victims fall with it.
    m, regime = r["b"].split("/")
    std = primary.get(f"{m}/standard")
    cost = by["none/standard"]["dice_mean_mean"] - by[f"none/{regime}"]["dice_mean_mean"]
    verdict = ("nothing to undo" if std is None or not std["ci_low"] > 0 else
               "counter-measure too costly" if cost > COUNTER_COST_MAX else
               "survives" if r["ci_low"] > 0 else "no effect left")
    add(f"{m}/{regime}", "the protection survives the counter-measure", "protection effect under it (CI low > 0)",
        r["mean_diff"], COUNTER_COST_MAX, verdict)
  if "umed/standard" in primary:
    r, psnr = primary["umed/standard"], next(q["psnr_mean"] for q in res["quality"] if q["method"] == "umed")
    ratio = hallmark(info.get("umed", {}))
    worked = r["ci_low"] > UMED_DROP and r["p_holm"] < 0.05
    add("umed", "UMed makes the data unlearnable (the paper's claim)", f"drop CI low > {UMED_DROP:g}, Holm p < 0.05, "
        f"PSNR >= {UMED_PSNR:g} dB", r["mean_diff"], UMED_DROP,
        "met" if worked and psnr >= UMED_PSNR else
        "no result" if ratio is not None and ratio > hallmark_max else "not met")
  return out


def figure_paths(workdir: str, res: dict) -> dict[str, str]:
  """The figures the results `res` (by RESULT_TABLES key) call for: partial protection and the sweep when run."""
  shown = ["dice", "example"]
  if any(victim_kind(r["victim"]) == "partial" for r in res["victims"]):
    shown.append("partial")
  if res["sweep"]:
    shown.append("sweep")
  return {k: os.path.join(workdir, "figures", FIGURES[k]) for k in shown}


def analyse(config, workdir, table, plan, cells: dict, train_cases, test: dict, protected: dict, facts: dict) -> dict:
  """Writes a run's result files and figures; returns the headline (results/headline.json). cells: {"victims":
  {victim: cell}, "quality": {protection: cell}, "shortcut": {(victim, split): cell}}; protected: {protection:
  cases}; facts: what the run knows beyond the cells (protection info, timings...), into the headline as is."""
  p, results = config.protect, os.path.join(workdir, "results")
  methods, regimes = tuple(p.methods), tuple(config.counter.regimes)
  test_ids, train_ids = list(test["case_id"]), [c.case_id for c in train_cases]
  # The gate: regions the clean-trained standard victim learnt; every mean Dice below averages those only.
  clean = np.stack([table.values(cells["victims"]["none/standard"], f"dice_{r}", test_ids) for r in REGIONS], axis=1)
  gate = clean_gate(config, clean, test, train_cases)
  io_utils.write_csv(os.path.join(results, "gate.csv"), gate)
  table = learnt_lib.LearntDiceView(table, learnt_lib.learnt(gate))
  vrows = victim_rows(table, cells["victims"], plan, test_ids)
  qrows = quality_rows(table, cells["quality"], train_ids)
  for row in qrows:  # derived from the protected volumes (not a cell): cheap, and re-derived on every run
    eps_m = next((e for n, m, _, _, e in plan if n.split("/")[0] == row["method"]), float(p.eps))
    row["contrast_alignment"] = contrast_alignment(train_cases, protected[row["method"]], eps_m)
  comp = comparisons(table, cells["victims"], plan, methods, regimes, test_ids)
  res = {"victims": vrows, "quality": qrows, "comparisons": comp,
         "shortcut": shortcut_rows(table, cells["shortcut"], plan, train_ids),
         "sweep": sweep_rows(vrows, qrows, comp, config) if tuple(p.sweep_eps) else []}
  per_case = [dict(victim=n, case=c, **{m: float(table.values(cells["victims"][n], m, [c])[0])
                                        for m in DICE})
              for n, *_ in plan for c in test_ids]
  io_utils.write_csv(os.path.join(results, "per_case.csv"), per_case)
  by = {r["victim"]: r for r in vrows}
  figs = figure_paths(workdir, res)
  dice_figure(vrows, methods, regimes, figs["dice"])
  example_figure(train_cases, protected, methods, int(p.umed.width), figs["example"])
  if "partial" in figs:
    partial_figure(vrows, str(p.partial_method), figs["partial"])
  if "sweep" in figs:
    sweep_figure(res["sweep"], by["none/standard"]["dice_mean_mean"], str(p.sweep_method), figs["sweep"])
  headline = {
      "gate": gate, "learnt_regions": list(learnt_lib.learnt(gate)), "n_test": len(test_ids), "n_train": len(train_ids),
      "dice": {n: {"mean": r["dice_mean_mean"], "sd": r["dice_mean_sd"], "ci": [r["ci_low"], r["ci_high"]]}
               for n, r in by.items()},
      "psnr_db": {r["method"]: r["psnr_mean"] for r in qrows},
      "primary": [{k: r[k] for k in ("b", "mean_diff", "ci_low", "ci_high", "p_value", "p_holm", "n_effective")}
                  for r in comp if r["family"] == "primary"],
      "tumour_contrast_over_eps": tumour_contrast(train_cases, float(p.eps)), **facts,
  }
  res["claims"] = claim_rows(config, res, headline)
  for k, f in RESULT_TABLES.items():
    io_utils.write_csv(os.path.join(results, f), res[k], **({"fieldnames": list(CLAIM_FIELDS)} if k == "claims" else {}))
  io_utils.write_json(os.path.join(results, "headline.json"), headline)
  return headline
