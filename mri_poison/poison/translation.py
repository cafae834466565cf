"""Translation helpers of study 1: the SANTA GAN's losses, its train step and trainer, and slice-wise synthesis.

Intensities: the data contract's z-scored images are mapped to the generator's tanh range by
`to_gan_range(x) = clip(x / intensity_scale, -1, 1)` and back by `* intensity_scale`; synthetic volumes are
masked to the source case's head (background exactly 0) and z-scored again inside it, so a synthetic T1-Ce
obeys the same contract as a real one.

Losses (docs/methods.md, study 1; every weight a field of config.gan.loss with SANTA's default):
  z_A = mu_A + N(0, 1), z_B = mu_B + N(0, 1)   (latent noise in training)
  D:  0.5 [ (D(x_B) - 1)^2 + D(G(z_A, 1))^2 ]                              (LSGAN)
  G:  adv (D(G(z_A, 1)) - 1)^2 + rec |G(z_A, 0) - x_A| + idt |G(z_B, 1) - x_B| + latent mean(mu^2)
      + path L_path + supervised |G(z_A, 1) - y_A|   (y_A: the co-registered target of x_A; weight 0 by default)
  L_path: d_c ~ U(0, 1), delta ~ U(delta_min, delta_max), d1 = clip(d_c + delta), d2 = clip(d_c - delta);
      J_l = (h_l(z_A, d1) - h_l(z_A, d2)) / max(d1 - d2, min_gap) over the decoder features h_l;
      L_path = mean_l mean(J_l^2).
One jitted step updates the discriminator, then the generator against the updated discriminator, each with its
own Adam (lr 2e-4, betas (0.5, 0.999)); `train_gan` runs it with the shared trainer `train.fit` (checkpoints,
resume, metrics, progress).
"""
from __future__ import annotations

import copy
import functools
import json
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mri_poison.models.gan import Generator, PatchDiscriminator
from mri_poison.train import parts
from mri_poison.train import trainer


def to_gan_range(x, scale: float):
  """z-scored intensities -> the generator's [-1, 1] (values beyond +-scale are clipped)."""
  return jnp.clip(x / scale, -1.0, 1.0)


def from_gan_range(y, scale: float):
  return y * scale


def make_generator(model_cfg) -> Generator:
  return Generator(features=int(model_cfg.features), n_down=int(model_cfg.n_down), n_res=int(model_cfg.n_res),
                   style_dim=int(model_cfg.style_dim), out_channels=1)


def make_discriminator(model_cfg) -> PatchDiscriminator:
  return PatchDiscriminator(features=int(model_cfg.disc_features), n_layers=int(model_cfg.disc_layers))


def make_optimizers(train_cfg) -> tuple[optax.GradientTransformation, optax.GradientTransformation]:
  """(generator, discriminator) Adam optimisers (SANTA: lr 2e-4, betas (0.5, 0.999))."""
  adam = lambda: optax.adam(float(train_cfg.lr), b1=float(train_cfg.b1), b2=float(train_cfg.b2))
  return adam(), adam()


def init_gan_state(gan_cfg, key, image_shape: Sequence[int]) -> dict:
  """{"gen", "disc", "step", "rng"}: both networks as trainable parts of one pure state.

  image_shape: one example's (*S, 1) shape.
  """
  gen, disc = make_generator(gan_cfg.model), make_discriminator(gan_cfg.model)
  g_tx, d_tx = make_optimizers(gan_cfg.train)
  kg, kd, kr = jax.random.split(key, 3)
  shape = (1,) + tuple(int(s) for s in image_shape)
  g_params, d_params = _init_params(gen, disc, shape, kg, kd)
  return parts.init_state({"gen": parts.make_part(g_params, g_tx), "disc": parts.make_part(d_params, d_tx)}, kr)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _init_params(gen, disc, shape, kg, kd):
  # Compiled once per (architecture, shape): a study or a test initialising the GAN again reuses it.
  x = jnp.zeros(shape, jnp.float32)
  return gen.init(kg, x, jnp.ones((1,)))["params"], disc.init(kd, x)["params"]


def lsgan(pred, target: float):
  """Least-squares GAN loss mean((pred - target)^2)."""
  return jnp.mean(jnp.square(pred.astype(jnp.float32) - target))


def shortest_path_loss(decode_features: Callable, z, d_center, delta, min_gap: float = 0.1):
  """L_path = mean over decoder layers l of mean(J_l^2), J_l the finite difference of h_l in d.

  decode_features(z, d) -> list of feature arrays (B, ...); d_center, delta (B,). Zero for a decoder whose
  features do not depend on d; positive otherwise.
  """
  d1 = jnp.clip(d_center + delta, 0.0, 1.0)
  d2 = jnp.clip(d_center - delta, 0.0, 1.0)
  gap = jnp.maximum(d1 - d2, min_gap)
  f1, f2 = decode_features(z, d1), decode_features(z, d2)
  terms = []
  for a, b in zip(f1, f2):
    g = gap.reshape((-1,) + (1,) * (a.ndim - 1))
    terms.append(jnp.mean(jnp.square((a - b) / g)))
  return jnp.mean(jnp.stack(terms))


