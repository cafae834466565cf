"""Convolution with an implementation chosen per backend; same parameters as `flax.linen.Conv`.

XLA:CPU runs a 3x3x3 convolution (and above all its backward pass) at a few per cent of what the cores can do
(openxla/xla issue 34273), while its 2D convolution runs near the machine's matmul speed. A convolution over
(D, H, W) with a kernel of k taps along D is exactly ONE 2D convolution over (H, W) of the "depth-folded" input:
the k depth neighbours of each output plane stacked into channels, with the kernel reshaped from
(k, kh, kw, I, O) to (kh, kw, k * I, O). Same arithmetic, summed in another order (float32 round-off).

impl:
  "xla":    `lax.conv_general_dilated` on the full rank (cuDNN on GPU; XLA's own kernels on CPU/TPU).
  "folded": the first spatial axis folded into channels, as above (2D input -> a 1D convolution).
  "auto":   "folded" for 3D input on the CPU backend, "xla" everywhere else (GPU/TPU keep the native conv;
            2D on CPU keeps it too: folded into a 1D conv it was faster at some widths and slower at others,
            see experiments/bench/RESULTS.md).

`Conv` is a drop-in for `nn.Conv` (its automatic name is also `Conv_<i>`, its params `kernel` (*k, I, O) and
`bias` (O,)), so a checkpoint saved under one implementation restores under the other.
"""
from __future__ import annotations

import functools
import itertools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

CONV_IMPLS = ("auto", "xla", "folded")


def resolve_impl(impl: str, ndim: int) -> str:
  """The implementation `impl` stands for at `ndim` spatial dims on the default backend ("xla" | "folded")."""
  if impl not in CONV_IMPLS:
    raise ValueError(f"conv impl (config model.conv_impl) must be one of {CONV_IMPLS}, got {impl!r}")
  if impl == "auto":
    return "folded" if ndim == 3 and jax.default_backend() == "cpu" else "xla"
  if ndim < 2:
    return "xla"  # nothing to fold into a 0-D convolution
  return impl


