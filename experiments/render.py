r"""Writes a finished run's report.md again from its result files, recomputing nothing.

  python -m experiments.render --workdir runs/reproduce             # the main job: every stage, then the whole
  python -m experiments.render --workdir runs/reproduce/robustify   # one study's workdir

For a wording fix in a report, or a report of a run whose files were copied from a cluster: no model, cell
table or compiler is needed. Which study wrote the workdir is read from its config.json.
"""
from absl import flags

from experiments import launch_utils

_WORKDIR = flags.DEFINE_string("workdir", None, "A finished workdir of the main job or of one study (its "
                               "config.json and results/).", required=True)


def main(argv):
  del argv
  from mri_poison.studies import render  # pylint: disable=import-outside-toplevel
  print(f"wrote {render.render(_WORKDIR.value)}")


if __name__ == "__main__":
  launch_utils.run_plain(main)
