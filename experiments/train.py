r"""Trains and evaluates a U-Net: `mri_poison.train.evaluate.train_and_evaluate(config, workdir)`.

  python -m experiments.train --config experiments/configs/unet.py:runlocal --workdir /tmp/unet_runlocal

Re-running the same command on the same workdir resumes from the latest checkpoint. See the config file's
docstring for the variants and their commands.
"""
from absl import app, flags, logging

from experiments import launch_utils

_CONFIG = launch_utils.define_config("experiments/configs/unet.py:runlocal")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and results go (resumable).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required (where checkpoints, metrics and results go)")
  launch_utils.init_processes()
  from mri_poison.train.evaluate import train_and_evaluate
  summary = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  dice = {k: round(v["mean"], 4) for k, v in summary.items() if k.endswith("_dice")}
  logging.info("val mean Dice over %d cases: %s", summary.get("n_cases", 0), dice)
  logging.info("results in %s/results", _WORKDIR.value)


if __name__ == "__main__":
  launch_utils.run(main)