def split_batch(batch, source: int, target: int, scale: float):
  """(x_A, y_A, x_B) in [-1, 1] from a zipped two-stream batch {"a": ..., "b": ...} of (B, *S, C) images.

  x_A: source contrast of stream a; y_A: its co-registered target contrast (the supervised term only);
  x_B: target contrast of stream b (drawn independently: the adversarial and identity terms are unpaired).
  """
  a, b = batch["a"]["image"], batch["b"]["image"]
  pick = lambda im, c: to_gan_range(im[..., c:c + 1], scale)
  return pick(a, source), pick(a, target), pick(b, target)


def gan_step_fn(gan_cfg, source: int, target: int):
  """The GAN's `step(state, batch) -> (state, metrics)` (pure; `fit` jits and guards it).

  batch: {"a": {"image": (B, *S, C)}, "b": {"image": (B, *S, C)}} with channels `source`/`target` of each.
  """
  gen, disc = make_generator(gan_cfg.model), make_discriminator(gan_cfg.model)
  g_tx, d_tx = make_optimizers(gan_cfg.train)
  w = {k: float(v) for k, v in gan_cfg.loss.items()}
  scale = float(gan_cfg.intensity_scale)

  def step(state, batch):
    x_a, y_a, x_b = split_batch(batch, source, target, scale)
    n = x_a.shape[0]
    key = jax.random.fold_in(state["rng"], state["step"])
    k_na, k_nb, k_dc, k_delta = jax.random.split(key, 4)
    d_center = jax.random.uniform(k_dc, (n,))
    delta = jax.random.uniform(k_delta, (n,), minval=w["delta_min"], maxval=w["delta_max"])
    ones, zeros = jnp.ones((n,)), jnp.zeros((n,))

    def forward(g):
      mu_a = gen.apply({"params": g}, x_a, method=Generator.encode)
      mu_b = gen.apply({"params": g}, x_b, method=Generator.encode)
      z_a = mu_a + jax.random.normal(k_na, mu_a.shape)
      z_b = mu_b + jax.random.normal(k_nb, mu_b.shape)
      fake_b = gen.apply({"params": g}, z_a, ones, method=Generator.decode)[0]
      return mu_a, mu_b, z_a, z_b, fake_b

    def d_loss(d, fake_b):
      return 0.5 * (lsgan(disc.apply({"params": d}, x_b), 1.0) + lsgan(disc.apply({"params": d}, fake_b), 0.0))

    fake_b = jax.lax.stop_gradient(forward(state["gen"]["params"])[4])
    dl, d_grads = jax.value_and_grad(d_loss)(state["disc"]["params"], fake_b)
    disc_part = parts.apply_gradients(state["disc"], d_grads, d_tx)

    def g_loss(g):
      mu_a, mu_b, z_a, z_b, fake = forward(g)
      decode = lambda z, d: gen.apply({"params": g}, z, d, method=Generator.decode)
      terms = {
          "adv": lsgan(disc.apply({"params": disc_part["params"]}, fake), 1.0),
          "rec": jnp.mean(jnp.abs(decode(z_a, zeros)[0] - x_a)),
          "idt": jnp.mean(jnp.abs(decode(z_b, ones)[0] - x_b)),
          "latent": 0.5 * (jnp.mean(jnp.square(mu_a)) + jnp.mean(jnp.square(mu_b))),
          "path": shortest_path_loss(lambda z, d: decode(z, d)[1], z_a, d_center, delta, w["min_gap"]),
          "supervised": jnp.mean(jnp.abs(fake - y_a)),
      }
      total = sum(w[k] * v for k, v in terms.items() if w[k])
      return total, terms

    (gl, terms), g_grads = jax.value_and_grad(g_loss, has_aux=True)(state["gen"]["params"])
    gen_part = parts.apply_gradients(state["gen"], g_grads, g_tx)
    metrics = {"d_loss": dl, "g_loss": gl, **{f"g_{k}": v for k, v in terms.items()}}
    return {**state, "gen": gen_part, "disc": disc_part, "step": state["step"] + 1}, metrics

  return step


def cached_step_fn(gan_cfg, source: int, target: int):
  """`gan_step_fn`, one object per (what the step computes, channels): `fit`'s jit cache is keyed by the step,
  so runs that differ only in steps, logging or seed compile the step once."""
  used = {"model": gan_cfg.model.to_dict(), "loss": gan_cfg.loss.to_dict(),
          "intensity_scale": float(gan_cfg.intensity_scale),
          "train": {k: float(gan_cfg.train[k]) for k in ("lr", "b1", "b2")}}
  return _cached_step(json.dumps(used, sort_keys=True), int(source), int(target))


@functools.lru_cache(maxsize=8)
def _cached_step(used_json: str, source: int, target: int):
  return gan_step_fn(ml_collections.ConfigDict(json.loads(used_json)), source, target)


