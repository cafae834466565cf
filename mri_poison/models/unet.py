"""A Flax Linen U-Net for 2D slices and 3D volumes (channel-last), laid out like MONAI's BasicUNet.

Encoder level i: two (3x3[x3] conv -> norm -> dropout -> activation) blocks; 2x max-pool between levels.
Decoder level i: 2x up-sampling of the level below (to half its width, except at the top level, as in
BasicUNet's `halves`), concatenation [skip, up] and two conv blocks; a final 1x1[x1] conv gives the logits.

Up-sampling is a stride-2, kernel-2 transposed conv written as a 1x1[x1] conv to 2^ndim * C channels followed
by a depth-to-space reshape (`DepthToSpaceUp`): mathematically identical, and on GPU one fast matmul-like conv
instead of XLA's slow 3D transposed convolution (see the project's architecture notes, "Numerics and speed").
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mri_poison.models.conv import Conv, conv

# MONAI BasicUNet layout: five encoder widths, then the width of the decoder's last (full-resolution) level.
BASIC_UNET_FEATURES = (32, 32, 64, 128, 256, 32)
LEAKY_RELU_SLOPE = 0.1


def basic_unet_features() -> tuple[int, ...]:
  """Features of MONAI's BasicUNet (5.75M params in 3D with 4 in / 4 out channels)."""
  return BASIC_UNET_FEATURES


def split_features(features: Sequence[int], final_features: int | None = None) -> tuple[tuple[int, ...], int]:
  """(encoder widths, width of the decoder's top level).

  With `final_features` given, every entry of `features` is an encoder level. Without it, a 6-tuple follows
  the MONAI BasicUNet convention (5 encoder levels + the decoder's final width); any other length is all
  encoder levels and the top decoder level keeps `features[0]`.
  """
  features = tuple(int(f) for f in features)
  if final_features is not None:
    encoder, final = features, int(final_features)
  elif len(features) == 6:
    encoder, final = features[:5], features[5]
  else:
    encoder, final = features, features[0]
  if len(encoder) < 1 or min(encoder + (final,)) < 1:
    raise ValueError(f"UNet features must be positive, got features={features}, final_features={final_features}")
  return encoder, final


def depth_to_space(x: jax.Array, channels: int) -> jax.Array:
  """(B, *S, 2^n * C) -> (B, *2S, C); channel index = (offset_0, ..., offset_{n-1}, c) in row-major order."""
  batch, spatial = x.shape[0], x.shape[1:-1]
  n = len(spatial)
  x = x.reshape((batch, *spatial, *(2,) * n, channels))
  # (B, s0, .., s_{n-1}, o0, .., o_{n-1}, C) -> (B, s0, o0, s1, o1, ..., C)
  perm = [0] + [a for i in range(n) for a in (1 + i, 1 + n + i)] + [1 + 2 * n]
  x = x.transpose(perm)
  return x.reshape((batch, *(2 * s for s in spatial), channels))


def conv_transpose_to_depth_to_space_kernel(kernel: jax.Array, transpose_kernel: bool = False) -> jax.Array:
  """Kernel of a stride-2, kernel-2 `jax.lax.conv_transpose` -> (C_in, 2^n * C_out) for `DepthToSpaceUp`.

  `kernel` is laid out (2,)*n + (I, O) and read as `jax.lax.conv_transpose(..., transpose_kernel=...)` reads
  it. False (lax's default): (2,)*n + (C_in, C_out) and output offset a reads tap
  1 - a. True (the gradient-of-conv convention): (2,)*n + (C_out, C_in), spatially flipped and I/O swapped,
  so offset a reads tap a.
  """
  n = kernel.ndim - 2
  if kernel.shape[:n] != (2,) * n:
    raise ValueError(f"expected a (2,)*{n} transposed-conv kernel, got shape {kernel.shape}")
  if transpose_kernel:
    kernel = jnp.swapaxes(kernel, -1, -2)
  else:
    kernel = kernel[(slice(None, None, -1),) * n]
  c_in, c_out = kernel.shape[-2:]
  # (o0..o_{n-1}, C_in, C_out) -> (C_in, o0..o_{n-1}, C_out) -> (C_in, 2^n C_out)
  kernel = jnp.moveaxis(kernel, n, 0)
  return kernel.reshape((c_in, 2**n * c_out))


