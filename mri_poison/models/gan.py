"""SANTA-style translation GAN (Xie et al., CVPR 2023), written from the equations in docs/methods.md, study 1.

Generator: ONE encoder shared by both domains, and a decoder conditioned on a scalar domain d in [0, 1]:
  encode(x) -> mu            7x7 conv, `n_down` stride-2 stages (F -> 2F -> 4F), `n_res` residual blocks (IN)
  decode(z, d) -> (y, feats) `n_res` residual blocks and `n_down` up-sampling stages whose norms are AdaIN,
                             a 7x7 conv and tanh; feats are the decoder's hidden activations (the shortest-path
                             regulariser differentiates them with respect to d).
  style(d) = e0 + d (e1 - e0) from two learned `style_dim` embeddings: d = 0 decodes the source domain
  (reconstruction), d = 1 the target domain (translation).
  AdaIN(h, s) = (1 + gamma) * IN(h) + beta, [gamma, beta] = Dense(s).
Latent noise (z = mu + N(0, 1) in training) is added by the caller (`mri_poison.poison.translation`), so the
modules stay deterministic functions of their inputs.

Discriminator: the 70x70 PatchGAN (pix2pix/CycleGAN): 4x4 convs, stride 2 for `n_layers` stages then stride 1,
instance norm after the first, leaky ReLU 0.2, one logit per patch (LSGAN targets, no sigmoid).

`SliceClassifier` is the detectability probe of the poisoning study: a small CNN scoring a slice as synthetic.
Every module is rank-generic (2D slices (B, X, Y, C) or 3D volumes (B, X, Y, Z, C)).
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mri_poison.models.conv import Conv

LEAK = 0.2  # PatchGAN leaky ReLU slope (pix2pix)
_EPS = 1e-5


def instance_norm(h: jax.Array) -> jax.Array:
  """(h - mean) / sqrt(var + eps) over the spatial axes of every example and channel (no affine params)."""
  axes = tuple(range(1, h.ndim - 1))
  mean = jnp.mean(h, axis=axes, keepdims=True)
  var = jnp.var(h, axis=axes, keepdims=True)
  return (h - mean) * jax.lax.rsqrt(var + _EPS)


def _k(size: int, n: int) -> tuple[int, ...]:
  return (size,) * n


def upsample_nearest(x: jax.Array) -> jax.Array:
  """2x nearest-neighbour up-sampling of every spatial axis."""
  for axis in range(1, x.ndim - 1):
    x = jnp.repeat(x, 2, axis=axis)
  return x


class AdaIN(nn.Module):
  """(1 + gamma) * IN(h) + beta with [gamma, beta] = Dense(2C)(s); s (B, style_dim), h (B, *S, C)."""

  @nn.compact
  def __call__(self, h, s):
    c = h.shape[-1]
    gamma_beta = nn.Dense(2 * c, name="affine")(s)
    shape = (h.shape[0],) + (1,) * (h.ndim - 2) + (c,)
    gamma, beta = gamma_beta[:, :c].reshape(shape), gamma_beta[:, c:].reshape(shape)
    return (1.0 + gamma) * instance_norm(h) + beta


class ResBlock(nn.Module):
  """x + [conv3 -> IN -> relu -> conv3 -> IN](x); with a style s, both norms are AdaIN(., s)."""
  features: int

  @nn.compact
  def __call__(self, x, s=None):
    n = x.ndim - 2
    norm = (lambda h, name: instance_norm(h)) if s is None else (lambda h, name: AdaIN(name=name)(h, s))
    h = Conv(self.features, _k(3, n), name="conv_0")(x)
    h = nn.relu(norm(h, "norm_0"))
    h = Conv(self.features, _k(3, n), name="conv_1")(h)
    return x + norm(h, "norm_1")


class Encoder(nn.Module):
  """x (B, *S, C) -> mu (B, *S / 2^n_down, F 2^n_down): the encoder shared by both domains."""
  features: int = 64
  n_down: int = 2
  n_res: int = 4

  @nn.compact
  def __call__(self, x):
    n = x.ndim - 2
    h = nn.relu(instance_norm(Conv(self.features, _k(7, n), name="stem")(x)))
    for i in range(self.n_down):
      h = Conv(self.features * 2 ** (i + 1), _k(4, n), strides=_k(2, n), name=f"down_{i}")(h)
      h = nn.relu(instance_norm(h))
    for i in range(self.n_res):
      h = ResBlock(h.shape[-1], name=f"res_{i}")(h)
    return h


class Decoder(nn.Module):
  """(z, style) -> (tanh image (B, *S, out_channels), [hidden activations]); every norm is AdaIN(., style)."""
  features: int = 64
  n_down: int = 2
  n_res: int = 4
  out_channels: int = 1

  @nn.compact
  def __call__(self, z, s):
    n = z.ndim - 2
    feats = []
    h = z
    for i in range(self.n_res):
      h = ResBlock(h.shape[-1], name=f"res_{i}")(h, s)
      feats.append(h)
    for i in reversed(range(self.n_down)):
      h = Conv(self.features * 2**i, _k(5, n), name=f"up_{i}")(upsample_nearest(h))
      h = nn.relu(AdaIN(name=f"up_norm_{i}")(h, s))
      feats.append(h)
    y = Conv(self.out_channels, _k(7, n), name="out")(h)
    return jnp.tanh(y), feats


class Generator(nn.Module):
  """Shared encoder + domain-conditioned decoder; `__call__(x, d)` = decode(encode(x), d)[0] (no noise).

  Methods (use with `apply(..., method=...)`): `encode(x) -> mu`, `decode(z, d) -> (y, feats)`,
  `style(d) -> s`. d is a scalar or (B,) array in [0, 1].
  """
  features: int = 64
  n_down: int = 2
  n_res: int = 4
  style_dim: int = 8
  out_channels: int = 1

  def setup(self):
    self.encoder = Encoder(self.features, self.n_down, self.n_res)
    self.decoder = Decoder(self.features, self.n_down, self.n_res, self.out_channels)
    # Two distinct random embeddings: d must change the decoder's output from the first step on.
    self.e0 = self.param("e0", nn.initializers.normal(1.0), (self.style_dim,))
    self.e1 = self.param("e1", nn.initializers.normal(1.0), (self.style_dim,))

  def style(self, d, batch: int | None = None):
    """s(d) = e0 + d (e1 - e0): (B, style_dim) for d of shape () or (B,) (broadcast to `batch` rows)."""
    d = jnp.asarray(d, jnp.float32).reshape(-1, 1)
    s = self.e0[None] + d * (self.e1 - self.e0)[None]
    return s if batch is None else jnp.broadcast_to(s, (batch, self.style_dim))

  def encode(self, x):
    return self.encoder(x)

  def decode(self, z, d):
    return self.decoder(z, self.style(d, z.shape[0]))

  def __call__(self, x, d):
    return self.decode(self.encode(x), d)[0]


class PatchDiscriminator(nn.Module):
  """70x70 PatchGAN: (B, *S, C) -> (B, *S / 2^n_layers, 1) real/fake logits (LSGAN, no sigmoid)."""
  features: int = 64
  n_layers: int = 3

  @nn.compact
  def __call__(self, x):
    n = x.ndim - 2
    h = nn.leaky_relu(Conv(self.features, _k(4, n), strides=_k(2, n), name="conv_0")(x), LEAK)
    for i in range(1, self.n_layers):
      h = Conv(self.features * min(2**i, 8), _k(4, n), strides=_k(2, n), name=f"conv_{i}")(h)
      h = nn.leaky_relu(instance_norm(h), LEAK)
    h = Conv(self.features * min(2**self.n_layers, 8), _k(4, n), name=f"conv_{self.n_layers}")(h)
    h = nn.leaky_relu(instance_norm(h), LEAK)
    return Conv(1, _k(4, n), name="logits")(h)


class SliceClassifier(nn.Module):
  """Real (0) vs synthetic (1) slice logit: strided conv stages, global average pool, one dense unit -> (B,)."""
  features: Sequence[int] = (8, 16, 32)

  @nn.compact
  def __call__(self, x):
    n = x.ndim - 2
    h = x
    for i, f in enumerate(self.features):
      h = nn.leaky_relu(Conv(int(f), _k(3, n), strides=_k(2, n), name=f"conv_{i}")(h), LEAK)
    h = jnp.mean(h, axis=tuple(range(1, h.ndim - 1)))
    return nn.Dense(1, name="logit")(h)[:, 0]
