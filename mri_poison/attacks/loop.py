"""The attack loop that every gradient attack (FGSM, i-FGSM, PGD, SegPGD, CosPGD) runs: `optimize` with the
sign-step update and the eps-ball projection.

An attack is: a loss hook `loss_fn(x[, step])` (what to increase, per example), a step rule ("linf": sign of
the gradient; "l2": the gradient normalised per example; `sign_step`) and a projection (eps-ball around the
clean input, value bounds, mask; `project`). `run_steps` hands these to `optimize` (attacks/optimize.py), whose
iterations are one `lax.scan`; run under `jax.jit` (see `filter_jit`) with eps, step size, bounds and mask as
traced arrays, a new eps value (or a vmapped eps grid) never recompiles. Loss functions that are pytrees (see
`attacks.losses`) pass their params/labels as jit arguments, so a new batch or a new model with the same shapes
does not recompile.
"""
from __future__ import annotations

import functools
import inspect
from typing import Callable

import jax
import jax.numpy as jnp

from mri_poison.attacks.optimize import optimize, per_example_l2_norm, sign_step

Array = jax.Array
LossFn = Callable[..., Array]

_TINY = 1e-12


# ---------------------------------------------------------------------------------------------------------
# Broadcasting of eps / step size / bounds / mask against x (B, *spatial, C).


def broadcast_param(value, x: Array, name: str) -> Array:
  """Scalar, per-example (B,), per-channel (C,) or full-rank `value` -> an array broadcastable to `x`.

  A 1-D array whose length equals both B and C is ambiguous: pass it full-rank, e.g. `v[:, None, None, None, None]`
  (per example) or `v.reshape(1, 1, 1, 1, -1)` (per channel).
  """
  v = jnp.asarray(value, dtype=x.dtype)
  if v.ndim == 0 or v.ndim == x.ndim:
    _check_broadcastable(v.shape, x.shape, name)
    return v
  if v.ndim == 1:
    b, c = x.shape[0], x.shape[-1]
    if v.shape[0] == b and v.shape[0] == c and x.ndim > 1:
      raise ValueError(
          f"{name} of shape {v.shape} is ambiguous for x of shape {x.shape} (batch == channels): pass it full-rank, "
          f"shape ({b},{',1' * (x.ndim - 1)}) per example or ({'1,' * (x.ndim - 1)}{c}) per channel.")
    if v.shape[0] == b:
      return v.reshape((b,) + (1,) * (x.ndim - 1))
    if v.shape[0] == c:
      return v.reshape((1,) * (x.ndim - 1) + (c,))
  raise ValueError(f"{name} of shape {v.shape} does not fit x of shape {x.shape}: expected a scalar, "
                   f"(B,)={x.shape[:1]}, (C,)={x.shape[-1:]} or an array broadcastable to x.")


def broadcast_mask(mask, x: Array) -> Array | None:
  """`mask` broadcastable to x (a (B, *spatial) brain mask gets a channel axis) -> x.dtype array of 0/1."""
  if mask is None:
    return None
  m = jnp.asarray(mask)
  if m.ndim == x.ndim - 1 and m.shape == x.shape[:-1]:
    m = m[..., None]  # a voxel mask (B, *S) applies to every channel
  _check_broadcastable(m.shape, x.shape, "mask")
  return (m != 0).astype(x.dtype)


def _check_broadcastable(shape, target, name):
  try:
    out = jnp.broadcast_shapes(tuple(shape), tuple(target))
  except ValueError:
    out = None
  if out != tuple(target):
    raise ValueError(f"{name} of shape {tuple(shape)} is not broadcastable to x of shape {tuple(target)}.")


def _l2_norm(v: Array) -> Array:
  """Per-example L2 norm, keepdims (B, 1, ..., 1), in v's dtype."""
  return per_example_l2_norm(v).reshape(v.shape[:1] + (1,) * (v.ndim - 1)).astype(v.dtype)


def project(x_adv: Array, x: Array, *, eps, norm: str, lower=None, upper=None, mask=None) -> Array:
  """Projection onto {|x_adv - x| <= eps} (L-inf per voxel, L2 per example) ∩ [lower, upper], x where mask == 0.

  Assumes x itself lies inside the bounds (then clipping to the bounds only shrinks the perturbation).
  """
  delta = x_adv - x
  if mask is not None:
    delta = delta * mask
  if norm == "linf":
    delta = jnp.clip(delta, -eps, eps)
  elif norm == "l2":
    delta = delta * jnp.minimum(1.0, eps / jnp.maximum(_l2_norm(delta), _TINY))
  else:
    raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}.")
  out = x + delta
  if lower is not None or upper is not None:
    out = jnp.clip(out, lower, upper)
  if mask is not None:
    out = jnp.where(mask > 0, out, x)  # exact equality outside the mask, whatever the arithmetic did
  return out


