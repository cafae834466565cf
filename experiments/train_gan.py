r"""Study 1's translation GAN alone; see experiments/configs/gan.py for commands and variants.

  python -m experiments.train_gan --config experiments/configs/gan.py:runlocal --workdir /tmp/gan
"""
from absl import flags

from experiments import launch_utils
from mri_poison.studies import poison

_CONFIG = launch_utils.define_config("experiments/configs/gan.py")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where the GAN's checkpoints, results, figures and report.md go.")


def main(argv):
  launch_utils.run_study(poison.run_gan, _CONFIG.value, _WORKDIR.value, argv, summary=lambda q: [
      ", ".join(f"{m} {v['mean']:.3f} +- {v['sd']:.3f}" for m, v in q.items())])


if __name__ == "__main__":
  launch_utils.run(main)
