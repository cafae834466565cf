"""APGD (Croce & Hein, ICML 2020): L-inf PGD with momentum and a step size that halves at checkpoints.

As in the paper (Algorithm 1), per example: the step size starts at eta = 2 eps; a momentum step
  z = P(x_k + eta sign(grad f(x_k))),   x_{k+1} = P(x_k + alpha (z - x_k) + (1 - alpha) (x_k - x_{k-1}))
with alpha = 0.75 (the first step is the plain sign step); the best point seen so far is kept. At each checkpoint
w_j (fractions p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06) of the N steps) eta is
halved and the iterate restarts from the best point when (1) the loss rose in fewer than rho = 0.75 of the steps
since the last checkpoint, or (2) eta was not halved at the last checkpoint and the best loss has not improved
since. The result is the best point over the N iterates and the final one (one extra forward pass). SEA (Croce,
Singh & Hein, ECCV 2024) runs this loop with several segmentation losses and keeps, per image, the worst case.

One gradient evaluation per step, like `gradient.pgd`; the loop is `optimize.scan` (unrolled on CPU).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from mri_poison.attacks import loop
from mri_poison.attacks.optimize import scan, scan_unroll

RHO, MOMENTUM = 0.75, 0.75  # the paper's checkpoint threshold and momentum


def checkpoints(steps: int) -> tuple[int, ...]:
  """The checkpoint iterations w_1 < w_2 < ... (< steps) of an N-step run (w_0 = 0 is not one)."""
  p = [0.0, 0.22]
  while p[-1] < 1.0:
    p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
  # Rounded first: 0.22 + 0.19 + 0.16 is 0.5700000000000001 in floating point, and ceil would make 57 a 58.
  marks = {int(math.ceil(round(q * steps, 9))) for q in p[1:]}
  return tuple(sorted(m for m in marks if 0 < m < steps))


def _split(out):
  return out if isinstance(out, tuple) else (out, out)


def _per_example(loss_fn, x, step):
  values, aux = _split(loss_fn(x, step) if loop.takes_step(loss_fn) else loss_fn(x))
  return jnp.asarray(values, jnp.float32).reshape(x.shape[:1]), aux


def _one_run(loss_fn, x, x0, eps, mask, steps, rho, momentum, score, record):
  batch = x.shape[0]
  expand = lambda v: v.reshape((batch,) + (1,) * (x.ndim - 1))
  project = loop.ball_projection(x, eps=eps, norm="linf", mask=mask)

  def total(v, t):
    f, aux = _per_example(loss_fn, v, t)
    return jnp.sum(f), (f, aux)

  value_and_grad = jax.value_and_grad(total, has_aux=True)
  marks = checkpoints(steps)
  is_mark = jnp.asarray([k in marks for k in range(steps)])
  # At checkpoint w_j: the number of steps since w_{j-1} (the count of loss rises is compared with rho times it).
  interval = jnp.asarray([k - max([0] + [m for m in marks if m < k]) for k in range(steps)], jnp.float32)
  eta0 = jnp.broadcast_to(2.0 * eps, jnp.broadcast_shapes(jnp.shape(eps), (batch,) + (1,) * (x.ndim - 1)))

  def body(c, xs):
    step, mark, length = xs
    (_, (f, aux)), g = value_and_grad(c["x"], step)
    # The point returned: the iterate of the highest score (by default the loss itself).
    s = f if score is None else jnp.asarray(score(aux), jnp.float32)
    s_better = s > c["s_out"]
    x_out = jnp.where(expand(s_better), c["x"], c["x_out"])
    better = f > c["f_best"]
    x_best = jnp.where(expand(better), c["x"], c["x_best"])
    g_best = jnp.where(expand(better), g, c["g_best"])
    f_best = jnp.maximum(f, c["f_best"])
    rises = c["rises"] + jnp.where(step > 0, (f > c["f_prev"]).astype(jnp.float32), 0.0)
    # At a checkpoint: halve eta and go back to the best point (with its gradient) where progress stalled.
    stalled = (rises < rho * length) | (~c["halved"] & (f_best <= c["f_best_mark"]))
    halve = mark & stalled
    eta = jnp.where(expand(halve), c["eta"] * 0.5, c["eta"])
    x_k = jnp.where(expand(halve), x_best, c["x"])
    g_k = jnp.where(expand(halve), g_best, g)
    x_prev = jnp.where(expand(halve), x_best, c["x_prev"])
    z = project(x_k + eta * jnp.sign(g_k))
    a = jnp.where(step > 0, momentum, 1.0)
    x_next = project(x_k + a * (z - x_k) + (1.0 - a) * (x_k - x_prev))
    new = dict(x=x_next, x_prev=x_k, eta=eta, f_prev=f, f_best=f_best, x_best=x_best, g_best=g_best,
               x_out=x_out, s_out=jnp.maximum(s, c["s_out"]),
               rises=jnp.where(mark, 0.0, rises), halved=jnp.where(mark, halve, c["halved"]),
               f_best_mark=jnp.where(mark, f_best, c["f_best_mark"]))
    return new, aux if record is None else record(aux)

  neg = jnp.full((batch,), -jnp.inf, jnp.float32)
  init = dict(x=x0, x_prev=x0, eta=eta0, f_prev=neg, f_best=neg, x_best=x0, g_best=jnp.zeros_like(x0),
              x_out=x0, s_out=neg,
              rises=jnp.zeros((batch,), jnp.float32), halved=jnp.ones((batch,), bool), f_best_mark=neg)
  xs = (jnp.arange(steps, dtype=jnp.int32), is_mark, interval)
  c, history = scan(body, init, xs, unroll=scan_unroll(steps))
  f_final, aux = _per_example(loss_fn, c["x"], jnp.asarray(steps, jnp.int32))
  s_final = f_final if score is None else jnp.asarray(score(aux), jnp.float32)
  better = s_final > c["s_out"]
  return jnp.where(expand(better), c["x"], c["x_out"]), jnp.maximum(s_final, c["s_out"]), history


@loop.filter_jit
def _apgd(loss_fn, x, eps, key, mask, steps, restarts, rho, momentum, score, record):
  keys = jax.random.split(key, restarts)

  def body(best, k):
    best_x, best_f = best
    x0 = loop.random_start(k, x, eps=eps, norm="linf", mask=mask)
    x_r, f_r, aux = _one_run(loss_fn, x, x0, eps, mask, steps, rho, momentum, score, record)
    better = f_r > best_f
    best_x = jnp.where(better.reshape((-1,) + (1,) * (x.ndim - 1)), x_r, best_x)
    return (best_x, jnp.where(better, f_r, best_f)), (aux, f_r)

  init = (x, jnp.full(x.shape[:1], -jnp.inf, jnp.float32))
  (x_adv, _), (aux, finals) = scan(body, init, keys, unroll=scan_unroll(restarts * steps))
  return x_adv, {"loss": aux, "final_loss": finals}


def apgd(loss_fn, x, *, eps, steps: int, key, restarts: int = 1, mask=None, rho: float = RHO,
         momentum: float = MOMENTUM, score=None, record=None):
  """Untargeted L-inf APGD from a uniform random start; returns (x_adv, history).

  loss_fn(x[, step]) -> per-example loss (B,) to increase, or a pair (loss (B,), aux). The loss steers the steps
  and the checkpoints; the point returned is the iterate (of any restart, the final one included) of the
  highest `score(aux)` (B,): by default the loss itself. AutoAttack likewise returns the best misclassified
  point, not the best-loss one: for a loss that falls as voxels flip (masked CE) the two differ.
  eps: scalar, (B,) or broadcastable to x.
  history: "loss" (restarts, steps, ...) `record(aux)` (default aux) at x_0 .. x_{N-1}; "final_loss"
  (restarts, B) the best score of each restart.
  """
  if int(steps) < 1 or int(restarts) < 1:
    raise ValueError(f"apgd: steps and restarts must be >= 1, got {steps} and {restarts}")
  x = jnp.asarray(x)
  eps = loop.broadcast_param(eps, x, "eps")
  return _apgd(loss_fn, x, eps, key, loop.broadcast_mask(mask, x), int(steps), int(restarts), float(rho),
               float(momentum), score, record)
