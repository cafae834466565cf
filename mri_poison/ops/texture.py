"""Local binary patterns (LBP): a per-voxel texture code in [0, 1].

2D (8-neighbour): bit i is set when neighbour i (clockwise from the top-left) is at least as bright as the
centre (standard LBP, s(g_i - g_c) with s(0) = 1); the code sum_i 2^i bit_i is divided by 2^8 - 1. 3D
(6-neighbour: +-x, +-y, +-z) likewise over 6 bits and 2^6 - 1. A flat region therefore codes 1 (every bit set),
so UMed's texture perturbation, clipped to +-eps * LBP, keeps its full budget on flat tissue and less on a local
maximum. Borders repeat the edge voxel (edge padding), so the outside counts as an equal neighbour. Computed per
channel.
"""
from __future__ import annotations

import jax.numpy as jnp

OFFSETS_2D = ((-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1))
OFFSETS_3D = ((-1, 0, 0), (1, 0, 0), (0, -1, 0), (0, 1, 0), (0, 0, -1), (0, 0, 1))


def lbp(x, ndim: int = 2):
  """LBP map of `x` (B, *S, C) or (*S, C) with `ndim` spatial axes right before the channel axis; float32 in [0, 1]."""
  ndim = int(ndim)
  if ndim not in (2, 3) or jnp.ndim(x) < ndim + 1:
    raise ValueError(f"lbp: expected an image (..., *S, C) with ndim in (2, 3) spatial axes, got shape "
                     f"{jnp.shape(x)}, ndim={ndim}")
  x = jnp.asarray(x, jnp.float32)
  lead = x.ndim - ndim - 1
  spatial = x.shape[lead:lead + ndim]
  padded = jnp.pad(x, ((0, 0),) * lead + ((1, 1),) * ndim + ((0, 0),), mode="edge")
  offsets = OFFSETS_2D if ndim == 2 else OFFSETS_3D
  code = jnp.zeros_like(x)
  for bit, offset in enumerate(offsets):
    index = (slice(None),) * lead + tuple(slice(1 + o, 1 + o + n) for o, n in zip(offset, spatial))
    code = code + jnp.where(padded[index] >= x, float(2**bit), 0.0)
  return code / float(2**len(offsets) - 1)

