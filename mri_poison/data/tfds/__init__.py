"""TFDS builders `brats` and `brats_phantom` (array_record; built and read without TensorFlow).

Importing this package registers both builders with `tensorflow_datasets`.
"""
from mri_poison.data.tfds.brats import Brats, BratsConfig
from mri_poison.data.tfds.brats_phantom import BratsPhantom, BratsPhantomConfig
