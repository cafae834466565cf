"""A residual-encoder U-Net in the style of nnU-Net's ResEnc presets (Isensee et al., MICCAI 2024), 2D or 3D.

Encoder stage i: `blocks[i]` residual blocks (conv -> norm -> act -> conv -> norm, plus the input, through a
1x1[x1] conv where the width or resolution changes, then act); the first block of every stage but the top one
downsamples with a stride-2 conv instead of a max-pool. Decoder: 2x up-sampling (`unet.DepthToSpaceUp`, a
transposed conv), concatenation with the skip, one plain conv block pair, a 1x1[x1] head. A different victim
from `unet.UNet` (residual paths, strided downsampling, deeper encoder) with the same call signature, so every
study trains and attacks it through the same code (`config.model.name = "resenc_unet"`).
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from mri_poison.models.conv import Conv
from mri_poison.models.unet import DepthToSpaceUp, TwoConv, UNet, _activation, _norm, split_features


class ResidualBlock(nn.Module):
  features: int
  stride: int = 1
  norm: str = "instance"
  activation: str = "leaky_relu"
  dtype: Any = jnp.float32
  conv_dtype: Any = None  # compute dtype of the block's first conv and of its skip conv (None -> dtype)
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x, train: bool):
    n = x.ndim - 2
    first_dtype = self.dtype if self.conv_dtype is None else self.conv_dtype
    act = _activation(self.activation)
    y = Conv(self.features, (3,) * n, strides=self.stride, padding="SAME", dtype=first_dtype,
             impl=self.conv_impl, name="conv_0")(x).astype(self.dtype)
    y = act(_norm(self.norm, self.dtype, train)(y))
    y = Conv(self.features, (3,) * n, padding="SAME", dtype=self.dtype, impl=self.conv_impl, name="conv_1")(y)
    y = _norm(self.norm, self.dtype, train)(y.astype(self.dtype))
    if self.stride != 1 or x.shape[-1] != self.features:
      x = Conv(self.features, (1,) * n, strides=self.stride, padding="VALID", dtype=first_dtype,
               impl=self.conv_impl, name="skip")(x).astype(self.dtype)
      x = _norm(self.norm, self.dtype, train)(x)
    return act(y + x.astype(self.dtype))


class ResEncUNet(UNet):
  """Residual-encoder U-Net on channel-last input (B, *S, C); float32 logits (B, *S, out_channels).

  The fields of `unet.UNet` (features: encoder widths per stage, spatial dims divisible by 2^(stages - 1)), plus
  blocks: residual blocks per stage (the last entry repeats for deeper stages). Deep supervision, remat and
  dropout are not offered: a config that asks for them gets an error, not a silent plain model.
  """
  blocks: Sequence[int] = (1, 2, 2, 2)

  @nn.compact
  def __call__(self, x, *, train: bool = False, temperature=1.0):
    if self.deep_supervision or self.remat or self.dropout:
      raise ValueError("resenc_unet has no deep supervision, remat or dropout: set config model.deep_supervision"
                       "=False, model.remat=False and model.dropout=0")
    encoder, final = split_features(self.features, self.final_features)
    blocks = tuple(int(b) for b in self.blocks) or (1,)
    if min(blocks) < 1:
      raise ValueError(f"config model.blocks={tuple(self.blocks)}: every stage needs at least one block")
    n = x.ndim - 2
    factor = 2 ** (len(encoder) - 1)
    if n not in (2, 3) or any(s % factor for s in x.shape[1:-1]):
      raise ValueError(f"resenc_unet with {len(encoder)} stages needs (B, *2 or 3 spatial dims divisible by "
                       f"{factor}, C), got shape {x.shape}")
    kw = dict(norm=self.norm, activation=self.activation, dtype=self.dtype, conv_impl=self.conv_impl)
    input_dtype = jnp.dtype(self.input_dtype)
    x = x.astype(input_dtype)
    skips = []
    for stage, width in enumerate(encoder):
      for b in range(blocks[min(stage, len(blocks) - 1)]):
        first = b == 0
        x = ResidualBlock(width, stride=2 if first and stage > 0 else 1, **kw,
                          conv_dtype=input_dtype if first and stage == 0 else None,
                          name=f"stage_{stage}_block_{b}")(x, train)
      skips.append(x)
    for stage in reversed(range(len(encoder) - 1)):
      top = stage == 0
      up = DepthToSpaceUp(encoder[stage], dtype=self.dtype, conv_impl=self.conv_impl, name=f"up_{stage}")(x)
      x = jnp.concatenate([skips[stage], up], axis=-1)
      x = TwoConv(final if top else encoder[stage], **kw, name=f"decoder_{stage}")(x, train)
    logits = Conv(self.out_channels, (1,) * n, dtype=self.dtype, impl=self.conv_impl, name="final_conv")(x)
    return logits.astype(jnp.float32) / jnp.asarray(temperature, jnp.float32)


Model = ResEncUNet
