"""Flax Linen models. Victims are chosen by name (`config.model.name`, default "unet"): the module
`mri_poison.models.<name>` defines `Model`, built from the rest of config.model (big_vision's model registry)."""
import importlib

from mri_poison.models.unet import BASIC_UNET_FEATURES, UNet

VICTIMS = ("unet", "resenc_unet")  # the segmenters a study can train and attack


def get_model(name: str, **kwargs):
  """`mri_poison.models.<name>.Model(**kwargs)`; one clear error for an unknown name or field."""
  if name not in VICTIMS:
    raise ValueError(f"config model.name={name!r}: expected one of {VICTIMS}")
  model_cls = importlib.import_module(f"mri_poison.models.{name}").Model
  try:
    return model_cls(**kwargs)
  except TypeError as e:
    raise ValueError(f"config model (name {name!r}): {e} (keys given: {sorted(kwargs)})") from e
