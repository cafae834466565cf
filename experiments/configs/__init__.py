"""Launcher configs: one `get_config(variant)` per file; `base_config` is the header they share."""
import ml_collections


def base_config(arg: str | None, variants, default: str = "phantom") -> ml_collections.ConfigDict:
  """A config holding the checked variant (`arg` or `default`) and seed 0; raises naming the known variants."""
  variant = arg or default
  if variant not in variants:
    raise ValueError(f"unknown config variant {arg!r}: expected one of {tuple(variants)}")
  config = ml_collections.ConfigDict()
  config.variant = variant
  config.seed = 0
  return config
