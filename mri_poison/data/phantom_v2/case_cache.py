"""Generated phantom cases kept on disk, so the same head is built once per machine, not once per process.

A v2 case takes 0.2-2 s to build (the tumour's growth and the oedema's geodesic distance are iterative), and the
studies, their tests and the main job ask for the same heads again and again (every stage and every re-run loads
its splits; the notebook re-opens a finished workdir). A case is a deterministic function of (seed, shape,
modalities, options) and of the code and libraries that build it, so the key hashes all of them: editing any
file of this package or upgrading numpy / scipy / jax / nilearn builds the case afresh. Files live under
`anatomy.cache_dir()`/cases (safe to delete); MRI_POISON_CASE_CACHE=0 turns the cache off. Cases larger than
MAX_VOXELS are not kept (they are GPU-sized and would fill the disk).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from importlib import metadata

import numpy as np

from mri_poison import io_utils
from mri_poison.data.case import Case
from mri_poison.data.phantom_v2 import anatomy

MAX_VOXELS = 64 ** 3
_PACKAGES = ("numpy", "scipy", "jax", "jaxlib", "nilearn")


@functools.lru_cache(maxsize=1)
def _code_stamp() -> str:
  """A hash of the sources that build a case (this package and the v1 noise it borrows) and library versions."""
  here = os.path.dirname(os.path.abspath(__file__))
  sources = sorted(os.path.join(here, f) for f in os.listdir(here) if f.endswith(".py"))
  sources += [os.path.join(os.path.dirname(here), name) for name in ("phantom_v1.py", "case.py")]
  digest = hashlib.sha256()
  for path in sources:
    with open(path, "rb") as f:
      digest.update(os.path.basename(path).encode() + f.read())
  for name in _PACKAGES:
    try:
      digest.update(f"{name}={metadata.version(name)}".encode())
    except metadata.PackageNotFoundError:
      digest.update(f"{name}=absent".encode())
  return digest.hexdigest()


def enabled() -> bool:
  return os.environ.get("MRI_POISON_CASE_CACHE", "1") != "0"


def path_for(seed: int, shape, modalities, options: dict) -> str:
  key = json.dumps(dict(seed=int(seed), shape=list(shape), modalities=list(modalities), options=options,
                        code=_code_stamp()), sort_keys=True)
  return os.path.join(anatomy.cache_dir(), "cases", hashlib.sha256(key.encode()).hexdigest()[:24] + ".npz")


def load(path: str, seed: int, modalities) -> Case | None:
  """The case stored at `path`, or None when it is missing or unreadable (it is then built again)."""
  try:
    with np.load(path, allow_pickle=False) as z:
      return Case(image=np.array(z["image"]), modalities=tuple(modalities), label=np.array(z["label"]),
                  affine=np.array(z["affine"]), spacing=tuple(float(s) for s in z["spacing"]),
                  case_id=f"phantom-{seed}")
  except (OSError, KeyError, ValueError, EOFError):
    return None


def store(path: str, case: Case) -> None:
  try:
    with io_utils.atomic_path(path) as tmp:
      with open(tmp, "wb") as f:
        np.savez(f, image=case.image, label=case.label, affine=case.affine, spacing=np.asarray(case.spacing))
  except OSError:
    pass  # a read-only or full cache disk only costs building the case again next time
