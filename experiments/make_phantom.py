r"""Writes a phantom BraTS-format dataset and prints its summary.

  python -m experiments.make_phantom --out /tmp/phantom --cases 4 --naming 2021
  python -m experiments.make_phantom --out /tmp/phantom23 --cases 2 --naming 2023 --shape 96,96,64 --seed 7
  python -m experiments.make_phantom --out /tmp/phantom_v1 --cases 4 --version v1    # the old phantom
  python -m experiments.make_phantom --out /tmp/faint --cases 4 --phantom tumour_contrast=0.3,lookalikes=2

The folder loads with `mri_poison.data.loaders.load_brats_case` exactly like a real BraTS download.
"""
from absl import app
from absl import flags

from experiments import launch_utils
from mri_poison.data import phantom

_OUT = flags.DEFINE_string("out", None, "Dataset root to write (created if missing).", required=True)
_CASES = flags.DEFINE_integer("cases", 4, "Number of cases; case i uses seed --seed + i.")
_NAMING = flags.DEFINE_enum("naming", "2021", ["2021", "2023"], "BraTS file-naming and label convention.")
_SHAPE = flags.DEFINE_list("shape", ["64"], "Grid: one size (cube) or X,Y,Z.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the first case.")
_MODALITIES = flags.DEFINE_list("modalities", ["t1", "t1ce", "t2", "flair"], "Channels to write (+ 'ct').")
_VERSION = flags.DEFINE_enum("version", phantom.DEFAULT_VERSION, list(phantom.VERSIONS), "Phantom version.")
_PHANTOM = flags.DEFINE_list("phantom", [], "v2 options as field=value (data.phantom in a config), e.g. "
                             "tumour_contrast=0.5,skull_strip=False.")


def _options(items):
  from mri_poison.data import phantom_v2  # pylint: disable=g-import-not-at-top
  defaults, options = phantom_v2.default_config(), {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep or key not in defaults:
      raise app.UsageError(f"--phantom {item!r}: expected field=value with a field of {sorted(defaults)}")
    kind = type(defaults[key])
    options[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
  return options


def main(argv):
  del argv
  shape = tuple(int(s) for s in _SHAPE.value)
  if len(shape) == 1:
    shape = shape * 3
  if len(shape) != 3:
    raise app.UsageError(f"--shape takes one size or three, got {_SHAPE.value}")
  case_dirs, seconds = phantom.timed_write(_OUT.value, _CASES.value, naming=_NAMING.value, shape=shape,
                                           seed=_SEED.value, modalities=tuple(_MODALITIES.value),
                                           version=_VERSION.value, options=_options(_PHANTOM.value) or None)
  print(phantom.format_summary(phantom.summarize(case_dirs), _OUT.value, seconds))


if __name__ == "__main__":
  launch_utils.run_plain(main)