def random_start(key, x: Array, *, eps, norm: str, lower=None, upper=None, mask=None) -> Array:
  """Uniform in the L-inf ball; for L2 a uniform direction times eps * U(0, 1). Then projected."""
  if norm == "linf":
    delta = jax.random.uniform(key, x.shape, x.dtype, -1.0, 1.0) * eps
  else:
    k1, k2 = jax.random.split(key)
    d = jax.random.normal(k1, x.shape, x.dtype)
    if mask is not None:
      d = d * mask
    r = jax.random.uniform(k2, (x.shape[0],) + (1,) * (x.ndim - 1), x.dtype)
    delta = d / jnp.maximum(_l2_norm(d), _TINY) * eps * r
  return project(x + delta, x, eps=eps, norm=norm, lower=lower, upper=upper, mask=mask)


def ball_projection(x: Array, *, eps, norm: str, lower=None, upper=None, mask=None) -> Callable[[Array], Array]:
  """`v -> project(v, x, ...)`: the projection onto the eps-ball around x ∩ bounds ∩ mask, for `optimize`."""
  if norm not in ("linf", "l2"):
    raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}.")
  return lambda v: project(v, x, eps=eps, norm=norm, lower=lower, upper=upper, mask=mask)


# ---------------------------------------------------------------------------------------------------------
# Loss hooks.


def takes_step(loss_fn) -> bool:
  """Whether `loss_fn` accepts a second positional argument (the 0-based iteration index)."""
  try:
    params = list(inspect.signature(loss_fn).parameters.values())
  except (TypeError, ValueError):
    return False
  if any(p.kind == p.VAR_POSITIONAL for p in params):
    return True
  positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
  return len(positional) >= 2


def per_example_loss(loss_fn, x: Array, step) -> Array:
  """loss_fn(x[, step]) as float32 of shape (B,) (a scalar loss is broadcast to every example)."""
  loss = loss_fn(x, step) if takes_step(loss_fn) else loss_fn(x)
  loss = jnp.asarray(loss, jnp.float32)
  if loss.ndim == 0:
    return jnp.broadcast_to(loss, x.shape[:1])
  if loss.shape != x.shape[:1]:
    raise ValueError(f"loss_fn must return a scalar or a per-example loss of shape {x.shape[:1]}, got {loss.shape}.")
  return loss


# ---------------------------------------------------------------------------------------------------------
# The loop.


def run_steps(loss_fn, x: Array, x_init: Array, *, eps, step_size, steps: int, norm: str = "linf",
              lower=None, upper=None, mask=None, targeted: bool = False, final_loss: bool = False):
  """THE attack loop (traceable; call it inside jit). Returns (x_adv, history).

  x_{t+1} = Pi(x_t ± step_size * direction(grad loss(x_t, t))), t = 0 .. steps-1; Pi = `project`; that is
  `optimize(loss, x_init, update=sign_step(step_size, norm, mask), project=ball_projection(x, ...),
  maximize=not targeted)` (targeted == minimise the loss).
  history["loss"] (steps, B) holds the loss at x_0 .. x_{steps-1} (free: it is computed with the gradient);
  with `final_loss`, history["final_loss"] (B,) is the loss at the returned x (one more forward pass).
  `mask` must already be broadcast (see `broadcast_mask`), eps/step_size broadcastable to x.
  """
  x_adv, hist = optimize(lambda z, step: per_example_loss(loss_fn, z, step), x_init,
                         update=sign_step(step_size, norm, mask), steps=steps,
                         project=ball_projection(x, eps=eps, norm=norm, lower=lower, upper=upper, mask=mask),
                         maximize=not targeted, final_objective=final_loss)
  history = {"loss": hist["objective"]}
  if final_loss:
    history["final_loss"] = hist["final_objective"]
  return x_adv, history


# ---------------------------------------------------------------------------------------------------------
# jit with pytree-aware static/dynamic split (equinox's filter_jit idea in a few lines): array leaves of every
# argument are traced, everything else (functions, strings, ints) is static. Loss pytrees therefore pass their
# params and labels as arguments; plain closures are static (hashed by identity).


def _is_array(v) -> bool:
  return isinstance(v, (jax.Array, jnp.ndarray)) or (hasattr(v, "shape") and hasattr(v, "dtype"))


class _Static:
  __slots__ = ("value",)

  def __init__(self, value):
    self.value = value

  def __hash__(self):
    try:
      return hash(self.value)
    except TypeError:
      return id(self.value)

  def __eq__(self, other):
    return isinstance(other, _Static) and (self.value is other.value or _safe_eq(self.value, other.value))


def _safe_eq(a, b) -> bool:
  try:
    return bool(a == b)
  except Exception:  # pylint: disable=broad-except
    return False


def filter_jit(fn: Callable) -> Callable:
  """jax.jit over `fn(*args, **kwargs)`: array leaves traced, all other leaves static."""

  @functools.partial(jax.jit, static_argnums=(1, 2))
  def _compiled(dynamic, static, treedef):
    leaves = [s.value if d is None else d for d, s in zip(dynamic, static)]
    args, kwargs = jax.tree.unflatten(treedef, leaves)
    return fn(*args, **kwargs)

  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    leaves, treedef = jax.tree.flatten((args, kwargs), is_leaf=lambda v: v is None)
    dynamic = [v if _is_array(v) else None for v in leaves]
    static = tuple(_Static(None if _is_array(v) else v) for v in leaves)
    return _compiled(dynamic, static, treedef)

  wrapper.compiled = _compiled  # exposed for cache inspection in tests/benchmarks
  return wrapper
