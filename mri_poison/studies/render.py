"""report.md of any finished workdir written again from its files: the main job's or one study's."""
from __future__ import annotations

import importlib
import os

from mri_poison.train import workdir as workdir_lib

# A config key only that study's config has: how a workdir's config.json says which study wrote it.
STUDY_KEYS = {"reproduce": "stages", "robustify": "distill", "poison": "gan", "deform": "arm2d",
              "unlearnable": "protect"}


def study_of(workdir: str) -> str:
  """The study (or "reproduce", the main job) whose run wrote `workdir`, from its config.json."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{workdir} has no config.json: not the workdir of a finished run")
  keys = set(workdir_lib.read_json(path, workdir)["config"])
  found = [name for name, key in STUDY_KEYS.items() if key in keys]
  if len(found) != 1:
    raise ValueError(f"{path}: cannot tell which study wrote it (config keys {sorted(keys)}; expected exactly "
                     f"one of {STUDY_KEYS})")
  return found[0]


def render(workdir: str) -> str:
  """Writes `workdir`/report.md again with the study's own `render`; returns its path."""
  workdir = os.path.abspath(os.fspath(workdir))
  return importlib.import_module(f"mri_poison.studies.{study_of(workdir)}").render(workdir)
