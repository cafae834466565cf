r"""Study 1's translation GAN alone; see experiments/configs/gan.py for commands and variants.

  python -m experiments.train_gan --config experiments/configs/gan.py:runlocal --workdir /tmp/gan
"""
from absl import app
from absl import flags
from absl import logging

from experiments import launch_utils
from mri_poison.studies import poison

_CONFIG = launch_utils.define_config("experiments/configs/gan.py")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where the GAN's checkpoints, results, figures and report.md go.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required (where checkpoints, results and report.md go)")
  launch_utils.init_processes()
  logging.set_verbosity(logging.INFO)
  quality = poison.run_gan(_CONFIG.value, _WORKDIR.value)
  print(f"report: {_WORKDIR.value}/report.md")
  print(", ".join(f"{m} {v['mean']:.3f} +- {v['sd']:.3f}" for m, v in quality.items()))


if __name__ == "__main__":
  launch_utils.run(main)
