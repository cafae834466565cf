"""The general optimisation loop: per-example objectives over any pytree of variables, any optax update.

`optimize` is one `lax.scan` (traceable: call it inside jit, vmap or another scan), unrolled on CPU (see
`scan_unroll`). Each step evaluates the per-example objective and its gradient at v_t, applies an optax
`GradientTransformation`, projects, and (optionally) freezes the examples that are done. Everything a study
attacks or protects is an instance:

- FGSM / i-FGSM / PGD (and SegPGD / CosPGD, which only change the objective) = `optimize` with `sign_step`
  and the eps-ball projection, maximising the attack loss (`attacks.loop.run_steps`).
- Deformation + bias-field attack (study 3): v = {"disp": control points (B, gx, gy, 2), "bias": (B, gx, gy, 1)},
  `optax.adam`, objective = Dice hinge + smoothness + folding penalties per case, `done` = "this case reached
  its target Dice drop", so each case stops at its own step.
- Error-minimising noise (study 4, min-min inner loop): v = delta, `sign_step` + eps-ball projection,
  maximize=False.

Example (error-minimising noise in an L-inf ball of radius eps, 10 steps of eps / 8):

  delta, hist = optimize(lambda d, step: losses.ce_dice(apply_fn(params, x + d), y, brain),
                         jnp.zeros_like(x), update=sign_step(eps / 8), steps=10,
                         project=lambda d: jnp.clip(d, -eps, eps))
  # hist["objective"]: (10, B), the loss at delta_0 .. delta_9

Example (per-case stopping; objective returns (values, aux) and done reads aux):

  def objective(v, step):
    dice = dice_of(warp(x, v["disp"]), v["bias"])            # (B,)
    penalty = smoothness(v["disp"]) + folding(v["disp"])     # (B,)
    return jnp.square(dice - target) + lam * penalty, dice
  v, hist = optimize(objective, v0, update=optax.adam(1e-2), steps=200, done=lambda dice: dice <= target)

Note: the package `mri_poison.attacks` re-exports the function `optimize`, which shadows this module's name
as an attribute of the package; import the module's names explicitly
(`from mri_poison.attacks.optimize import optimize, sign_step`).
"""
from __future__ import annotations

import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

Array = jax.Array
PyTree = Any

_TINY = 1e-12

# Longest loop `scan_unroll` unrolls on CPU: beyond it compile time (about 0.8 s per step of a 3D U-Net attack at
# 32^3 on 2 cores) outweighs what the unrolled form saves.
CPU_UNROLL_LIMIT = 32
# What "auto" means for this process: "auto" (as above), "rolled" (always a loop: compiles fastest, for runs
# where each attack program runs once or twice, such as the test suite) or "unrolled" (always straight-line).
# The forms give the same results, so this changes only speed.
UNROLL_ENV = "MRI_POISON_UNROLL"
UNROLL_CHOICES = ("auto", "rolled", "unrolled")


def scan_unroll(steps: int, unroll: int | bool | str = "auto") -> int | bool:
  """`lax.scan`'s `unroll` for a loop of `steps` iterations; "auto" picks the faster form on this backend.

  XLA:CPU runs a while-loop body several times slower than the same ops in straight-line code (PGD-10 on a 3D
  U-Net at 32^3, 2 cores, jax 0.10.2: 17.2 s rolled, 3.6 s unrolled, identical results; a partial unroll is as
  slow as the rolled loop, so it is all or nothing): on CPU "auto" unrolls loops of up to CPU_UNROLL_LIMIT
  steps completely. GPU/TPU keep the rolled loop (fast there, and compiled once whatever `steps`). The
  environment variable MRI_POISON_UNROLL (`UNROLL_ENV`) overrides "auto" for the whole process.
  """
  if unroll != "auto":
    return unroll
  mode = os.environ.get(UNROLL_ENV, "auto")
  if mode not in UNROLL_CHOICES:
    raise ValueError(f"environment variable {UNROLL_ENV}={mode!r}: expected one of {UNROLL_CHOICES}")
  if mode != "auto":
    return mode == "unrolled" or 1
  return True if jax.default_backend() == "cpu" and 0 < steps <= CPU_UNROLL_LIMIT else 1


def scan(body: Callable, init, xs, *, unroll: int | bool = 1):
  """`lax.scan(body, init, xs, unroll=unroll)`; a complete unroll is emitted as straight-line code.

  Why: a lax.scan of length 1 (FGSM, a 1-step attack) ran as slowly on XLA:CPU as a rolled loop, even with
  unroll=True: FGSM on 10 volumes at 32^3 took 2.1 s against 0.6 s for its gradient alone, and 0.65 s as
  straight-line code (2 cores, jax 0.10.2).
  """
  length = len(jax.tree.leaves(xs)[0])
  if length == 0 or not (unroll is True or (not isinstance(unroll, bool) and int(unroll) >= length)):
    return jax.lax.scan(body, init, xs, unroll=unroll)
  carry, outs = init, []
  for i in range(length):
    carry, out = body(carry, jax.tree.map(lambda a, i=i: a[i], xs))
    outs.append(out)
  return carry, jax.tree.map(lambda *a: jnp.stack(a), *outs)


