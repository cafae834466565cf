"""Adversarial training by data augmentation: a `batch_transform` for `train.loop.train_model`.

Each training batch has a fraction `ratio` of its examples replaced by FGSM / i-FGSM / PGD examples made
on the fly with the current params and the true labels (Goodfellow et al. 2015; Kurakin et al. 2017; Madry
et al. 2018). The attack runs inside the jitted train step (the one attack loop of `mri_poison.attacks`) and
no gradient flows through it. Only brain voxels (any channel nonzero; background is exactly 0 by the data
contract) are perturbed, in z-score units. From scratch, or fine-tuning via `train_model(init_params=...)`.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections

from mri_poison.attacks import gradient
from mri_poison.attacks import losses as attack_losses

ATTACKS = ("fgsm", "ifgsm", "pgd")


def default_config() -> ml_collections.ConfigDict:
  """Defaults chosen here (the paper gives none): FGSM at eps 0.1 on half of every batch."""
  return ml_collections.ConfigDict(dict(
      attack="fgsm",  # "fgsm" | "ifgsm" | "pgd"
      ratio=0.5,  # fraction of each batch replaced by adversarial examples
      eps=0.1,  # L-inf budget, z-score units
      random_eps=False,  # draw each example's eps from U(0, eps) (Kurakin et al.) instead of a fixed eps
      steps=3,  # ifgsm / pgd iterations
      step_frac=0.5,  # ifgsm / pgd step size = step_frac * eps
      brain_only=True,  # perturb (and measure the attack loss on) brain voxels only
  ))


def brain_mask(image) -> jax.Array:
  """(B, *S) bool: voxels where any channel is nonzero (background is exactly 0 after z-scoring)."""
  return jnp.any(image != 0, axis=-1)


def adversarial_examples(apply_fn, params, image, label, key, *, attack: str = "fgsm", eps=0.1, steps: int = 3,
                         step_size=None, mask=None) -> jax.Array:
  """Untargeted CE attack on (image, label) with the model `apply_fn(params, x)`; gradient-stopped result."""
  loss = attack_losses.cross_entropy(apply_fn, params, label, mask)
  if attack == "fgsm":
    x_adv = gradient.fgsm(loss, image, eps=eps, mask=mask)
  elif attack == "ifgsm":
    x_adv = gradient.ifgsm(loss, image, eps=eps, step_size=step_size, steps=int(steps), mask=mask)
  elif attack == "pgd":
    x_adv = gradient.pgd(loss, image, eps=eps, step_size=step_size, steps=int(steps), key=key, mask=mask)
  else:
    raise ValueError(f"adversarial training attack={attack!r}: expected one of {ATTACKS}")
  return jax.lax.stop_gradient(x_adv)


def adversarial_batch_transform(apply_fn: Callable, cfg: Any = None) -> Callable[[Any, dict, jax.Array], dict]:
  """`batch_transform(params, batch, key) -> batch` replacing a `cfg.ratio` share of batch["image"].

  apply_fn(params, x) -> logits (e.g. `train.state.make_apply_fn(model)`); cfg: a ConfigDict or dict with the
  fields of `default_config()`, missing ones taking their defaults. With B examples, the first
  floor(ratio * B) are always adversarial and the next one with probability frac(ratio * B), so the expected
  share is exactly `ratio` for any batch size (the attack only runs on the examples that may be replaced).
  """
  c = default_config()
  c.update(dict(cfg.items()) if cfg is not None else {})
  attack, ratio, eps = str(c.attack), float(c.ratio), float(c.eps)
  steps, step_frac, random_eps, brain_only = int(c.steps), float(c.step_frac), bool(c.random_eps), bool(c.brain_only)
  if attack not in ATTACKS:
    raise ValueError(f"adversarial.attack={attack!r}: expected one of {ATTACKS}")
  if not 0.0 <= ratio <= 1.0:
    raise ValueError(f"adversarial.ratio={ratio}: expected a fraction in [0, 1]")
  if eps < 0:
    raise ValueError(f"adversarial.eps={eps}: expected >= 0")

  def transform(params, batch, key):
    image, label = batch["image"], batch["label"]
    b = image.shape[0]
    n_sure = math.floor(ratio * b + 1e-9)
    extra = ratio * b - n_sure
    n_attack = min(b, n_sure + (1 if extra > 1e-9 else 0))
    if n_attack == 0:
      return batch
    eps_key, coin_key, attack_key = jax.random.split(key, 3)
    x, y = image[:n_attack], label[:n_attack]
    mask = brain_mask(x) if brain_only else None
    # Per-example eps, full-rank (B, 1, ..., 1): a (B,) vector is ambiguous when B equals the channel count.
    e = jnp.full((n_attack,) + (1,) * (x.ndim - 1), eps, jnp.float32)
    if random_eps:
      e = e * jax.random.uniform(eps_key, e.shape)
    x_adv = adversarial_examples(apply_fn, params, x, y, attack_key, attack=attack, eps=e, steps=steps,
                                 step_size=step_frac * e, mask=mask)
    index = jnp.arange(n_attack)
    keep = (index < n_sure) | ((index == n_sure) & (jax.random.uniform(coin_key) < extra))
    x_new = jnp.where(keep.reshape((-1,) + (1,) * (x.ndim - 1)), x_adv.astype(x.dtype), x)
    return dict(batch, image=image.at[:n_attack].set(x_new))

  return transform
