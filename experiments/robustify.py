r"""Study 2: gradient attacks and defences on a 3D U-Net; see experiments/configs/robustify.py for commands.

  python -m experiments.robustify --config experiments/configs/robustify.py:runlocal --workdir /tmp/robustify
"""
from absl import flags

from experiments import launch_utils
from mri_poison.studies import robustify

_CONFIG = launch_utils.define_config("experiments/configs/robustify.py")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where models, results, figures and report.md go.")


def main(argv):
  launch_utils.run_study(robustify.run, _CONFIG.value, _WORKDIR.value, argv, summary=lambda h: [
      "clean Dice: " + ", ".join(f"{m} {v:.3f}" for m, v in h["clean_dice"].items())])


if __name__ == "__main__":
  launch_utils.run(main)
