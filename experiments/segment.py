r"""Segments a new scan with a trained model: `mri_poison.train.segment.write_segmentation`.

  python -m experiments.segment --workdir runs/reproduce/robustify --model undefended \
      --input /data/BraTS2021/BraTS2021_00000 --output pred.nii.gz
  python -m experiments.segment --workdir /tmp/unet_runlocal --input CASE_DIR --output pred.nii.gz

--workdir is a study's workdir (its models/<name>/, chosen with --model) or an `experiments.train` workdir;
--input a BraTS case folder (2018-21 or 2023+ names) or an MSD Task01 image. The prediction has the input's
shape and affine, in its folder's label convention (4 = enhancing tumour for BraTS 2018-21 names).
"""
from absl import flags

from experiments import launch_utils

_WORKDIR = flags.DEFINE_string("workdir", None, "A study's or experiments.train's workdir holding the model.",
                               required=True)
_MODEL = flags.DEFINE_string("model", None, "The model's name in a study workdir (models/<name>), e.g. undefended.")
_INPUT = flags.DEFINE_string("input", None, "A BraTS case folder or an MSD Task01 image.", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Where the labels go (.nii.gz).", required=True)


def main(argv):
  del argv
  from mri_poison.train import loop, segment  # pylint: disable=import-outside-toplevel
  apply_fn, params, config = loop.load_model(_WORKDIR.value, _MODEL.value)
  summary = segment.write_segmentation(apply_fn, params, config, _INPUT.value, _OUTPUT.value)
  print(f"wrote {summary['output']}: grid {'x'.join(map(str, summary['shape']))}, BraTS {summary['convention']} "
        f"labels, voxels per label {summary['voxels']}")


if __name__ == "__main__":
  launch_utils.run_plain(main)
