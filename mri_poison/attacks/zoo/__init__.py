"""The attack zoo: every threat a study can run on a victim, chosen by name from config (`attack.attacks`).

A threat is one `Threat` entry, registered by a module of this package (all of them are imported on first
use). Adding an attack is one new module here that calls `register`, plus its name in a config: no study
lists attacks. An entry says what its cells depend on (`settings`), how many gradient evaluations it costs,
which random stream it draws from and how it runs on a batch of volumes (`run`).

`run(inputs)` attacks `inputs.x` (B, *S, C) at every eps of `inputs.eps` in one compiled call and returns
(x_adv (E, B, *S, C), history or None); history["loss"] (E, [restarts,] N, B) is the deployed model's plain CE
to the labels at each iterate (whatever loss the attack optimises), so every iterative attack's trajectory is
comparable.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from mri_poison import losses as seg_losses
from mri_poison.attacks import losses as attack_losses
from mri_poison.registry import Registry

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Inputs:
  """One volume batch under attack. eps: (E,) in z-score units, or (E, B, 1.., C) per case and channel.

  cfg: the study's `attack` config (steps, step_frac, restarts, margin_kappa, ...); key: this threat's random
  key for this batch; target: the targeted attacks' target map; temperature: the victim's training temperature.
  """
  apply_fn: Callable
  params: Any
  x: Array
  labels: Array
  brain: Array
  eps: Array
  cfg: Any
  key: Array
  target: Array | None = None
  temperature: float = 1.0

  def tracked(self, loss, temperature: float = 1.0) -> "CETracked":
    return CETracked(loss, jnp.asarray(self.labels, jnp.int32), self.brain, float(temperature))

  @property
  def ce(self) -> attack_losses.DenseLoss:
    """The plain CE to the labels over the brain: the loss of FGSM, i-FGSM and PGD."""
    return attack_losses.cross_entropy(self.apply_fn, self.params, self.labels, self.brain)

  @property
  def steps(self) -> int:
    return int(self.cfg.steps)

  @property
  def chunk(self) -> int | None:
    return int(self.cfg.get("eps_chunk", 0)) or None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CETracked:
  """An attack loss whose gradient is `loss`'s and whose value is the plain CE of the deployed model.

  value = loss + stop_gradient(CE - loss): the sign steps (which only use the gradient) are exactly `loss`'s,
  while the loop's recorded loss history becomes the CE to the true labels at every iterate (one forward pass
  serves both). `temperature` undoes a `scaled_apply` (deployed logits = logits x T). With PGD restarts > 1
  the restart kept is the one of the highest final CE.
  """
  loss: attack_losses.DenseLoss
  labels: Array
  mask: Array | None
  temperature: float = dataclasses.field(default=1.0, metadata=dict(static=True))

  def __call__(self, x, step=0):
    inner = self.loss
    logits = jnp.asarray(inner.apply_fn(inner.params, x), jnp.float32)
    value = inner.reduce(logits, inner.labels, inner.mask, step, inner.steps)
    ce = seg_losses.cross_entropy(logits * self.temperature, self.labels, self.mask)
    return value + jax.lax.stop_gradient(ce - value)


def _no_settings(cfg, temperature) -> dict:
  del cfg, temperature
  return {}


def _always(victim: str, temperature: float, source: str) -> bool:
  del victim, temperature, source
  return True


@dataclasses.dataclass(frozen=True)
class Threat:
  """One attack (or baseline) of the zoo.

  name: its config name; stream: its random stream's number, fixed for ever (a cell's key includes it, so a
  number is never reused or changed); text: one line for reports; run: see the module doc (None for a threat
  that only `replays` another); iterative: records a CE trajectory (history); random: draws from its key (its
  cells then depend on the key, the stream and the volume batch); restarts: runs `attack.restarts` times;
  targeted: decreases a loss to the target map (scored by targeted success too); deployed_ce: an attack on
  the deployed logits with a (re-weighted) CE, the paper's evaluation; replays: the name of the attack whose
  examples on a source model this threat replays on the victim (transfer); source: which model that is,
  "own" (the study's own source model) or "external" (a trained model the study's config names, of any
  architecture); settings(cfg,
  temperature): the config values its cells depend on beyond the shared ones; applies(victim, temperature,
  source): whether it is a distinct attack on that victim; cost(cfg): gradient evaluations per volume and eps.
  """
  name: str
  stream: int
  text: str
  run: Callable[[Inputs], tuple[Array, dict | None]] | None = None
  iterative: bool = False
  random: bool = False
  restarts: bool = False
  targeted: bool = False
  deployed_ce: bool = False
  replays: str | None = None
  source: str = "own"
  settings: Callable[[Any, float], dict] = _no_settings
  applies: Callable[[str, float, str], bool] = _always
  cost: Callable[[Any], int] | None = None

  def gradient_evaluations(self, cfg) -> int:
    if self.cost is not None:
      return int(self.cost(cfg))
    if self.replays is not None:
      return get(self.replays).gradient_evaluations(cfg)
    if not self.iterative:
      return 1
    return int(cfg.steps) * (int(cfg.restarts) if self.restarts else 1)


SOURCES = ("own", "external")  # where a replaying threat's examples come from (see Threat)
_REGISTRY: Registry[Threat] = Registry(__name__, "attack", lambda t: t.stream)


def register(threat: Threat) -> Threat:
  """Adds `threat` to the zoo; its name and its stream must be new."""
  taken = {t.stream: t.name for t in _REGISTRY.registered()}
  if threat.stream in taken and taken[threat.stream] != threat.name:
    raise ValueError(f"attack {threat.name!r}: random stream {threat.stream} is already {taken[threat.stream]!r}'s")
  if (threat.run is None) == (threat.replays is None):
    raise ValueError(f"attack {threat.name!r}: give exactly one of run and replays")
  if threat.source not in SOURCES:
    raise ValueError(f"attack {threat.name!r}: source {threat.source!r} is not one of {SOURCES}")
  return _REGISTRY.add(threat)


def names() -> tuple[str, ...]:
  """Every registered threat, in the order of their streams (the order reports list them in)."""
  return _REGISTRY.names()


def get(name: str) -> Threat:
  return _REGISTRY.get(name)
