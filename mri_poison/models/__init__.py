"""Flax Linen models."""
from mri_poison.models.unet import BASIC_UNET_FEATURES, UNet
