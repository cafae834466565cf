r"""Study 4: unlearnable examples (min-min, UMed) for segmentation; see experiments/configs/unlearnable.py for commands.

  python -m experiments.unlearnable --config experiments/configs/unlearnable.py:runlocal --workdir /tmp/unlearnable
"""
from absl import flags

from experiments import launch_utils
from mri_poison.studies import unlearnable

_CONFIG = launch_utils.define_config("experiments/configs/unlearnable.py")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where models, results, figures and report.md go.")


def main(argv):
  launch_utils.run_study(unlearnable.run, _CONFIG.value, _WORKDIR.value, argv, summary=lambda h: [
      "clean-test Dice of victims (standard training): " + ", ".join(
          f"{name.split('/')[0]} {d['mean']:.3f}" for name, d in h["dice"].items() if name.endswith("/standard")),
      "PSNR (dB): " + ", ".join(f"{m} {v:.1f}" for m, v in h["psnr_db"].items())])


if __name__ == "__main__":
  launch_utils.run(main)
