r"""The main job: the four studies at small scale on the embedded phantom, summarised in one report.md.

  python -m experiments.reproduce                      # writes runs/reproduce/report.md (~18 min on 2 CPU cores)
  python -m experiments.reproduce --config experiments/configs/reproduce.py:test --workdir /tmp/reproduce_test
See experiments/configs/reproduce.py for the variants and overrides.
"""
from absl import flags

from experiments import launch_utils
from mri_poison.studies import reproduce

_CONFIG = launch_utils.define_config("experiments/configs/reproduce.py")
_WORKDIR = flags.DEFINE_string("workdir", "runs/reproduce", "Where every study's folder and report.md go.")


def main(argv):
  launch_utils.run_study(reproduce.run, _CONFIG.value, _WORKDIR.value, argv, summary=lambda records: [
      f"{name}: {r['status']}{' (reused)' if r.get('reused') else ''} in {r['seconds']:.0f} s"
      for name, r in records.items()])


if __name__ == "__main__":
  launch_utils.run(main)
