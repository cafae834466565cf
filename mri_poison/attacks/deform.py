"""Learned deformation-and-appearance attack on a segmenter (study 3; Chen et al., SASHIMI 2019, reconstructed).

Transformation (the design is not public; every choice is a `default_config()` field):
  x_adv = warp(b * x + a, u),  y_adv = warp_labels(y, u)
- u: displacement (voxels) from low-resolution control points upsampled by a cubic B-spline (or linearly);
  with field="svf" (default) the control points are a stationary velocity field integrated by scaling and
  squaring, so the map is diffeomorphic and the folding penalty is a check, not a crutch.
- b = exp(upsampled log-bias control points): a smooth multiplicative bias field, shared by the contrasts or one
  per contrast; a: an optional additive term per voxel, inside the brain only (background stays 0).
- The label map is warped by the same u with nearest-neighbour reads, so the ground truth stays valid and its
  values stay in {0, 1, 2, 3}.

Budgets, exact by construction: the variables `z` are normalised ({"disp": (B, *G, D) vectors of norm <= 1,
"bias": (B, *Gb, Cb) in [-1, 1], "add": (B, *S, C) in [-1, 1]}; `project` enforces it) and scaled by the
budgets; upsampling is a convex combination (`ops.warp.upsample`) and scaling and squaring never grows the
largest displacement, so |u| <= max_disp at every voxel, b in [1 / (1 + bias_range), 1 + bias_range] and
|a| <= add_eps.

Objective per case (`objective_fn`): with Dice the mean of the BraTS region Dice (WT, TC, ET), target
d* = Dice_clean - Delta (hard Dice of the clean prediction),
  loss="squared": (Dice(S(x_adv), y_adv) - d*)^2;   loss="hinge": relu(Dice - d*)
  + smooth_weight |grad u|^2 + fold_weight relu(fold_margin - det J)^2 + bias_weight (log b)^2 + add_weight a^2
The gradient is the soft Dice's (softmax against the warped labels); by default (dice="straight_through")
the objective's value is the hard Dice's, the one reported, so the target means the same in both.
A case stops (`optimize`'s done) once its hard Dice is within `tol` of d* (squared) or below d* + tol (hinge).

Modes: per-case optimisation (`attack`: `attacks.optimize` with optax.adam under jit, one lax.scan), and a
generator G(x, Delta) -> z trained over a dataset against a frozen segmenter (`generator_step`, run by
`train.fit` in the study), applied to unseen cases in one forward pass. Baseline: `random_variables`, random
fields at the full budgets.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from mri_poison import losses
from mri_poison import metrics
from mri_poison.attacks.optimize import optimize
from mri_poison.ops import warp

Array = jax.Array

FIELDS = ("svf", "direct")
LOSSES = ("squared", "hinge")
STOPS = ("hard", "soft", "none")
DICE_MODES = ("straight_through", "soft")
BIAS_CHANNELS = ("shared", "per_channel")


def default_config() -> ml_collections.ConfigDict:
  """Defaults chosen here (the paper's abstract gives none of these)."""
  return ml_collections.ConfigDict(dict(
      grid=4,  # displacement control points per spatial axis (spacing ~ S / 3 voxels)
      interp="bspline",  # "bspline" (cubic) | "linear" up-sampling of control points
      field="svf",  # "svf": velocity field integrated by scaling and squaring (diffeomorphic) | "direct"
      svf_steps=6,  # scaling-and-squaring steps
      max_disp=3.0,  # budget: largest displacement, voxels (Euclidean), exact
      bias_grid=3,  # bias-field control points per spatial axis
      bias_range=0.3,  # budget: b in [1 / (1 + r), 1 + r], i.e. |log b| <= log(1 + r), exact
      bias_channels="shared",  # "shared": one bias field for all contrasts | "per_channel"
      add_eps=0.0,  # budget of the additive term per voxel (z-score units, brain only); 0 = off
      loss="squared",  # "squared": (Dice - target)^2 | "hinge": relu(Dice - target)
      dice="straight_through",  # objective's Dice: "straight_through" (value of the hard Dice, gradient of
                                # the soft one) | "soft" (soft Dice throughout; its value can sit far from
                                # the hard Dice, so a hard target can point the wrong way)
      smooth_weight=0.01,  # |grad u|^2
      fold_weight=1.0,  # relu(fold_margin - det J)^2
      fold_margin=0.1,
      bias_weight=0.0,  # (log b)^2
      add_weight=0.0,  # a^2
      steps=60,  # per-case optimisation steps
      lr=0.05,  # Adam learning rate on the normalised variables (budget units)
      tol=0.02,  # a case is done when |hard Dice - target| <= tol (hinge: hard Dice <= target + tol)
      stop="hard",  # done on the "hard" (reported) or "soft" Dice; "none": run every step
      init="zero",  # "zero": start at the identity | "random": random start of size init_scale
      init_scale=0.1,
  ))


class Settings(NamedTuple):
  """The static (hashable) part of a deformation config: fixed at trace time."""
  grid: int
  interp: str
  field: str
  svf_steps: int
  max_disp: float
  bias_grid: int
  bias_range: float
  bias_channels: str
  add_eps: float
  loss: str
  dice: str
  smooth_weight: float
  fold_weight: float
  fold_margin: float
  bias_weight: float
  add_weight: float
  steps: int
  lr: float
  tol: float
  stop: str
  init: str
  init_scale: float


def settings(cfg=None, **overrides) -> Settings:
  """`Settings` from a config (ConfigDict / dict; missing fields take `default_config()`), checked."""
  c = default_config()
  if cfg is not None:
    c.update(dict(cfg.items()) if hasattr(cfg, "items") else dict(cfg._asdict()))
  c.update(overrides)
  s = Settings(**{f: type(getattr(default_config(), f))(c[f]) for f in Settings._fields})
  checks = [(s.field in FIELDS, "field", FIELDS), (s.interp in warp.INTERPOLATIONS, "interp", warp.INTERPOLATIONS),
            (s.loss in LOSSES, "loss", LOSSES), (s.dice in DICE_MODES, "dice", DICE_MODES), (s.stop in STOPS, "stop", STOPS),
            (s.bias_channels in BIAS_CHANNELS, "bias_channels", BIAS_CHANNELS),
            (s.init in ("zero", "random"), "init", ("zero", "random"))]
  for ok, key, allowed in checks:
    if not ok:
      raise ValueError(f"config deform.{key}={getattr(s, key)!r}: expected one of {allowed}")
  if s.grid < 2 or s.bias_grid < 1:
    raise ValueError(f"config deform.grid={s.grid} / bias_grid={s.bias_grid}: expected grid >= 2, bias_grid >= 1")
  if s.max_disp < 0 or s.bias_range < 0 or s.add_eps < 0:
    raise ValueError("config deform.max_disp, bias_range and add_eps are budgets: expected >= 0")
  if s.steps < 0 or s.lr <= 0 or s.tol < 0:
    raise ValueError("config deform.steps >= 0, lr > 0 and tol >= 0 expected")
  return s


# ------------------------------------------------------------------------------------------- transformation


def variable_shapes(image_shape, s: Settings) -> dict[str, tuple[int, ...]]:
  """Shapes of the normalised variables for a batch of images (B, *S, C)."""
  b, spatial, c = image_shape[0], tuple(image_shape[1:-1]), image_shape[-1]
  d = len(spatial)
  shapes = {"disp": (b,) + (s.grid,) * d + (d,),
            "bias": (b,) + (s.bias_grid,) * d + (c if s.bias_channels == "per_channel" else 1,)}
  if s.add_eps > 0:
    shapes["add"] = tuple(image_shape)
  return shapes


def zero_variables(image_shape, s: Settings) -> dict:
  """The identity transformation."""
  return {k: jnp.zeros(v, jnp.float32) for k, v in variable_shapes(image_shape, s).items()}


def project(z: dict) -> dict:
  """The budget set: displacement control vectors in the unit ball, bias and additive terms in [-1, 1]."""
  out = {"disp": warp.project_ball(z["disp"], 1.0), "bias": jnp.clip(z["bias"], -1.0, 1.0)}
  if "add" in z:
    out["add"] = jnp.clip(z["add"], -1.0, 1.0)
  return out


def random_variables(key, image_shape, s: Settings, scale: float = 1.0) -> dict:
  """Random fields at `scale` x the budgets: every displacement control vector of norm `scale` in a random
  direction, every log-bias control point at +-scale, the additive term +-scale per voxel (random signs).

  At scale 1 this is the baseline "random field with the same budgets", as large as the budget allows.
  """
  shapes = variable_shapes(image_shape, s)
  keys = jax.random.split(key, 3)
  g = jax.random.normal(keys[0], shapes["disp"])
  out = {"disp": scale * g / jnp.maximum(jnp.linalg.norm(g, axis=-1, keepdims=True), 1e-12),
         "bias": scale * jax.random.rademacher(keys[1], shapes["bias"], jnp.float32)}
  if "add" in shapes:
    out["add"] = scale * jax.random.rademacher(keys[2], shapes["add"], jnp.float32)
  return out


def initial_variables(key, image_shape, s: Settings) -> dict:
  if s.init == "random":
    return random_variables(key, image_shape, s, s.init_scale)
  return zero_variables(image_shape, s)


def fields(z: dict, spatial, s: Settings) -> dict:
  """Dense physical fields from the normalised variables: disp (B, *S, D) voxels, log_bias (B, *S, Cb)."""
  spatial = tuple(spatial)
  dense = warp.upsample(z["disp"], spatial, s.interp) * s.max_disp
  disp = warp.integrate_velocity(dense, s.svf_steps) if s.field == "svf" else dense
  log_bias = warp.upsample(z["bias"], spatial, s.interp) * jnp.log1p(s.bias_range)
  return {"disp": disp, "log_bias": log_bias}


def transform(x: Array, y: Array, z: dict, s: Settings) -> dict:
  """{"image": x_adv (B, *S, C), "label": y_adv (B, *S), "disp", "log_bias"}: x_adv = warp(b x + a, u)."""
  f = fields(z, x.shape[1:-1], s)
  appearance = jnp.exp(f["log_bias"]) * x
  if "add" in z and s.add_eps > 0:
    brain = jnp.any(x != 0, axis=-1, keepdims=True)  # background stays 0 (data contract)
    appearance = appearance + s.add_eps * z["add"] * brain
  return {"image": warp.warp(appearance, f["disp"]), "label": warp.warp_labels(y, f["disp"]), **f}


# ------------------------------------------------------------------------------------------- Dice


def soft_region_dice(logits: Array, labels: Array) -> Array:
  """(B,) differentiable mean Dice over the BraTS regions: region probabilities from the softmax (WT = p1 +
  p2 + p3, TC = p1 + p3, ET = p3) against the region masks of `labels` (the losses module's smoothing)."""
  p = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  probs = jnp.stack([p[..., 1] + p[..., 2] + p[..., 3], p[..., 1] + p[..., 3], p[..., 3]], axis=-1)
  targets = jnp.stack([labels > 0, (labels == 1) | (labels == 3), labels == 3], axis=-1)
  return 1.0 - losses.soft_dice_loss(probs, targets)


def hard_region_dice(logits: Array, labels: Array) -> Array:
  """(B,) mean Dice over WT, TC, ET of the argmax prediction (both empty -> 1, the BraTS convention)."""
  return jnp.mean(metrics.dice_from_counts(metrics.region_counts(jnp.argmax(logits, -1), labels)), axis=-1)


# ------------------------------------------------------------------------------------------- objective


def regularisers(f: dict, z: dict, s: Settings) -> Array:
  """(B,) weighted smoothness, folding, bias and additive penalties."""
  reg = s.smooth_weight * warp.smoothness(f["disp"]) + s.fold_weight * warp.folding_penalty(f["disp"], s.fold_margin)
  if s.bias_weight:
    reg = reg + s.bias_weight * jnp.mean(jnp.square(f["log_bias"]), axis=tuple(range(1, f["log_bias"].ndim)))
  if s.add_weight and "add" in z:
    reg = reg + s.add_weight * jnp.mean(jnp.square(s.add_eps * z["add"]), axis=tuple(range(1, z["add"].ndim)))
  return reg


def objective_dice(soft: Array, hard: Array, mode: str) -> Array:
  """The Dice the objective uses: "soft", or "straight_through" = soft + stop_gradient(hard - soft), whose
  value is the hard (reported) Dice and whose gradient is the soft Dice's.

  Why: a confident segmenter's soft region Dice can sit well below its hard Dice (background voxels add
  probability mass), so (soft - (hard_clean - Delta))^2 may ask the attack to *raise* the soft Dice."""
  if mode == "soft":
    return soft
  return soft + jax.lax.stop_gradient(hard - soft)


def attack_term(dice: Array, target: Array, loss: str) -> Array:
  """(B,) squared distance to the target Dice, or the hinge relu(dice - target)."""
  if loss == "squared":
    return jnp.square(dice - target)
  return jax.nn.relu(dice - target)


def objective_fn(apply_fn: Callable, params, x, y, target, s: Settings) -> Callable:
  """`objective(z, step) -> (values (B,), aux)` for `optimize`; aux: hard and soft Dice of x_adv."""

  def objective(z, step):
    del step
    out = transform(x, y, z, s)
    logits = apply_fn(params, out["image"])
    soft = soft_region_dice(logits, out["label"])
    hard = hard_region_dice(logits, out["label"])
    values = attack_term(objective_dice(soft, hard, s.dice), target, s.loss) + regularisers(out, z, s)
    return values, {"hard": hard, "soft": soft}

  return objective


def reached(dice: Array, target: Array, s: Settings) -> Array:
  """(B,) bool: a case's Dice is at its target within tol."""
  if s.loss == "hinge":
    return dice <= target + s.tol
  return jnp.abs(dice - target) <= s.tol


@functools.partial(jax.jit, static_argnames=("apply_fn", "s"))
def attack(apply_fn: Callable, params, x: Array, y: Array, delta: Array, key: Array, s: Settings):
  """Per-case optimisation of the control points: returns (z, info). Compiled once per (apply_fn, shape, s).

  x (B, *S, C) float32, y (B, *S) int labels, delta (B,) or scalar target drops (traced: a new Delta does not
  recompile; delta >= 1 with loss="hinge" asks for the largest drop the budget allows). info: "clean" (B,)
  hard Dice, "target" (B,), "objective" (steps, B), "dice" (steps, B) hard Dice per step, "steps_used" (B,).
  """
  clean = hard_region_dice(apply_fn(params, x), y)
  target = jnp.maximum(clean - jnp.broadcast_to(jnp.asarray(delta, jnp.float32), clean.shape), 0.0)
  objective = objective_fn(apply_fn, params, x, y, target, s)
  done = None if s.stop == "none" else (lambda aux: reached(aux[s.stop], target, s))
  z0 = project(initial_variables(key, x.shape, s))
  z, hist = optimize(objective, z0, update=optax.adam(s.lr), steps=s.steps, project=project, done=done,
                     record=lambda aux: aux["hard"])
  info = {"clean": clean, "target": target, "objective": hist["objective"], "dice": hist["record"]}
  info["steps_used"] = (jnp.sum(~hist["done"], axis=0) if "done" in hist
                        else jnp.full(clean.shape, s.steps, jnp.int32))
  return z, info


@functools.partial(jax.jit, static_argnames=("apply_fn", "s"))
def evaluate(apply_fn: Callable, params, x: Array, y: Array, z: dict, s: Settings) -> dict:
  """Per-case report of a transformation z: hard Dice, prediction, budgets used, folding. Jitted.

  Returns {"dice" (B,), "pred" (B, *S), "image", "label", "disp", "max_disp" (B,), "folded" (B,) fraction of
  det J <= 0, "bias_min"/"bias_max" (B,) over brain voxels, "add_max" (B,)}.
  """
  out = transform(x, y, z, s)
  logits = apply_fn(params, out["image"])
  spatial_axes = tuple(range(1, x.ndim - 1))
  brain = jnp.any(x != 0, axis=-1)[..., None]
  bias = jnp.exp(out["log_bias"])
  res = {"dice": hard_region_dice(logits, out["label"]), "pred": jnp.argmax(logits, -1),
         "image": out["image"], "label": out["label"], "disp": out["disp"],
         "max_disp": warp.max_displacement(out["disp"]), "folded": warp.folded_fraction(out["disp"]),
         "bias_min": jnp.min(jnp.where(brain, bias, jnp.inf), axis=spatial_axes + (x.ndim - 1,)),
         "bias_max": jnp.max(jnp.where(brain, bias, -jnp.inf), axis=spatial_axes + (x.ndim - 1,))}
  res["add_max"] = (s.add_eps * jnp.max(jnp.abs(z["add"]), axis=tuple(range(1, x.ndim))) if "add" in z
                    else jnp.zeros(x.shape[:1], jnp.float32))
  return res


# ------------------------------------------------------------------------------------------- generator mode


def generator_loss(gen_apply: Callable, gen_params, seg_apply: Callable, seg_params, x, y, delta,
                   s: Settings) -> tuple[Array, dict]:
  """Mean over the batch of the attack objective of G(x, delta)'s transformation against a frozen segmenter.

  The target is each example's clean hard Dice minus its delta; only the generator is differentiated.
  """
  clean = jax.lax.stop_gradient(hard_region_dice(seg_apply(seg_params, x), y))
  target = jnp.maximum(clean - delta, 0.0)
  z = gen_apply(gen_params, x, delta)
  out = transform(x, y, z, s)
  logits = seg_apply(seg_params, out["image"])
  soft = soft_region_dice(logits, out["label"])
  hard = hard_region_dice(logits, out["label"])
  values = attack_term(objective_dice(soft, hard, s.dice), target, s.loss) + regularisers(out, z, s)
  return jnp.mean(values), {"soft_dice": jnp.mean(soft), "hard_dice": jnp.mean(hard),
                            "clean_dice": jnp.mean(clean), "drop_error": jnp.mean(clean - hard - delta)}


def generator_step(gen_apply: Callable, seg_apply: Callable, tx: optax.GradientTransformation, s: Settings,
                   deltas) -> Callable:
  """`step(state, batch, seg_params) -> (state, metrics)` for `train.fit`: state {"gen": part, "step", "rng"}.

  Each example draws its target drop uniformly from [min(deltas), max(deltas)] with the step's key
  (fold_in(rng, step), so a resumed run replays the same draws).
  """
  lo, hi = float(min(deltas)), float(max(deltas))

  def step(state, batch, seg_params):
    key = jax.random.fold_in(state["rng"], state["step"])
    x, y = batch["image"], batch["label"]
    delta = jax.random.uniform(key, (x.shape[0],), minval=lo, maxval=hi)
    loss_fn = lambda g: generator_loss(gen_apply, g, seg_apply, seg_params, x, y, delta, s)
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["gen"]["params"])
    updates, opt_state = tx.update(grads, state["gen"]["opt_state"], state["gen"]["params"])
    gen = {**state["gen"], "params": optax.apply_updates(state["gen"]["params"], updates), "opt_state": opt_state}
    return {**state, "gen": gen, "step": state["step"] + 1}, {"loss": loss, **aux}

  return step
