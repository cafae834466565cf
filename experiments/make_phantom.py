r"""Writes a phantom BraTS-format dataset and prints its summary.

  python -m experiments.make_phantom --out /tmp/phantom --cases 4 --naming 2021
  python -m experiments.make_phantom --out /tmp/phantom23 --cases 2 --naming 2023 --shape 96,96,64 --seed 7

The folder loads with `mri_poison.data.loaders.load_brats_case` exactly like a real BraTS download.
"""
from absl import app
from absl import flags

from mri_poison.data import phantom

_OUT = flags.DEFINE_string("out", None, "Dataset root to write (created if missing).", required=True)
_CASES = flags.DEFINE_integer("cases", 4, "Number of cases; case i uses seed --seed + i.")
_NAMING = flags.DEFINE_enum("naming", "2021", ["2021", "2023"], "BraTS file-naming and label convention.")
_SHAPE = flags.DEFINE_list("shape", ["64"], "Grid: one size (cube) or X,Y,Z.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the first case.")
_MODALITIES = flags.DEFINE_list("modalities", ["t1", "t1ce", "t2", "flair"], "Channels to write (+ 'ct').")


def main(argv):
  del argv
  shape = tuple(int(s) for s in _SHAPE.value)
  if len(shape) == 1:
    shape = shape * 3
  if len(shape) != 3:
    raise app.UsageError(f"--shape takes one size or three, got {_SHAPE.value}")
  case_dirs, seconds = phantom.timed_write(_OUT.value, _CASES.value, naming=_NAMING.value, shape=shape,
                                           seed=_SEED.value, modalities=tuple(_MODALITIES.value))
  print(phantom.format_summary(phantom.summarize(case_dirs), _OUT.value, seconds))


if __name__ == "__main__":
  app.run(main)
