r"""Writes a finished study's report.md again from its result files, recomputing nothing.

  python -m experiments.render --workdir runs/reproduce/robustify

For a wording fix in a report, or a report of a run whose files were copied from a cluster. Study 2
(robustify) so far; the other studies still write their report only at the end of a run.
"""
from absl import flags

from experiments import launch_utils

_WORKDIR = flags.DEFINE_string("workdir", None, "A finished study workdir (its results/ and config.json).",
                               required=True)


def main(argv):
  del argv
  from mri_poison.studies import robustify  # pylint: disable=import-outside-toplevel
  print(f"wrote {robustify.render(_WORKDIR.value)}")


if __name__ == "__main__":
  launch_utils.run_plain(main)
