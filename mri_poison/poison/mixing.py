"""Training sets with a given synthetic share (study 1): which cases are synthetic, and the mixed case lists.

A sweep over k = 0..n_parts-1 draws ONE permutation of the cases from the seed and makes the first
round(k n / n_parts) of it synthetic, so the synthetic sets are nested (k = 2's contains k = 1's) and the
share is the only thing that changes between the sweep's training sets.

  mode "replace" (default): a fixed set size n; the chosen cases' target contrast is replaced by the GAN's
    output. Synthetic share k / n_parts.
  mode "add": every real case, plus a synthetic copy of each chosen case (set size n + round(k n / n_parts));
    synthetic share round(k n / n_parts) / (n + round(k n / n_parts)), i.e. k / (n_parts + k).
Synthetic images keep the label of the case they come from.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from mri_poison.data.case import Case

MODES = ("replace", "add")
SYNTHETIC_SUFFIX = "+syn"


def n_synthetic(n_cases: int, k: int, n_parts: int = 6) -> int:
  """round(k n / n_parts): how many cases are made synthetic at share k / n_parts."""
  if not 0 <= int(k) <= int(n_parts):
    raise ValueError(f"synthetic share k={k} must be in [0, n_parts={n_parts}]")
  return int(np.floor(int(k) * int(n_cases) / int(n_parts) + 0.5))


def choose_synthetic(n_cases: int, k: int, *, n_parts: int = 6, seed: int = 0) -> list[int]:
  """Sorted indices of the cases made synthetic at share k / n_parts: a prefix of a seeded permutation."""
  order = np.random.default_rng(int(seed)).permutation(int(n_cases))
  return sorted(int(i) for i in order[:n_synthetic(n_cases, k, n_parts)])


def mix_cases(real: Sequence[Case], synthetic: Sequence[np.ndarray], k: int, *, mode: str = "replace",
              n_parts: int = 6, seed: int = 0, channel: int = 0) -> tuple[list[Case], dict]:
  """(training cases, record) at synthetic share k / n_parts.

  real: the real cases; synthetic[i]: case i's synthetic volume (X, Y, Z) for image channel `channel`.
  record: {"mode", "k", "n_parts", "seed", "n_cases", "n_real", "n_synthetic", "share", "synthetic_cases"}
  (the ids of the cases whose synthetic image is in the set). Synthetic cases carry id + "+syn" in add mode.
  """
  if mode not in MODES:
    raise ValueError(f"config sweep.mode={mode!r}: expected one of {MODES}")
  if len(synthetic) != len(real):
    raise ValueError(f"mix_cases: {len(synthetic)} synthetic volumes for {len(real)} cases")
  chosen = choose_synthetic(len(real), k, n_parts=n_parts, seed=seed)

  def synth(i: int, case_id: str) -> Case:
    case = real[i]
    image = case.image.copy()
    if synthetic[i].shape != image.shape[:-1]:
      raise ValueError(f"mix_cases: synthetic volume {synthetic[i].shape} does not fit case {case.case_id} "
                       f"{image.shape[:-1]}")
    image[..., channel] = synthetic[i]
    return case.replace(image=image, case_id=case_id)

  if mode == "replace":
    picked = set(chosen)
    cases = [synth(i, c.case_id) if i in picked else c for i, c in enumerate(real)]
  else:
    cases = list(real) + [synth(i, real[i].case_id + SYNTHETIC_SUFFIX) for i in chosen]
  n_syn = len(chosen)
  record = {"mode": mode, "k": int(k), "n_parts": int(n_parts), "seed": int(seed), "n_cases": len(cases),
            "n_real": len(cases) - n_syn, "n_synthetic": n_syn, "share": n_syn / max(len(cases), 1),
            "synthetic_cases": [real[i].case_id for i in chosen]}
  return cases, record
