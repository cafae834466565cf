r"""Study 2: gradient attacks and defences on a 3D U-Net; see experiments/configs/robustify.py for commands.

  python -m experiments.robustify --config experiments/configs/robustify.py:runlocal --workdir /tmp/robustify
"""
from absl import app
from absl import flags
from absl import logging

from experiments import launch_utils
from mri_poison.studies import robustify

_CONFIG = launch_utils.define_config("experiments/configs/robustify.py")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where models, results, figures and report.md go.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required (where models, results, figures and report.md go)")
  launch_utils.init_processes()
  logging.set_verbosity(logging.INFO)
  headline = robustify.run(_CONFIG.value, _WORKDIR.value)
  print(f"report: {_WORKDIR.value}/report.md")
  print("clean Dice: " + ", ".join(f"{m} {v:.3f}" for m, v in headline["clean_dice"].items()))


if __name__ == "__main__":
  launch_utils.run(main)
