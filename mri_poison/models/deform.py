"""The deformation attack's generator G(x, Delta) -> normalised control points (study 3, generator mode).

A small convolutional encoder reads the image and a constant channel holding the target Dice drop Delta (one
generator serves every Delta), pools to the control-point grids and outputs the normalised variables of
`mri_poison.attacks.deform`: "disp" (B, *G, D) vectors squashed into the unit ball (v / sqrt(1 + |v|^2)) and
"bias" (B, *Gb, Cb) squashed into [-1, 1] (tanh), so every output respects the budgets whatever the weights. The generator has no additive term (the
per-case attack's optional `add` is left out of this mode).
Heads start at zero: an untrained generator is the identity transformation. 2D and 3D (from the input rank).

With `gate` the outputs are scaled per example by a learnt strength sigmoid(softplus(w) Delta + b), increasing in
Delta by construction (a scale in [0, 1] keeps the budgets). Why: the Delta channel alone was ignored in training
(every Delta got the same field, experiments/bench/RESULTS.md 2026-12-08); the gate gives the generator one
monotone knob from Delta to the field's size.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mri_poison.models.conv import Conv


class DeformGenerator(nn.Module):
  """G(x (B, *S, C), delta (B,)) -> {"disp": (B, *G, D), "bias": (B, *Gb, Cb)}."""
  grid: int = 4
  bias_grid: int = 3
  bias_channels: int = 1
  features: Sequence[int] = (16, 32)
  gate: bool = False

  @nn.compact
  def __call__(self, x, delta):
    x = jnp.asarray(x, jnp.float32)
    spatial = x.shape[1:-1]
    d = len(spatial)
    if d not in (2, 3):
      raise ValueError(f"DeformGenerator takes 2D or 3D images (B, *S, C), got {x.shape}")
    b = x.shape[0]
    delta = jnp.asarray(delta, jnp.float32).reshape(-1)
    h = x
    for i, f in enumerate(self.features):
      h = Conv(f, (3,) * d, strides=(1 if i == 0 else 2,) * d, name=f"conv{i}")(h)
      h = nn.GroupNorm(num_groups=min(8, f), name=f"norm{i}")(h)
      h = nn.leaky_relu(h, 0.2)

    def pool(g, name):
      # Pool to a control grid (anti-aliased resize: area-like averaging), then append Delta as a constant
      # channel. Delta enters after the last norm: a constant input channel would be normalised away.
      p = jax.image.resize(h, (b,) + (int(g),) * d + (h.shape[-1],), "linear", antialias=True)
      dc = jnp.broadcast_to(delta.reshape((-1,) + (1,) * (d + 1)), p.shape[:-1] + (1,))
      p = jnp.concatenate([p, dc], axis=-1)
      return nn.leaky_relu(Conv(h.shape[-1], (1,) * d, name=name)(p), 0.2)

    v = Conv(d, (3,) * d, kernel_init=nn.initializers.zeros, name="disp_head")(pool(self.grid, "disp_mix"))
    disp = v / jnp.sqrt(1.0 + jnp.sum(jnp.square(v), axis=-1, keepdims=True))
    bias = jnp.tanh(Conv(int(self.bias_channels), (3,) * d, kernel_init=nn.initializers.zeros,
                            name="bias_head")(pool(self.bias_grid, "bias_mix")))
    if self.gate:  # initial strength sigmoid(10 Delta - 1.5): 0.38 at Delta 0.1, 0.82 at 0.3
      slope = jax.nn.softplus(self.param("gate_w", nn.initializers.constant(10.0), ()))
      g = jax.nn.sigmoid(slope * delta + self.param("gate_b", nn.initializers.constant(-1.5), ()))
      disp, bias = (t * g.reshape((-1,) + (1,) * (t.ndim - 1)) for t in (disp, bias))
    return {"disp": disp, "bias": bias}


def make_generator(gen_cfg, deform_settings, channels: int) -> DeformGenerator:
  """The generator for a deformation config (its grids and bias channels), `gen_cfg.features` and `.gate`."""
  return DeformGenerator(grid=int(deform_settings.grid), bias_grid=int(deform_settings.bias_grid),
                         bias_channels=channels if deform_settings.bias_channels == "per_channel" else 1,
                         features=tuple(int(f) for f in gen_cfg.features), gate=bool(gen_cfg.get("gate", False)))
