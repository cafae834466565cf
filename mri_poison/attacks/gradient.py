"""FGSM, i-FGSM (BIM) and PGD: thin front ends of the one attack loop (`attacks.loop.run_steps`, i.e.
`optimize` with `sign_step` and the eps-ball projection).

All take `loss_fn(x)` or `loss_fn(x, step)` returning the loss to increase (per example (B,), or a scalar);
`targeted=True` decreases it instead (`optimize`'s maximize=False: targeted == minimise). eps / step_size:
scalar, per example (B,), per channel (C,) or any array broadcastable to x; `mask` (broadcastable to x, or a
(B, *spatial) voxel mask) marks what may change; `lower` / `upper` bound the values. Everything numeric is
traced, so new eps values reuse the compiled loop.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from mri_poison.attacks import loop
from mri_poison.attacks.optimize import scan, scan_unroll

Array = jax.Array


def _prepare(x, eps, step_size, lower, upper, mask):
  x = jnp.asarray(x)
  eps = loop.broadcast_param(eps, x, "eps")
  step_size = None if step_size is None else loop.broadcast_param(step_size, x, "step_size")
  lower = None if lower is None else loop.broadcast_param(lower, x, "lower")
  upper = None if upper is None else loop.broadcast_param(upper, x, "upper")
  return x, eps, step_size, lower, upper, loop.broadcast_mask(mask, x)


def _check_l2_eps(v, x, name):
  if v is not None and v.ndim == x.ndim and any(d != 1 for d in v.shape[1:]):
    raise ValueError(f"norm='l2' takes a scalar or per-example {name}; got shape {v.shape}.")


@loop.filter_jit
def _iterative(loss_fn, x, x_init, eps, step_size, lower, upper, mask, steps, norm, targeted, history):
  x_adv, hist = loop.run_steps(loss_fn, x, x_init, eps=eps, step_size=step_size, steps=steps, norm=norm,
                               lower=lower, upper=upper, mask=mask, targeted=targeted, final_loss=history)
  return (x_adv, hist) if history else x_adv


def fgsm(loss_fn, x, *, eps, lower=None, upper=None, mask=None, targeted=False) -> Array:
  """x_adv = Pi(x ± eps * sign(grad loss(x))) (Goodfellow et al. 2015); one step of the loop."""
  x, eps, _, lower, upper, mask = _prepare(x, eps, None, lower, upper, mask)
  return _iterative(loss_fn, x, x, eps, eps, lower, upper, mask, 1, "linf", bool(targeted), False)


def ifgsm(loss_fn, x, *, eps, step_size, steps, lower=None, upper=None, mask=None, targeted=False,
          return_history=False):
  """Iterative FGSM / BIM (Kurakin et al. 2017): x_{t+1} = Pi(x_t ± step_size * sign(grad)), from x_0 = x.

  With `return_history` returns (x_adv, {"loss": (steps, B), "final_loss": (B,)}).
  """
  x, eps, step_size, lower, upper, mask = _prepare(x, eps, step_size, lower, upper, mask)
  return _iterative(loss_fn, x, x, eps, step_size, lower, upper, mask, int(steps), "linf", bool(targeted),
                    bool(return_history))


def kurakin_schedule(eps: float, unit: float) -> tuple[int, float]:
  """Kurakin et al.'s BIM schedule: step = one intensity unit, steps = min(eps/unit + 4, 1.25 eps/unit).

  `unit` is one grey level in the attack's units (e.g. 1/255 for [0, 1] images, ~0.01 in z-score units).
  """
  e = float(eps) / float(unit)
  return max(1, int(math.ceil(min(e + 4.0, 1.25 * e)))), float(unit)


@loop.filter_jit
def _pgd(loss_fn, x, eps, step_size, key, lower, upper, mask, steps, restarts, norm, targeted, history):
  sign = -1.0 if targeted else 1.0
  keys = jax.random.split(key, restarts)

  def one_restart(k):
    x0 = loop.random_start(k, x, eps=eps, norm=norm, lower=lower, upper=upper, mask=mask)
    return loop.run_steps(loss_fn, x, x0, eps=eps, step_size=step_size, steps=steps, norm=norm, lower=lower,
                          upper=upper, mask=mask, targeted=targeted, final_loss=history or restarts > 1)

  if restarts == 1:
    x_adv, hist = one_restart(keys[0])
    return (x_adv, jax.tree.map(lambda h: h[None], hist)) if history else x_adv

  # Restarts run one after another (memory of one attack at 128^3), keeping each example's best final loss.
  def body(best, k):
    best_x, best_score = best
    x_r, hist = one_restart(k)
    score = sign * hist["final_loss"]
    better = score > best_score
    best_x = jnp.where(better.reshape((-1,) + (1,) * (x.ndim - 1)), x_r, best_x)
    return (best_x, jnp.where(better, score, best_score)), hist

  init = (x, jnp.full(x.shape[:1], -jnp.inf, jnp.float32))
  (x_adv, _), hists = scan(body, init, keys, unroll=scan_unroll(restarts * steps))
  return (x_adv, hists) if history else x_adv


def pgd(loss_fn, x, *, eps, step_size, steps, key, restarts=1, norm="linf", lower=None, upper=None, mask=None,
        targeted=False, return_history=False):
  """PGD (Madry et al. 2018) with a random start in the eps-ball, L-inf (sign step) or L2 (normalised step).

  With `restarts` > 1 each example keeps the restart with the best final loss (highest; lowest if targeted).
  With `return_history` returns (x_adv, {"loss": (restarts, steps, B), "final_loss": (restarts, B)}).
  """
  if norm not in ("linf", "l2"):
    raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}.")
  if int(restarts) < 1:
    raise ValueError(f"restarts must be >= 1, got {restarts}.")
  x, eps, step_size, lower, upper, mask = _prepare(x, eps, step_size, lower, upper, mask)
  if norm == "l2":
    _check_l2_eps(eps, x, "eps")
    _check_l2_eps(step_size, x, "step_size")
  return _pgd(loss_fn, x, eps, step_size, key, lower, upper, mask, int(steps), int(restarts), norm,
              bool(targeted), bool(return_history))
