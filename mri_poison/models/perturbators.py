"""UMed's perturbation generators (arXiv 2403.14250; layout from a third-party re-implementation, see methods.md).

- `CDConv`: central-difference convolution, y = conv(x, W) + b - theta * x . sum(W) (the kernel summed over its
  taps: a 1x1 conv), i.e. a conv of the differences x(p + k) - theta * x(p). theta = 0 is a plain conv.
- `PerturbatorUNet`: a small U-Net (2D or 3D) whose encoder uses CDC blocks (`cdc=True`, the contour
  perturbator G_c) or plain convs (the texture perturbator G_t); it returns raw maps (B, *S, C).
- `contour_delta` / `texture_delta`: the bounded perturbations built from those raw maps,
  delta_c = eps * tanh(G_c(x)) * C and delta_t = clip(eps * tanh(G_t(x)), -eps * LBP(x), eps * LBP(x)) * I,
  with C the contour band and I the interior (`mri_poison.ops.morphology`), LBP from `mri_poison.ops.texture`.
  eps broadcasts against (B, *S, C) (per example and channel: budgets in z-score units).
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from mri_poison.models.conv import Conv
from mri_poison.models.unet import DepthToSpaceUp, _activation, _norm


class CDConv(nn.Module):
  """Central-difference conv: conv(x, W) + b - theta * (x . sum_taps W); same params as `nn.Conv`."""
  features: int
  kernel_size: int = 3
  theta: float = 0.5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    n = x.ndim - 2
    conv = Conv(self.features, (self.kernel_size,) * n, padding="SAME", dtype=self.dtype,
                   param_dtype=jnp.float32, name="conv")
    y = conv(x)
    if self.theta == 0:
      return y
    kernel = conv.variables["params"]["kernel"]  # (*taps, C_in, C_out)
    centre = jnp.einsum("...i,io->...o", x.astype(self.dtype), kernel.sum(axis=tuple(range(n))).astype(self.dtype))
    return y - jnp.asarray(self.theta, self.dtype) * centre


class _Block(nn.Module):
  features: int
  cdc: bool
  theta: float
  norm: str
  dtype: Any

  @nn.compact
  def __call__(self, x):
    n = x.ndim - 2
    for i in range(2):
      if self.cdc:
        x = CDConv(self.features, theta=self.theta, dtype=self.dtype, name=f"cdc_{i}")(x)
      else:
        x = Conv(self.features, (3,) * n, padding="SAME", dtype=self.dtype, param_dtype=jnp.float32,
                    name=f"conv_{i}")(x)
      x = _norm(self.norm, self.dtype, False)(x)
      x = _activation("leaky_relu")(x)
    return x


class PerturbatorUNet(nn.Module):
  """Encoder (CDC blocks when `cdc`) -> decoder with skips -> 1x1 conv to `out_channels` raw maps (float32).

  Spatial sizes must be divisible by 2^(len(features) - 1). The last conv starts at zero, so an untrained
  perturbator outputs delta = 0 (training starts from the clean images).
  """
  features: Sequence[int] = (8, 16)
  out_channels: int = 4
  cdc: bool = False
  theta: float = 0.5
  norm: str = "instance"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    n = x.ndim - 2
    skips = []
    for level, width in enumerate(self.features):
      if level:
        x = nn.max_pool(x, (2,) * n, strides=(2,) * n)
      x = _Block(int(width), self.cdc, self.theta, self.norm, self.dtype, name=f"down_{level}")(x)
      skips.append(x)
    for level in range(len(self.features) - 2, -1, -1):
      x = DepthToSpaceUp(int(self.features[level]), dtype=self.dtype, name=f"up_{level}")(x)
      x = jnp.concatenate([skips[level], x], axis=-1)
      x = _Block(int(self.features[level]), False, 0.0, self.norm, self.dtype, name=f"upcat_{level}")(x)
    y = Conv(self.out_channels, (1,) * n, kernel_init=nn.initializers.zeros_init(), dtype=self.dtype,
                param_dtype=jnp.float32, name="head")(x)
    return y.astype(jnp.float32)


def contour_delta(raw, band, eps):
  """eps * tanh(raw) on the contour band (band (B, *S) bool or float), zero elsewhere."""
  return jnp.asarray(eps, jnp.float32) * jnp.tanh(raw) * jnp.asarray(band, jnp.float32)[..., None]


def texture_delta(raw, lbp_map, interior, eps):
  """clip(eps * tanh(raw), -eps * LBP, eps * LBP) on the interior, zero elsewhere (|delta| <= eps * LBP <= eps)."""
  eps = jnp.asarray(eps, jnp.float32)
  bound = eps * lbp_map
  return jnp.clip(eps * jnp.tanh(raw), -bound, bound) * jnp.asarray(interior, jnp.float32)[..., None]
