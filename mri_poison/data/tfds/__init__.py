"""TFDS builders `brats` and `brats_phantom` (array_record; built and read without TensorFlow).

Importing this package registers both builders with `tensorflow_datasets`.
"""
import contextlib

from mri_poison.data.tfds.brats import Brats, BratsConfig
from mri_poison.data.tfds.brats_phantom import BratsPhantom, BratsPhantomConfig


@contextlib.contextmanager
def without_progress_bars():
  """TFDS builds without their tqdm bars (a notebook cell filled with them; our own progress line reports the
  study). The setting the caller had is restored after."""
  from tensorflow_datasets.core.utils import tqdm_utils  # pylint: disable=import-outside-toplevel
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  shown = getattr(tqdm_utils, "_active", True)  # TFDS has a setter and no getter
  tfds.display_progress_bar(False)
  try:
    yield
  finally:
    tfds.display_progress_bar(shown)