class DepthToSpaceUp(nn.Module):
  """2x up-sampling = stride-2 kernel-2 transposed conv, as a 1x1[x1] conv to 2^n * C channels + reshape.

  Params: `kernel` (C_in, 2^n * features) and `bias` (features,) — the same count as the transposed conv.
  """
  features: int
  dtype: Any = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x):
    n = x.ndim - 2
    c_in = x.shape[-1]
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (c_in, 2**n * self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
    x = x.astype(self.dtype)
    # A 1x1[x1] conv (what the architecture notes measured), not a dot: XLA picks the conv kernels for it.
    y = conv(x, kernel.astype(self.dtype).reshape((1,) * n + kernel.shape), padding="VALID", impl=self.conv_impl)
    y = depth_to_space(y, self.features)
    return y + bias.astype(self.dtype)


class ConvBlock(nn.Module):
  """conv 3^n (bias) -> norm -> dropout -> activation, MONAI `Convolution`'s default "NDA" order.

  conv_dtype: the conv's own compute dtype (None -> dtype); its output is cast to dtype after.
  conv_impl: "auto" | "xla" | "folded" (`mri_poison.models.conv`); the params are the same whichever.
  """
  features: int
  norm: str = "instance"
  activation: str = "leaky_relu"
  dropout: float = 0.0
  dtype: Any = jnp.float32
  conv_dtype: Any = None
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x, train: bool):
    n = x.ndim - 2
    conv_dtype = self.dtype if self.conv_dtype is None else self.conv_dtype
    x = Conv(self.features, (3,) * n, padding="SAME", dtype=conv_dtype, impl=self.conv_impl)(x)
    x = x.astype(self.dtype)
    x = _norm(self.norm, self.dtype, train)(x)
    if self.dropout > 0:
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return _activation(self.activation)(x)


def _norm(kind: str, dtype, train: bool):
  # Statistics are reduced in float32 by flax even under bfloat16 compute.
  if kind == "instance":
    return nn.InstanceNorm(epsilon=1e-5, dtype=dtype, param_dtype=jnp.float32)
  if kind == "group":
    return _GroupNorm(dtype=dtype)
  if kind == "batch":
    # Needs `mutable=["batch_stats"]` when train=True; running averages are used at eval time.
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype,
                        param_dtype=jnp.float32)
  if kind == "none":
    return lambda x: x
  raise ValueError(f"UNet norm must be 'instance', 'group', 'batch' or 'none', got {kind!r}")


