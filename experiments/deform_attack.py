r"""Study 3: learned deformation-and-appearance attack; see experiments/configs/deform.py for commands.

  python -m experiments.deform_attack --config experiments/configs/deform.py:runlocal --workdir /tmp/deform
"""
from absl import app
from absl import flags
from absl import logging

from experiments import launch_utils
from mri_poison.studies import deform

_CONFIG = launch_utils.define_config("experiments/configs/deform.py")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where models, results, figures and report.md go.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required (where models, results, figures and report.md go)")
  launch_utils.init_processes()
  logging.set_verbosity(logging.INFO)
  headline = deform.run(_CONFIG.value, _WORKDIR.value)
  print(f"report: {_WORKDIR.value}/report.md")
  for row in headline["primary"]:
    print(f"[{row['arm']}] {row['comparison']}: {row['mean_diff']:+.3f} "
          f"[{row['ci_low']:+.3f}, {row['ci_high']:+.3f}] Holm p={row['p_holm']:.3g} (n={row['n']})")


if __name__ == "__main__":
  launch_utils.run(main)
