"""Checks reported with every attack evaluation (in the spirit of AutoAttack, Croce & Hein 2020) and the
3D AutoAttack-style robust-fraction protocol (Daza et al., MICCAI 2021).

- `gradient_sanity`: fraction of zero input-gradients (gradient masking / saturated models show up here).
- `random_sign_noise` / `random_sign_baseline`: same-eps random noise; an attack must do better than it.
- `loss_increase`: from the loop's loss history, did the attack's loss go up.
- `robust_fraction` / `sequential_robustness`: a volume is broken when Dice < factor x clean mean Dice;
  attacks run in sequence on the volumes still robust.
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mri_poison.attacks import loop

Array = jax.Array


@loop.filter_jit
def _grad(loss_fn, x):
  return jax.grad(lambda z: jnp.sum(loop.per_example_loss(loss_fn, z, jnp.asarray(0, jnp.int32))))(x)


def gradient_sanity(loss_fn, x, *, mask=None) -> dict:
  """Input-gradient statistics per example: {"zero_grad_fraction": (B,), "grad_l2": (B,), "finite": (B,) bool}.

  The zero fraction counts voxels (inside `mask`, if given) whose gradient is exactly 0.
  """
  x = jnp.asarray(x)
  g = _grad(loss_fn, x)
  m = loop.broadcast_mask(mask, x)
  m = jnp.ones_like(x) if m is None else jnp.broadcast_to(m, x.shape)
  axes = tuple(range(1, x.ndim))
  zero = jnp.sum((g == 0) * m, axis=axes) / jnp.maximum(jnp.sum(m, axis=axes), 1.0)
  return {"zero_grad_fraction": zero, "grad_l2": jnp.sqrt(jnp.sum(jnp.square(g * m), axis=axes)),
          "finite": jnp.all(jnp.isfinite(g), axis=axes)}


def random_sign_noise(x, *, eps, key, norm="linf", lower=None, upper=None, mask=None) -> Array:
  """x + eps * random signs (L-inf; on the eps-ball's corners like FGSM) or a random direction of L2 norm eps."""
  x = jnp.asarray(x)
  eps = loop.broadcast_param(eps, x, "eps")
  mask = loop.broadcast_mask(mask, x)
  if norm == "linf":
    delta = eps * jax.random.rademacher(key, x.shape, x.dtype)
  elif norm == "l2":
    d = jax.random.normal(key, x.shape, x.dtype)
    if mask is not None:
      d = d * mask
    delta = d / jnp.maximum(loop._l2_norm(d), 1e-12) * eps  # pylint: disable=protected-access
  else:
    raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}.")
  return loop.project(x + delta, x, eps=eps, norm=norm, lower=lower, upper=upper, mask=mask)


@loop.filter_jit
def _losses(loss_fn, xs):
  return [loop.per_example_loss(loss_fn, z, jnp.asarray(0, jnp.int32)) for z in xs]


def random_sign_baseline(loss_fn, x, *, eps, key, x_adv=None, norm="linf", lower=None, upper=None,
                         mask=None) -> dict:
  """Loss on clean x, on same-eps random noise and (if given) on x_adv, per example.

  Returns {"x_noise", "clean_loss", "noise_loss"[, "adv_loss", "beats_noise" (B,) bool]}.
  """
  x_noise = random_sign_noise(x, eps=eps, key=key, norm=norm, lower=lower, upper=upper, mask=mask)
  xs = [jnp.asarray(x), x_noise] + ([] if x_adv is None else [jnp.asarray(x_adv)])
  losses = _losses(loss_fn, xs)
  out = {"x_noise": x_noise, "clean_loss": losses[0], "noise_loss": losses[1]}
  if x_adv is not None:
    out["adv_loss"] = losses[2]
    out["beats_noise"] = losses[2] > losses[1]
  return out


def loss_increase(history: dict, *, targeted=False) -> dict:
  """From a loop history ({"loss": (..., T, B), "final_loss": (..., B)}): did the loss move the right way.

  Returns per example {"gain": final - first (negated when targeted), "increased": gain > 0,
  "monotone_fraction": fraction of steps that did not go backwards}.
  """
  losses = jnp.asarray(history["loss"])
  final = jnp.asarray(history.get("final_loss", losses[..., -1, :]))
  seq = jnp.concatenate([losses, final[..., None, :]], axis=-2)
  sign = -1.0 if targeted else 1.0
  steps = sign * jnp.diff(seq, axis=-2)
  gain = sign * (final - losses[..., 0, :])
  return {"gain": gain, "increased": gain > 0, "monotone_fraction": jnp.mean(steps >= 0, axis=-2)}


def is_robust(dice_adv, dice_clean_mean, factor=0.5) -> np.ndarray:
  """True where a volume is NOT broken: Dice >= factor x clean mean Dice."""
  return np.asarray(dice_adv) >= factor * float(dice_clean_mean)


def robust_fraction(dice_adv, dice_clean_mean, factor=0.5):
  """Fraction of volumes whose Dice stays >= factor x clean mean Dice (last axis = volumes; e.g. (E, N) -> (E,))."""
  return np.mean(is_robust(dice_adv, dice_clean_mean, factor), axis=-1)


def sequential_robustness(attacks: Sequence[tuple[str, Callable[[np.ndarray], np.ndarray]]], dice_clean,
                          *, factor=0.5, dice_clean_mean=None) -> dict:
  """3D AutoAttack protocol: run attacks in order, each only on the volumes still robust.

  attacks: (name, fn) pairs; fn(indices int array) attacks those volumes and returns their Dice (len(indices),).
  dice_clean: (N,) clean Dice per volume; the threshold is factor x its mean (or `dice_clean_mean`). Volumes
  already below it clean count as broken before any attack.
  Returns {"threshold", "robust_after": {name: fraction robust after this and the earlier attacks},
  "robust": (N,) bool at the end, "worst_dice": (N,) lowest Dice seen, "broken_by": (N,) name or "clean"/""}.
  """
  dice_clean = np.asarray(dice_clean, np.float64)
  mean = float(np.mean(dice_clean)) if dice_clean_mean is None else float(dice_clean_mean)
  threshold = factor * mean
  robust = dice_clean >= threshold
  worst = dice_clean.copy()
  broken_by = np.where(robust, "", "clean").astype(object)
  robust_after = {}
  for name, fn in attacks:
    idx = np.flatnonzero(robust)
    if idx.size:
      d = np.asarray(fn(idx), np.float64).reshape(-1)
      if d.shape != idx.shape:
        raise ValueError(f"attack {name!r} returned {d.shape[0]} Dice values for {idx.size} volumes.")
      worst[idx] = np.minimum(worst[idx], d)
      newly = d < threshold
      robust[idx[newly]] = False
      broken_by[idx[newly]] = name
    robust_after[name] = float(np.mean(robust))
  return {"threshold": threshold, "robust_after": robust_after, "robust": robust, "worst_dice": worst,
          "broken_by": broken_by}