# ------------------------------------------------------------------------------------------- helpers


def _leading_size(tree: PyTree, what: str) -> int:
  """The common leading (example) axis of every leaf of `tree`; a clear error when there is none."""
  sizes = {jnp.shape(leaf)[0] if jnp.ndim(leaf) else None for leaf in jax.tree.leaves(tree)}
  if len(sizes) != 1 or None in sizes:
    shapes = [jnp.shape(leaf) for leaf in jax.tree.leaves(tree)]
    raise ValueError(f"{what} needs every leaf of the variables to have the same leading example axis B; "
                     f"got leaf shapes {shapes}.")
  return sizes.pop()


def _per_example(flags: Array, leaf: Array) -> Array:
  """(B,) -> (B, 1, ..., 1) broadcastable against `leaf`."""
  return flags.reshape(flags.shape + (1,) * (jnp.ndim(leaf) - 1))


def where_examples(flags: Array, on_true: PyTree, on_false: PyTree) -> PyTree:
  """Per-example select on the leading axis of every leaf: example b from `on_true` where flags[b]."""
  return jax.tree.map(lambda a, b: jnp.where(_per_example(flags, a), a, b), on_true, on_false)


def per_example_l2_norm(tree: PyTree) -> Array:
  """(B,) float32: the L2 norm of each example's slice of all leaves together (leading axis = example)."""
  sums = [jnp.sum(jnp.square(leaf.astype(jnp.float32)), axis=tuple(range(1, leaf.ndim)))
          for leaf in jax.tree.leaves(tree)]
  total = sums[0]
  for s in sums[1:]:
    total = total + s
  return jnp.sqrt(total)


def _like_tree(value, tree: PyTree, name: str) -> PyTree:
  """`value` as a pytree of the structure of `tree`: itself if it has that structure, else one array per leaf."""
  if jax.tree.structure(value) == jax.tree.structure(tree):
    return value
  if len(jax.tree.leaves(value)) == 1 and not isinstance(value, (dict, list, tuple)):
    return jax.tree.map(lambda _: value, tree)
  raise ValueError(f"sign_step {name} must be one array (applied to every leaf) or a pytree with the "
                   f"structure of the variables {jax.tree.structure(tree)}; got {jax.tree.structure(value)}.")


# ------------------------------------------------------------------------------------------- sign step


def sign_step(step_size, norm: str = "linf", mask=None) -> optax.GradientTransformation:
  """Steepest-descent step of length `step_size` in the L-inf or L2 geometry, as an optax transformation.

  For a gradient g (masked: g * mask) the update is -step_size * d with
    d = sign(g)                             norm="linf" (FGSM / i-FGSM / L-inf PGD),
    d = g / max(||g||_2, 1e-12) per example norm="l2" (the norm of each example's slice of all leaves).
  With `optimize(..., maximize=True)` this is the ascent step x + step_size * d(grad) of the attacks.
  `step_size` and `mask` are arrays (traced, so new values never recompile) broadcastable to every leaf, or
  pytrees with the structure of the variables; `mask` zeroes the gradient where it is 0 (e.g. outside the
  brain, or a modality that must not change). Stateless (`optax.EmptyState`).
  """
  if norm not in ("linf", "l2"):
    raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}.")

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    del params
    g = updates if mask is None else jax.tree.map(jnp.multiply, updates, _like_tree(mask, updates, "mask"))
    if norm == "linf":
      direction = jax.tree.map(jnp.sign, g)
    else:
      _leading_size(g, "sign_step(norm='l2')")
      n = per_example_l2_norm(g)
      direction = jax.tree.map(lambda u: u / jnp.maximum(_per_example(n, u).astype(u.dtype), _TINY), g)
    sizes = _like_tree(step_size, direction, "step_size")
    # -(s * d), not (-s) * d: both are exact, this one keeps x + s * d bit-identical to the ascent form.
    out = jax.tree.map(lambda s, d: -(jnp.asarray(s, d.dtype) * d), sizes, direction)
    return out, state

  return optax.GradientTransformation(init_fn, update_fn)


# ------------------------------------------------------------------------------------------- the loop


def _split_output(out):
  """objective output -> (values, aux); aux is the values themselves when the objective returns no aux."""
  if isinstance(out, tuple):
    if len(out) != 2:
      raise ValueError(f"objective must return values (B,) or a pair (values (B,), aux); got a {len(out)}-tuple.")
    return out
  return out, out