def channels(gan_cfg, modalities: Sequence[str]) -> tuple[int, int]:
  """Indices of config gan.source and gan.target in the data's modalities; a clear error when absent."""
  modalities = tuple(modalities)
  out = []
  for key in ("source", "target"):
    name = str(gan_cfg[key])
    if name not in modalities:
      raise ValueError(f"config gan.{key}={name!r} is not among config data.modalities={modalities}")
    out.append(modalities.index(name))
  if out[0] == out[1]:
    raise ValueError(f"config gan.source and gan.target are both {gan_cfg.source!r}")
  return out[0], out[1]


def gan_data_config(data_cfg, gan_cfg) -> ml_collections.ConfigDict:
  """The data config the GAN trains on: whole 2D slices, its own batch, flips only (no intensity jitter)."""
  d = copy.deepcopy(data_cfg)
  d.mode = "2d"
  d.batch_size = int(gan_cfg.train.batch_size)
  d.tumour_fraction = float(gan_cfg.train.tumour_fraction)
  d.augment = dict(flip=True, scale=0.0, shift=0.0)
  return d


def fit_config(data_cfg, gan_cfg) -> ml_collections.ConfigDict:
  """The config `fit` sees for the GAN (its config.json): {"train": gan.train, "gan": gan, "data": ...}."""
  return ml_collections.ConfigDict({"train": copy.deepcopy(gan_cfg.train).to_dict(),
                                    "gan": copy.deepcopy(gan_cfg).to_dict(),
                                    "data": gan_data_config(data_cfg, gan_cfg).to_dict()})


def train_gan(gan_cfg, data_cfg, workdir: str, cases) -> dict:
  """Trains the GAN on `cases` (2D slices, unpaired streams) with `train.fit` in `workdir`; returns gen params.

  Resumable: re-running on the same workdir resumes from its checkpoints or returns the finished params.
  """
  from mri_poison.data.pipeline import train_dataset, zip_datasets
  source, target = channels(gan_cfg, data_cfg.modalities)
  config = fit_config(data_cfg, gan_cfg)
  d = config.data
  seed = int(gan_cfg.train.seed)
  shape = tuple(int(s) for s in d.patch_shape) + (1,)
  state = init_gan_state(gan_cfg, jax.random.PRNGKey(seed), shape)
  step = cached_step_fn(gan_cfg, source, target)

  def data():
    # Two independent streams of the same cases: stream a feeds the source side, stream b the target side.
    return iter(zip_datasets({"a": train_dataset(cases, d, seed=seed), "b": train_dataset(cases, d, seed=seed + 1)}))

  final = trainer.fit(config, workdir, init_state=state, step_fn=step, data=data)
  return jax.device_get(final["gen"]["params"])


# ------------------------------------------------------------------------------------------------ synthesis


@functools.partial(jax.jit, static_argnums=(0, 3))
def _translate_chunks(gen: Generator, params, chunks, scale: float):
  def one(x):
    mu = gen.apply({"params": params}, to_gan_range(x, scale), method=Generator.encode)
    y = gen.apply({"params": params}, mu, jnp.ones((x.shape[0],)), method=Generator.decode)[0]
    return from_gan_range(y, scale)
  return jax.lax.map(one, chunks)


def translate_slices(gan_cfg, gen_params, slices: np.ndarray, chunk: int = 128) -> np.ndarray:
  """Generator output at d = 1 (no latent noise), in z-score units: slices (N, *S, 1) -> (N, *S, 1)."""
  slices = np.asarray(slices, np.float32)
  n = slices.shape[0]
  chunk = max(1, min(int(chunk), n))
  pad = (-n) % chunk
  padded = np.concatenate([slices, np.zeros((pad,) + slices.shape[1:], np.float32)]) if pad else slices
  out = _translate_chunks(make_generator(gan_cfg.model), gen_params,
                          padded.reshape((-1, chunk) + slices.shape[1:]), float(gan_cfg.intensity_scale))
  return np.asarray(out).reshape(padded.shape)[:n]


def rezscore(volume: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """`volume` z-scored inside `mask` (zero outside): the data contract for a synthetic contrast."""
  out = np.zeros_like(volume, np.float32)
  v = volume[mask]
  if v.size:
    out[mask] = (v - v.mean()) / max(float(v.std()), 1e-6)
  return out


def synthesize_volumes(gan_cfg, gen_params, cases, source: int) -> list[np.ndarray]:
  """Synthetic target contrast (X, Y, Z) per case, slice by slice along the last axis, in one compiled call.

  The output is masked to the case's head (any channel nonzero) and z-scored inside it.
  """
  if not cases:
    return []
  vols = np.stack([c.image[..., source] for c in cases]).astype(np.float32)  # (N, X, Y, Z)
  n, x, y, z = vols.shape
  slices = np.moveaxis(vols, 3, 1).reshape(n * z, x, y, 1)
  out = np.moveaxis(translate_slices(gan_cfg, gen_params, slices).reshape(n, z, x, y), 1, 3)
  return [rezscore(out[i], (c.image != 0).any(-1)) for i, c in enumerate(cases)]