class _GroupNorm(nn.Module):
  """GroupNorm with up to 8 groups, fewer where the width is not divisible."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    groups = max(g for g in range(1, min(8, c) + 1) if c % g == 0)
    return nn.GroupNorm(num_groups=groups, epsilon=1e-5, dtype=self.dtype, param_dtype=jnp.float32)(x)


def _activation(kind: str):
  if kind == "leaky_relu":
    return lambda x: nn.leaky_relu(x, LEAKY_RELU_SLOPE)
  if kind == "relu":
    return nn.relu
  if kind == "gelu":
    return nn.gelu
  if kind == "silu":
    return nn.silu
  raise ValueError(f"UNet activation must be 'leaky_relu', 'relu', 'gelu' or 'silu', got {kind!r}")


class TwoConv(nn.Module):
  features: int
  norm: str = "instance"
  activation: str = "leaky_relu"
  dropout: float = 0.0
  dtype: Any = jnp.float32
  first_conv_dtype: Any = None  # compute dtype of conv_0's convolution (None -> dtype)
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x, train: bool):
    kw = dict(norm=self.norm, activation=self.activation, dropout=self.dropout, dtype=self.dtype,
              conv_impl=self.conv_impl)
    x = ConvBlock(self.features, **kw, conv_dtype=self.first_conv_dtype, name="conv_0")(x, train)
    return ConvBlock(self.features, **kw, name="conv_1")(x, train)


class UNet(nn.Module):
  """U-Net on channel-last input (B, *S, C), 2D or 3D by rank; returns float32 logits (B, *S, out_channels).

  features: encoder widths per level (see `split_features`; `BASIC_UNET_FEATURES` gives MONAI's BasicUNet).
    Spatial dims must be divisible by 2^(levels - 1).
  final_features: width of the decoder's top level; None -> BasicUNet convention / features[0].
  dtype: compute dtype (e.g. bfloat16); params stay float32 and logits are returned in float32.
  input_dtype: dtype of the input and of the first convolution, whose output is then cast to `dtype`. The
    default float32 keeps small input perturbations: bfloat16 has 8 significant bits, so on z-scored values
    of 1..3 a change below ~0.004..0.008 would be rounded away before the model sees it (an attack's or
    adversarial training's eps 0.01 partly, 1e-3 entirely). For float32 models it changes nothing; "bfloat16"
    gives the old all-bfloat16 path. A name ("float32") or a dtype.
  conv_impl: how convolutions are computed, "auto" | "xla" | "folded" (`mri_poison.models.conv`): "auto" folds
    3D convs into 2D ones on CPU (several times faster there) and keeps XLA's native conv on GPU/TPU. The
    params and (within float32 round-off) the outputs are the same whichever.
  remat: recompute each block's activations in the backward pass instead of storing them (jax.checkpoint):
    less memory for larger inputs or batches, about one extra forward pass of compute. Same params, same
    numbers.
  deep_supervision: if True, return a tuple (final, aux_1, ..., aux_{L-2}) where aux_k are 1x1 heads on the
    decoder at 1/2^k resolution (at their own scale, finest first), as in nnU-Net; see
    `mri_poison.losses.deep_supervision_loss`.
  """
  features: Sequence[int] = (32, 64, 128, 256)
  out_channels: int = 4
  norm: str = "instance"
  activation: str = "leaky_relu"
  dropout: float = 0.0
  dtype: Any = jnp.float32
  deep_supervision: bool = False
  final_features: int | None = None
  input_dtype: Any = jnp.float32
  remat: bool = False
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x, *, train: bool = False, temperature=1.0):
    encoder, final = split_features(self.features, self.final_features)
    n = x.ndim - 2
    if n not in (1, 2, 3):
      raise ValueError(f"UNet input must be (B, *spatial, C) with 1-3 spatial dims, got shape {x.shape}")
    factor = 2 ** (len(encoder) - 1)
    if any(s % factor for s in x.shape[1:-1]):
      raise ValueError(f"UNet with {len(encoder)} levels needs spatial dims divisible by {factor}, "
                       f"got input shape {x.shape}")
    kw = dict(norm=self.norm, activation=self.activation, dropout=self.dropout, dtype=self.dtype,
              conv_impl=self.conv_impl)
    input_dtype = jnp.dtype(self.input_dtype)
    x = x.astype(input_dtype)
    block = nn.remat(TwoConv, static_argnums=(2,)) if self.remat else TwoConv  # (self, x, train): train static

    skips = []
    for level, width in enumerate(encoder):
      if level > 0:
        x = nn.max_pool(x, (2,) * n, strides=(2,) * n)
      first = dict(first_conv_dtype=input_dtype) if level == 0 else {}
      x = block(width, **kw, **first, name=f"down_{level}")(x, train)
      skips.append(x)

    aux = []
    for level in reversed(range(len(encoder) - 1)):
      top = level == 0
      up_width = x.shape[-1] if top else x.shape[-1] // 2
      up = DepthToSpaceUp(up_width, dtype=self.dtype, conv_impl=self.conv_impl, name=f"up_{level}")(x)
      x = jnp.concatenate([skips[level], up], axis=-1)
      x = block(final if top else encoder[level], **kw, name=f"upcat_{level}")(x, train)
      if self.deep_supervision and not top:
        aux.append(self._head(x, f"aux_head_{level}"))

    logits = self._head(x, "final_conv")
    temperature = jnp.asarray(temperature, jnp.float32)
    if self.deep_supervision:
      return (logits / temperature,) + tuple(a / temperature for a in reversed(aux))
    return logits / temperature

  def _head(self, x, name):
    n = x.ndim - 2
    y = Conv(self.out_channels, (1,) * n, dtype=self.dtype, impl=self.conv_impl, name=name)(x)
    return y.astype(jnp.float32)


Model = UNet  # `mri_poison.models.get_model("unet", ...)`
