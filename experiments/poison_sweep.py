r"""Study 1: synthetic-data poisoning sweep; see experiments/configs/poison.py for commands and variants.

  python -m experiments.poison_sweep --config experiments/configs/poison.py:runlocal --workdir /tmp/poison
"""
from absl import app
from absl import flags
from absl import logging

from experiments import launch_utils
from mri_poison.studies import poison

_CONFIG = launch_utils.define_config("experiments/configs/poison.py")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where models, results, figures and report.md go.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required (where models, results, figures and report.md go)")
  launch_utils.init_processes()
  logging.set_verbosity(logging.INFO)
  headline = poison.run(_CONFIG.value, _WORKDIR.value)
  print(f"report: {_WORKDIR.value}/report.md")
  for mode in _CONFIG.value.sweep.modes:
    print(f"{mode}: Dice by k " + ", ".join(f"{k}: {v:.3f}" for k, v in headline[mode]["dice"].items()))


if __name__ == "__main__":
  launch_utils.run(main)
