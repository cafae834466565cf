r"""Study 2: gradient attacks and defences on a 3D U-Net; see experiments/configs/robustify.py for commands.

  python -m experiments.robustify --config experiments/configs/robustify.py:runlocal --workdir /tmp/robustify
"""
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from experiments import launch_utils
from mri_poison.studies import robustify

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/robustify.py",
                                          "Study config (file.py:variant).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where models, results, figures and report.md go.",
                               required=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  launch_utils.init_processes()
  logging.set_verbosity(logging.INFO)
  headline = robustify.run(_CONFIG.value, _WORKDIR.value)
  print(f"report: {_WORKDIR.value}/report.md")
  print("clean Dice: " + ", ".join(f"{m} {v:.3f}" for m, v in headline["clean_dice"].items()))


if __name__ == "__main__":
  app.run(main)
