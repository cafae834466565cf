r"""Study 4: unlearnable examples (min-min, UMed) for segmentation; see experiments/configs/unlearnable.py for commands.

  python -m experiments.unlearnable --config experiments/configs/unlearnable.py:runlocal --workdir /tmp/unlearnable
"""
from absl import app
from absl import flags
from absl import logging

from experiments import launch_utils
from mri_poison.studies import unlearnable

_CONFIG = launch_utils.define_config("experiments/configs/unlearnable.py")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where models, results, figures and report.md go.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required (where models, results, figures and report.md go)")
  launch_utils.init_processes()
  logging.set_verbosity(logging.INFO)
  headline = unlearnable.run(_CONFIG.value, _WORKDIR.value)
  print(f"report: {_WORKDIR.value}/report.md")
  print("clean-test Dice of victims (standard training): " + ", ".join(
      f"{name.split('/')[0]} {d['mean']:.3f}" for name, d in headline["dice"].items() if name.endswith("/standard")))
  print("PSNR (dB): " + ", ".join(f"{m} {v:.1f}" for m, v in headline["psnr_db"].items()))


if __name__ == "__main__":
  launch_utils.run(main)
