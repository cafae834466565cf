"""report.md of the main job: overview, data, each study's own report (re-rooted), manifest and times."""
from __future__ import annotations

import json
import os
import re

import numpy as np

from mri_poison.report import markdown

# Report order (by study number) and the one-line question each study answers.
STUDY_TITLES = {
    "poison": ("Study 1", "synthetic poisoning: does GAN-made T1-Ce in the training set cost Dice on real data?"),
    "robustify": ("Study 2", "gradient attacks and defences: how fast does a 3D U-Net break, and do distillation "
                             "or adversarial training help against an adaptive attacker?"),
    "deform": ("Study 3", "deformation + appearance attacks: can plausible anatomy lower Dice by a chosen amount?"),
    "unlearnable": ("Study 4", "unlearnable examples: does UMed protection make a dataset useless for training?"),
}
_LINK = re.compile(r"(!?\[[^\]]*\]\()([^)\s]+)(\))")


def embed(markdown_text: str, prefix: str, demote: int = 1) -> str:
  """A study's report inside another: headings `demote` levels deeper, relative links under `prefix`/."""
  def relink(m):
    target = m.group(2)
    if re.match(r"^([a-z]+:|/|#)", target):
      return m.group(0)
    return f"{m.group(1)}{prefix}/{target}{m.group(3)}"
  out, fenced = [], False
  for line in markdown_text.splitlines():
    if line.startswith("```"):
      fenced = not fenced
    if not fenced and line.startswith("#"):
      line = "#" * demote + line
    out.append(line if fenced else _LINK.sub(relink, line))
  return "\n".join(out) + "\n"


def section(markdown_text: str, heading: str) -> list[str]:
  """The bullet lines of the `## <heading>` section of a report (empty if absent)."""
  lines, inside = [], False
  for line in markdown_text.splitlines():
    if line.startswith("## "):
      inside = line[3:].strip().lower().startswith(heading.lower())
      continue
    if inside and line.startswith("- "):
      lines.append(line[2:].strip())
  return lines


def _minutes(seconds) -> str:
  return f"{float(seconds) / 60:.1f} min" if seconds is not None else "-"


def _data_section(rep: markdown.Report, config, order) -> None:
  rep.heading("Data", 2)
  rows = []
  for name in STUDY_TITLES:
    if name in order:
      d = config[name].data
      source = str(d.source) if "source" in d else "phantom"
      arms = [config[name][f"arm{a}"].data for a in config[name].arms] if "arms" in config[name] else [d]
      version = str(d.get("phantom_version", "v1")) if source == "phantom" else "-"
      rows.append({"study": STUDY_TITLES[name][0], "source": source, "phantom": version,
                   "mode": ", ".join(str(a.get("mode", d.get("mode", ""))) for a in arms),
                   "cases (train + val)": f"{int(d.n_cases)}" if source == "phantom" else "all in data.root",
                   "held out": int(d.n_val), "grid": ", ".join("x".join(str(s) for s in a.shape) for a in arms)})
  rep.paragraph(
      "Unless a stage's `data.source` says otherwise, every study generates its cases from the embedded phantom "
      "(`mri_poison.data.phantom`, version in the table): v2 warps the MNI152 template per subject, grows a "
      "glioma by reaction-diffusion (necrosis, enhancing rim, oedema along white matter, mass effect; a quarter "
      "of cases lower grade without enhancement), adds look-alikes (enhancing vessels, sinuses, choroid plexus; "
      "white-matter lesions and CSF-inflow on FLAIR) and renders four MR contrasts from signal equations with "
      "per-case protocols, thick slices, misregistration, bias and Rician noise (study 1 also a CT in HU), "
      "z-scored inside the brain like BraTS; v1 is the older procedural head with constant intensities. Phantom "
      "numbers show how the code and the statistics behave on data about as separable as BraTS (see "
      "experiments/bench/RESULTS.md, phantom calibration); they are not evidence about real tumours. Every study "
      "generates its heads from its `data.seed` (0 in every study here), each at its own grid and split sizes, so "
      "the studies draw on overlapping phantom heads and are not independent replications of one another.")
  rep.table(rows, caption="Splits per study (held out = validation / test cases every number below rests on):")
  small = [r["study"] for r in rows if r["source"] == "phantom" and int(r["held out"]) < 20]
  if small:
    rep.paragraph(f"{', '.join(small)}: fewer than 20 held-out cases at this scale, so every test there is "
                  "exploratory whatever its p-value (each study's report says so too); each study's default "
                  "variant (`python -m experiments.<launcher> --config experiments/configs/<study>.py`) uses "
                  "n >= 20.")


