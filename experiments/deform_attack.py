r"""Study 3: learned deformation-and-appearance attack; see experiments/configs/deform.py for commands.

  python -m experiments.deform_attack --config experiments/configs/deform.py:runlocal --workdir /tmp/deform
"""
from absl import flags

from experiments import launch_utils
from mri_poison.studies import deform

_CONFIG = launch_utils.define_config("experiments/configs/deform.py")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where models, results, figures and report.md go.")


def main(argv):
  launch_utils.run_study(deform.run, _CONFIG.value, _WORKDIR.value, argv, summary=lambda h: [
      f"[{r['arm']}] {r['comparison']}: {r['mean_diff']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}] "
      f"Holm p={r['p_holm']:.3g} (n={r['n']})" for r in h["primary"]])


if __name__ == "__main__":
  launch_utils.run(main)
