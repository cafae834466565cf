r"""Study 1: synthetic-data poisoning sweep; see experiments/configs/poison.py for commands and variants.

  python -m experiments.poison_sweep --config experiments/configs/poison.py:runlocal --workdir /tmp/poison
"""
from absl import flags

from experiments import launch_utils
from mri_poison.studies import poison

_CONFIG = launch_utils.define_config("experiments/configs/poison.py")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where models, results, figures and report.md go.")


def main(argv):
  launch_utils.run_study(poison.run, _CONFIG.value, _WORKDIR.value, argv, summary=lambda h: [
      f"{mode}: Dice by k " + ", ".join(f"{k}: {v:.3f}" for k, v in h[mode]["dice"].items())
      for mode in _CONFIG.value.sweep.modes])


if __name__ == "__main__":
  launch_utils.run(main)