def optimize(objective: Callable, v0: PyTree, *, update: optax.GradientTransformation, steps: int,
             project: Callable[[PyTree], PyTree] | None = None, maximize: bool = False,
             done: Callable[[Any], Array] | None = None, record: Callable[[Any], PyTree] | None = None,
             final_objective: bool = False, unroll: int | bool | str = "auto") -> tuple[PyTree, dict]:
  """Runs `steps` steps of `update` on the per-example `objective`; returns (v, history). Traceable.

  Step t = 0 .. steps-1 (one `lax.scan`):
    values_t, aux_t = objective(v_t, t)            values (B,); objective may return values alone (aux = values)
    g_t = grad of sum(values_t) at v_t             examples are independent: each gets its own gradient
                                                   (negated when `maximize`; optax minimises)
    done_t = done_{t-1} | done(aux_t)              only with `done`; done_{-1} = False
    v_{t+1} = project(v_t + update(g_t))           examples with done_t keep v_t and get a zero gradient
  so an example that becomes done at step t keeps v_t (the first variables that satisfied `done`) to the end.

  Args:
    objective: `objective(v, step) -> values (B,)` or `(values (B,), aux)`; `step` is the 0-based int32 index.
    v0: the initial variables, any pytree of arrays. With `done`, every leaf has the leading example axis B.
    update: any optax GradientTransformation (`optax.adam(1e-2)`, `sign_step(step_size, "linf")`, chains).
      Its state is initialised from v0 here.
    steps: number of steps (a Python int; fixed at trace time).
    project: `project(v) -> v` applied after every update (identity by default), e.g. an eps-ball.
    maximize: ascend instead of descend (the gradient is negated before `update`).
    done: `done(aux) -> (B,) bool`: which examples are finished; once done, an example stays done.
    record: `record(aux) -> pytree` of per-step values to keep (e.g. Dice per example).
    final_objective: also evaluate the objective at the returned v (one more forward pass).
    unroll: `lax.scan`'s unroll; "auto" (`scan_unroll`) unrolls on CPU, where it is several times faster.
      Every form gives the same result.

  Returns:
    v: the variables after the loop (done examples: their variables at the step they became done).
    history: a dict of arrays stacked over steps,
      "objective": (steps, B) values_t, the objective at v_0 .. v_{steps-1} (computed with the gradient);
      "done": (steps, B) bool done_t (only with `done`): True from the step at which an example's v is frozen;
      "record": record(aux_t) stacked on a leading (steps,) axis (only with `record`);
      "final_objective": (B,) the objective at the returned v (only with `final_objective`);
      "final_done": (B,) bool done_{steps-1} | done(aux at the returned v) (with `done` and `final_objective`).
  """
  steps = int(steps)
  if steps < 0:
    raise ValueError(f"steps must be >= 0, got {steps}.")
  project = (lambda v: v) if project is None else project
  batch = None if done is None else _leading_size(v0, "optimize(done=...)")

  def total(v, step):
    values, aux = _split_output(objective(v, step))
    return jnp.sum(values), (values, aux)

  value_and_grad = jax.value_and_grad(total, has_aux=True)

  def check_done(flags):
    flags = jnp.asarray(flags)
    if flags.shape != (batch,):
      raise ValueError(f"done(aux) must return one flag per example, shape ({batch},); got {flags.shape}.")
    return flags.astype(bool)

  def body(carry, step):
    v, opt_state, finished = carry
    (_, (values, aux)), grad = value_and_grad(v, step)
    if maximize:
      grad = jax.tree.map(jnp.negative, grad)
    out = {"objective": values}
    if done is not None:
      finished = finished | check_done(done(aux))
      # Finished examples pass a zero gradient, so batch-coupled updates (global-norm clipping) ignore them.
      grad = where_examples(finished, jax.tree.map(jnp.zeros_like, grad), grad)
      out["done"] = finished
    if record is not None:
      out["record"] = record(aux)
    updates, opt_state = update.update(grad, opt_state, v)
    v_next = project(optax.apply_updates(v, updates))
    if done is not None:
      v_next = where_examples(finished, v, v_next)
    return (v_next, opt_state, finished), out

  finished0 = jnp.zeros((batch,), bool) if done is not None else jnp.zeros((), bool)
  (v, _, finished), history = scan(body, (v0, update.init(v0), finished0), jnp.arange(steps, dtype=jnp.int32),
                                    unroll=scan_unroll(steps, unroll))
  if final_objective:
    values, aux = _split_output(objective(v, jnp.asarray(steps, jnp.int32)))
    history["final_objective"] = values
    if done is not None:
      history["final_done"] = finished | check_done(done(aux))
  return v, history