def write_report(config, workdir: str, records: dict, *, wall_seconds: float, concurrent: int = 1) -> str:
  """Writes <workdir>/report.md from the stage records and the studies' own reports."""
  order = [s for s in STUDY_TITLES if s in records]  # records: the stages run now and those finished earlier
  rep = markdown.Report(f"mri_poison main job: the four studies ({config.variant})")
  rep.paragraph(
      f"Written {records and max(r.get('ended', '') for r in records.values())} by "
      f"`python -m experiments.reproduce --config experiments/configs/reproduce.py:{config.variant}`. "
      "Each study below is its own report (also at `<stage>/report.md`), with its protocol, tables, figures, "
      "the paper's headline numbers labelled as the paper's (on its data, not ours), sanity checks and a "
      "findings section. Settings the papers leave open are marked as defaults chosen here in each protocol.")
  rep.heading("Overview", 2)
  rows = []
  for name in order:
    r = records[name]
    status = ("earlier run (not in config.stages)" if r.get("earlier") else "reused" if r.get("reused")
              else r["status"])
    rows.append({"study": STUDY_TITLES[name][0], "question": STUDY_TITLES[name][1], "stage": f"`{name}`",
                 "status": status, "time": _minutes(r.get("seconds")),
                 "report": f"[{name}/report.md]({name}/report.md)" if r["status"] == "finished" else "-"})
  rep.table(rows)
  failed = [n for n in order if records[n]["status"] != "finished"]
  if failed:
    rep.paragraph("**Failed stages** (the others ran; fix the error and re-run the same command: finished "
                  "stages are reused):")
    rep.bullets([f"`{n}`: {records[n]['status']}: {records[n].get('error', '')}" for n in failed])
  findings = []
  for name in order:
    report_path = os.path.join(workdir, name, "report.md")
    if records[name]["status"] == "finished" and os.path.exists(report_path):
      with open(report_path) as f:
        for line in section(f.read(), "Findings")[:3]:
          findings.append(f"{STUDY_TITLES[name][0]}: {line}")
  if findings:
    rep.heading("Key findings (each study's first findings; details and caveats in its section)", 3)
    rep.bullets(findings)
  _data_section(rep, config, order)
  for name in order:
    number, question = STUDY_TITLES[name]
    report_path = os.path.join(workdir, name, "report.md")
    r = records[name]
    if r["status"] == "finished" and os.path.exists(report_path):
      with open(report_path) as f:
        rep.paragraph(embed(f.read(), name, demote=1))
    else:
      rep.heading(f"{number}: `{name}` ({r['status']})", 2)
      rep.paragraph(f"{question}\n\nThis stage did not finish: `{r.get('error', r['status'])}`.")
      if r.get("traceback"):
        rep.code(r["traceback"])
  _manifest_section(rep, config, workdir, records, order, wall_seconds, concurrent)
  return rep.write(os.path.join(workdir, "report.md"))


def _manifest_section(rep, config, workdir, records, order, wall_seconds, concurrent) -> None:
  rep.heading("Run manifest", 2)
  try:
    with open(os.path.join(workdir, "manifest.json")) as f:
      manifest = json.load(f)
  except (FileNotFoundError, json.JSONDecodeError):
    manifest = {}
  versions = manifest.get("versions", {})
  devices = manifest.get("devices", {})
  rep.bullets([
      "versions: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())),
      f"devices: {devices.get('count', '?')} x {devices.get('kind', '?')} ({devices.get('platform', '?')}), "
      f"{devices.get('process_count', 1)} process(es), host {devices.get('host', '?')}",
      f"git revision: {manifest.get('git_revision', 'unknown')}; config hash {manifest.get('config_hash', '?')} "
      f"(config.json beside this report; each stage's in `<stage>/config.json`)",
      f"seeds: main {int(config.seed)}; " + ", ".join(f"{n} {int(config[n].seed)}" for n in order),
  ])
  rows = [{"stage": n, "status": "reused" if records[n].get("reused") else records[n]["status"],
           "started": records[n].get("started", "-"), "seconds": round(float(records[n].get("seconds", np.nan)), 1)}
          for n in order]
  overlap = (f"; {concurrent} stages ran at a time, each in its own process (config concurrent_stages), so their "
             "times overlap" if concurrent > 1 else "")
  rep.table(rows, caption=f"Time per stage (this run took {wall_seconds:.0f} s{overlap}; a reused stage shows the "
                          "time of the run that computed it):")
