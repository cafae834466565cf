"""An eps grid in one compiled call: the attack vmapped over eps (optionally in chunks with lax.map)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mri_poison.attacks import loop


def _one_eps(attack, args, kwargs, step_size_frac, e):
  kw = dict(kwargs, eps=e)
  if step_size_frac is not None:
    kw["step_size"] = step_size_frac * e
  return attack(*args, **kw)


@loop.filter_jit
def _sweep(attack, args, kwargs, eps, step_size_frac, chunk_size):
  fn = lambda e: _one_eps(attack, args, kwargs, step_size_frac, e)
  if chunk_size is None:
    return jax.vmap(fn)(eps)
  # lax.map with batch_size vmaps `chunk_size` eps at a time: bounded memory at full 3D size.
  return jax.lax.map(fn, eps, batch_size=int(chunk_size))


def sweep(attack, *args, eps, step_size_frac=None, chunk_size=None, **kwargs):
  """Runs `attack(*args, eps=e, **kwargs)` for every e in `eps` in ONE compiled call; stacks along axis 0.

  e.g. `sweep(ifgsm, loss_fn, x, eps=jnp.array([.01, .02, .05, .1]), step_size_frac=0.25, steps=10)` -> (E, *x.shape).
  `eps` (E,) or (E, B) (per example); `step_size_frac` sets step_size = frac * eps for each grid point;
  `chunk_size` runs that many eps at a time (lax.map) instead of all at once (vmap). Outputs that are tuples
  (e.g. `return_history=True`) are stacked leaf by leaf. Float keyword values are passed traced, so another
  grid of the same length reuses the compiled program.
  """
  eps = jnp.asarray(eps, jnp.float32)
  if eps.ndim < 1:
    raise ValueError(f"sweep needs an array of eps values (E,) or (E, B); got shape {eps.shape}.")
  kwargs = {k: jnp.asarray(v, jnp.float32) if isinstance(v, float) else v for k, v in kwargs.items()}
  frac = None if step_size_frac is None else jnp.asarray(step_size_frac, jnp.float32)
  return _sweep(attack, args, kwargs, eps, frac, chunk_size)