def _dims(n: int):
  spatial = "DHW"[-n:]
  return (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C")


def _pads(shape, window, strides, padding) -> list[tuple[int, int]]:
  if isinstance(padding, str):
    return [tuple(p) for p in jax.lax.padtype_to_pads(shape, window, strides, padding)]
  if isinstance(padding, int):
    return [(padding, padding)] * len(window)
  return [(p, p) if isinstance(p, int) else tuple(p) for p in padding]


def conv(x: jax.Array, kernel: jax.Array, *, strides: Sequence[int] | None = None, padding="SAME",
         impl: str = "auto") -> jax.Array:
  """Channel-last convolution of x (B, *S, I) with kernel (*k, I, O); same result whatever `impl`.

  padding: "SAME" | "VALID" | an int | one (lo, hi) pair (or int) per spatial axis, as `nn.Conv` takes it.
  """
  n = x.ndim - 2
  window = kernel.shape[:n]
  strides = (1,) * n if strides is None else tuple(int(s) for s in strides)
  pads = _pads(x.shape[1:-1], window, strides, padding)
  if resolve_impl(impl, n) == "xla":
    return jax.lax.conv_general_dilated(x, kernel, strides, pads, dimension_numbers=_dims(n))
  return _folded(x, kernel, strides, pads)


def _folded(x, kernel, strides, pads):
  n = x.ndim - 2
  k, s, (lo, hi) = kernel.shape[0], strides[0], pads[0]
  batch, length, rest, c_in = x.shape[0], x.shape[1], x.shape[2:-1], x.shape[-1]
  x = jnp.pad(x, [(0, 0), (lo, hi)] + [(0, 0)] * n)
  out_len = (length + lo + hi - k) // s + 1
  # Channel block j holds the input plane j taps below each output plane: (B, D_out, *rest, k * I).
  stacked = jnp.concatenate([x[:, j:j + s * (out_len - 1) + 1:s] for j in range(k)], axis=-1)
  stacked = stacked.reshape((batch * out_len, *rest, k * c_in))
  # (k, *k_rest, I, O) -> (*k_rest, k, I, O) -> (*k_rest, k * I, O): the same (tap, channel) order.
  folded_kernel = jnp.moveaxis(kernel, 0, n - 1).reshape(kernel.shape[1:n] + (k * c_in, kernel.shape[-1]))
  if all(st == 1 for st in strides[1:]):
    y = _conv_fast_kernel_grad(stacked, folded_kernel, tuple(tuple(p) for p in pads[1:]))
  else:
    y = jax.lax.conv_general_dilated(stacked, folded_kernel, strides[1:], pads[1:], dimension_numbers=_dims(n - 1))
  return y.reshape((batch, out_len) + y.shape[1:])


def _conv_unit_stride(x, kernel, pads):
  return jax.lax.conv_general_dilated(x, kernel, (1,) * (x.ndim - 2), pads, dimension_numbers=_dims(x.ndim - 2))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_fast_kernel_grad(x, kernel, pads):
  """A unit-stride conv whose kernel gradient is one matmul per tap (the input gradient stays XLA's).

  XLA:CPU computes a conv's kernel gradient at 12-20 GFLOP/s when the image is large (it becomes a conv with
  a kernel the size of the image). Here it is sum_m x[m + offset(tap)] dy[m] over the flattened padded image:
  a shift of a contiguous row range and a (M, I)^T (M, O) matmul per tap, near the machine's matmul speed.
  """
  return _conv_unit_stride(x, kernel, pads)


def _conv_fast_kernel_grad_fwd(x, kernel, pads):
  return _conv_unit_stride(x, kernel, pads), (x, kernel)


def _conv_fast_kernel_grad_bwd(pads, residuals, dy):
  x, kernel = residuals
  _, input_vjp = jax.vjp(lambda v: _conv_unit_stride(v, kernel, pads), x)
  (dx,) = input_vjp(dy)
  window, c_in, c_out = kernel.shape[:-2], kernel.shape[-2], kernel.shape[-1]
  padded = jnp.pad(x, [(0, 0)] + list(pads) + [(0, 0)])
  grid = padded.shape[1:-1]
  # dy embedded at the origin of the padded grid (zeros where no output is), flattened to rows like `padded`.
  dy_grid = jnp.pad(dy, [(0, 0)] + [(0, g - o) for g, o in zip(grid, dy.shape[1:-1])] + [(0, 0)])
  rows = padded.reshape(-1, c_in)
  row_strides = [int(np.prod(grid[d + 1:])) for d in range(len(grid))]
  offsets = [sum(t * r for t, r in zip(tap, row_strides)) for tap in itertools.product(*map(range, window))]
  # The tap shifts dy (usually fewer channels than x): dk[tap] = sum_m x[m] dy[m - offset].
  front = max(offsets)
  dy_rows = jnp.pad(dy_grid.reshape(-1, c_out), [(front, 0), (0, 0)])
  taps = [jax.lax.dot_general(rows, jax.lax.slice_in_dim(dy_rows, front - off, front - off + rows.shape[0]),
                              (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
          for off in offsets]
  dk = jnp.stack(taps).reshape(kernel.shape).astype(kernel.dtype)
  return dx, dk


_conv_fast_kernel_grad.defvjp(_conv_fast_kernel_grad_fwd, _conv_fast_kernel_grad_bwd)


class Conv(nn.Module):
  """`nn.Conv` (channel-last, no dilation or groups) with the implementation switch `impl` (see module doc)."""
  features: int
  kernel_size: Sequence[int]
  strides: int | Sequence[int] = 1
  padding: Any = "SAME"
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.lecun_normal()
  bias_init: Any = nn.initializers.zeros_init()
  impl: str = "auto"

  @nn.compact
  def __call__(self, x):
    window = tuple(self.kernel_size)
    n = len(window)
    if x.ndim != n + 2:
      raise ValueError(f"Conv with a {n}-D kernel {window} needs input (B, *{n} spatial, C), got {x.shape}")
    kernel = self.param("kernel", self.kernel_init, window + (x.shape[-1], self.features), self.param_dtype)
    bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    strides = (self.strides,) * n if isinstance(self.strides, int) else tuple(self.strides)
    y = conv(x, kernel, strides=strides, padding=self.padding, impl=self.impl)
    return y if bias is None else y + bias.reshape((1,) * (y.ndim - 1) + (-1,))
