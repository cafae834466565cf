r"""How much of the task the main job's victims learnt: each study's clean victim trained longer on the same data.

Runs the main job's `ceiling` variant (experiments/configs/reproduce.py: the main job's data and victims, each
victim trained CEILING_FACTOR x longer, attacks and protections cut to one cheap cell) and sets every stage's
victim check (results/gate.csv: Dice on the held-out cases that contain each region, and the intensity-only
baseline) beside the same table of a finished main job:

  python -m experiments.reproduce --workdir runs/reproduce          # the main job, if not run yet (~16 min)
  python -m experiments.bench.ceiling --main_workdir runs/reproduce --workdir runs/ceiling   # ~12 min, 2 cores

Writes <workdir>/ceiling.csv and ceiling.md. Re-running reuses the finished ceiling stages.
"""
import csv
import os

from absl import flags

from experiments import launch_utils
from experiments.bench import timing
from experiments.configs import reproduce as reproduce_config
from mri_poison import io_utils
from mri_poison.report import markdown
from mri_poison.studies import reproduce

_MAIN = flags.DEFINE_string("main_workdir", None, "A finished main job (python -m experiments.reproduce).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where the ceiling run and its tables go.")


def _gates(workdir: str, stage: str) -> dict[tuple[str, str], dict]:
  """{(arm, region): gate row} of one stage's results/gate.csv (arm "" for single-arm studies)."""
  path = os.path.join(workdir, stage, "results", "gate.csv")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no victim check; is {workdir} a finished main job with stage {stage}?")
  with open(path) as f:
    return {(r.get("arm", ""), r["region"]): r for r in csv.DictReader(f)}


def compare(main_workdir: str, ceiling_workdir: str, stages) -> list[dict]:
  """One row per (study, arm, region): cases, the main job's Dice, the ceiling's, and the intensity baseline."""
  rows = []
  for stage in stages:
    main, ceiling = _gates(main_workdir, stage), _gates(ceiling_workdir, stage)
    for key in sorted(set(main) & set(ceiling)):
      m, c = main[key], ceiling[key]
      if m["n_cases"] != c["n_cases"]:
        raise ValueError(f"{stage} {key}: the two runs hold different held-out cases ({m['n_cases']} vs "
                         f"{c['n_cases']}); the ceiling variant must read the main job's data")
      main_dice, ceiling_dice = float(m["dice"]), float(c["dice"])
      rows.append({"study": stage, "arm": key[0], "region": key[1], "n_cases": int(m["n_cases"]),
                   "main_dice": main_dice, "ceiling_dice": ceiling_dice, "baseline": float(m["baseline"]),
                   "share_of_ceiling": main_dice / ceiling_dice if ceiling_dice > 0 else float("nan"),
                   "main_learnt": m["learnt"] == "True", "ceiling_learnt": c["learnt"] == "True"})
  return rows


def main(argv):
  del argv
  if not _MAIN.value or not _WORKDIR.value:
    raise ValueError("--main_workdir (a finished main job) and --workdir are both required")
  config = reproduce_config.get_config("ceiling")
  stages = reproduce.pipeline.stage_names(config)
  for stage in stages:
    _gates(_MAIN.value, stage)  # a missing main-job table fails before the long run
  print(timing.describe(timing.environment()))
  reproduce.run(config, _WORKDIR.value)
  rows = compare(_MAIN.value, _WORKDIR.value, stages)
  io_utils.write_csv(os.path.join(_WORKDIR.value, "ceiling.csv"), rows)
  report = markdown.Report("Victims of the main job against their ceiling")
  report.paragraph(f"Clean held-out Dice on the cases that contain each region: the main job ({_MAIN.value}) "
                   f"against the same victims trained {reproduce_config.CEILING_FACTOR} x longer on the same "
                   f"data ({_WORKDIR.value}); baseline: the intensity-only model of the victim check.")
  report.table(rows)
  print(report.text())
  report.write(os.path.join(_WORKDIR.value, "ceiling.md"))


if __name__ == "__main__":
  launch_utils.run_plain(main)
