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
      "clean Dice: " + ", ".join(f"{m} {v:.3f}" for m, v in h["clean_dice"].items()),
      f"adaptive Dice at eps {h['reference_eps']:g}: "
      + ", ".join(f"{m} {v:.3f}" for m, v in h["adaptive_dice_at_reference_eps"].items()),
      "eps at which adaptive Dice halves: " + ", ".join(
          f"{m} {v['eps_half']:.3g} [{v['ci_low']:.3g}, {v['ci_high']:.3g}]" for m, v in h["halving_budget"].items())])


if __name__ == "__main__":
  launch_utils.run(main)
