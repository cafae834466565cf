"""Adversarial training by data augmentation: a `batch_transform` for `train.loop.train_model`.

Each training batch has a fraction `mix_ratio` of its examples replaced by FGSM / i-FGSM / PGD examples made
on the fly with the current params and the true labels (Goodfellow et al. 2015; Kurakin et al. 2017; Madry
et al. 2018). The attack runs inside the jitted train step (the one attack loop of `mri_poison.attacks`) and
no gradient flows through it. Only brain voxels (any channel nonzero; background is exactly 0 by the data
contract) are perturbed, in z-score units. From scratch, or fine-tuning via `train_model(init_params=...)`.

Recommended setting: PGD (`attack="pgd"`, a uniform random start in the eps-ball, then `steps` sign steps of
`step_frac * eps`) at the budget the model will be evaluated at (the study's reference eps), on a long enough
schedule to converge (`recommended_config`). A model trained with single-step FGSM at a small fixed eps and
then judged against iterative attacks at larger eps cannot show robustness (Madry et al. 2018; FGSM training
also invites catastrophic overfitting to the one-step attack). `default_config` keeps FGSM at 0.1 only so that
older runs reproduce.

`ratio` is the old name of `mix_ratio` and is still read: when a config has a `ratio` entry it wins (it is
never in `default_config`, so only a caller can have put it there).
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
  """Defaults chosen here (the paper gives none): FGSM at eps 0.1 on half of every batch (see the module
  docstring: PGD at the reference budget, `recommended_config`, is the setting to use)."""
  return ml_collections.ConfigDict(dict(
      attack="fgsm",  # "fgsm" | "ifgsm" | "pgd"
      mix_ratio=0.5,  # fraction of each batch replaced by adversarial examples (old name: ratio)
      eps=0.1,  # L-inf budget, z-score units
      random_eps=False,  # draw each example's eps from U(0, eps) (Kurakin et al.) instead of a fixed eps
      steps=3,  # ifgsm / pgd iterations
      step_frac=0.5,  # ifgsm / pgd step size = step_frac * eps
      brain_only=True,  # perturb (and measure the attack loss on) brain voxels only
  ))


def recommended_config(eps: float, steps: int = 5, step_frac: float = 0.5,
                       mix_ratio: float = 0.5) -> ml_collections.ConfigDict:
  """PGD with a random start at budget `eps` (the reference eps of the evaluation) on `mix_ratio` of a batch.

  step_frac * steps = 2.5 by default (the step size 2.5 eps / steps of the Madry lab's `robustness` library):
  the steps can cross the ball from the random start and back, so the examples get near the ball's worst case.
  """
  c = default_config()
  c.update(dict(attack="pgd", eps=float(eps), steps=int(steps), step_frac=float(step_frac),
                mix_ratio=float(mix_ratio)))
  return c


def mix_ratio(cfg) -> float:
  """The share of adversarial examples of an adversarial-training config: `ratio` (old name) if present,
  else `mix_ratio` (default_config's 0.5 if neither)."""
  items = dict(cfg.items()) if cfg is not None else {}
  if "ratio" in items:
    return float(items["ratio"])
  return float(items.get("mix_ratio", default_config().mix_ratio))


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
  """`batch_transform(params, batch, key) -> batch` replacing a `cfg.mix_ratio` share of batch["image"].

  apply_fn(params, x) -> logits (e.g. `train.state.make_apply_fn(model)`); cfg: a ConfigDict or dict with the
  fields of `default_config()`, missing ones taking their defaults (`ratio` is read as `mix_ratio`). With B
  examples, the first floor(mix_ratio * B) are always adversarial and the next one with probability
  frac(mix_ratio * B), so the expected share is exactly `mix_ratio` for any batch size (the attack only runs on
  the examples that may be replaced). PGD starts from a uniform random point of the eps-ball, drawn from the
  step's key.
  """
  c = default_config()
  c.update(dict(cfg.items()) if cfg is not None else {})
  attack, ratio, eps = str(c.attack), mix_ratio(c), float(c.eps)
  ratio_key = "ratio" if "ratio" in c else "mix_ratio"
  steps, step_frac, random_eps, brain_only = int(c.steps), float(c.step_frac), bool(c.random_eps), bool(c.brain_only)
  if attack not in ATTACKS:
    raise ValueError(f"adversarial.attack={attack!r}: expected one of {ATTACKS}")
  if not 0.0 <= ratio <= 1.0:
    raise ValueError(f"adversarial.{ratio_key}={ratio}: expected a fraction in [0, 1]")
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
