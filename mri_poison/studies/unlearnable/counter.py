"""Study 4: what an unauthorised trainer would do with protected data (the counter-measures).

  standard     plain training (the data config's augmentation as set, off by default in this study).
  adversarial  adversarial training (`defenses.adversarial`), budget in z-units = counter.adversarial.eps_scaled
               x the median case range of the training split (the protection budget is eps x each case's range).
  augment      strong augmentation: flips, per-channel intensity gain/offset (the pipeline's augment fields) and a
               Gaussian blur of random sigma in [0, blur_sigma] with probability blur_prob (a jitted batch_transform).
  purify       the protected training images pass through a simple purification before training: slice-wise
               Gaussian smoothing ("gaussian", sigma) or JPEG-like quantisation of each slice to `levels` grey
               levels over the case's range ("quantize"); background stays 0.
  transfer     plain training of a victim whose architecture differs from the surrogate's (config.model with
               counter.transfer's fields: other widths, norm and activation): does the protection transfer?
"""
from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from mri_poison.defenses import adversarial as adv_lib

REGIMES = ("standard", "adversarial", "augment", "purify", "transfer")
PURIFIERS = ("gaussian", "quantize")


def gaussian_kernel(sigma, radius: int):
  """(2 radius + 1,) normalised 1D Gaussian; sigma ~ 0 gives the identity kernel (traceable in sigma)."""
  t = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  s = jnp.maximum(jnp.asarray(sigma, jnp.float32), 1e-3)
  k = jnp.exp(-0.5 * jnp.square(t / s))
  return k / jnp.sum(k)


def blur_2d(x, sigma, radius: int = 3):
  """Separable Gaussian blur of (B, X, Y, C) slices with one sigma per example (B,); zero padding."""
  def one(img, s):
    k = gaussian_kernel(s, radius)
    conv = lambda v: jnp.convolve(v, k, mode="same")
    img = jax.vmap(jax.vmap(conv, in_axes=1, out_axes=1), in_axes=2, out_axes=2)(img)  # along X
    return jax.vmap(jax.vmap(conv, in_axes=0, out_axes=0), in_axes=2, out_axes=2)(img)  # along Y
  return jax.vmap(one)(x, sigma)


def blur_transform(blur_sigma: float, blur_prob: float):
  """`batch_transform(params, batch, key)`: blur each example with prob blur_prob at sigma ~ U(0, blur_sigma)."""
  def transform(params, batch, key):
    del params
    image = batch["image"]
    k1, k2 = jax.random.split(key)
    b = image.shape[0]
    sigma = jax.random.uniform(k1, (b,), minval=0.0, maxval=blur_sigma)
    apply = jax.random.uniform(k2, (b,)) < blur_prob
    brain = jnp.any(image != 0, axis=-1, keepdims=True)
    blurred = blur_2d(image, sigma) * brain  # background stays exactly 0 (the data contract)
    return dict(batch, image=jnp.where(apply[:, None, None, None], blurred, image))
  return transform


def purify_case(case, cfg):
  """The case with every axial slice purified (config counter.purify); background stays 0."""
  kind = str(cfg.kind)
  image = np.asarray(case.image, np.float32)
  brain = (image != 0).any(axis=-1, keepdims=True)
  if kind == "gaussian":
    s = float(cfg.sigma)
    out = ndimage.gaussian_filter(image, sigma=(s, s, 0, 0), mode="nearest")
  elif kind == "quantize":
    levels = int(cfg.levels)
    if levels < 2:
      raise ValueError(f"config counter.purify.levels={levels}: expected >= 2")
    lo, hi = image.min(axis=(0, 1, 2)), image.max(axis=(0, 1, 2))
    step = np.where(hi > lo, (hi - lo) / (levels - 1), 1.0)
    out = np.round((image - lo) / step) * step + lo
  else:
    raise ValueError(f"config counter.purify.kind={kind!r}: expected one of {PURIFIERS}")
  return case.replace(image=(out * brain).astype(np.float32))


def regime_setup(regime: str, config, apply_fn, adv_eps_z: float):
  """(data config updates, batch_transform or None, extra config recorded with the victim) of a regime; a
  "model" entry of the extra config replaces the victim's architecture."""
  c = config.counter
  if regime == "standard" or regime == "purify":
    return {}, None, {}
  if regime == "adversarial":
    adv = copy.deepcopy(c.adversarial)
    cfg = {k: v for k, v in adv.items() if k != "eps_scaled"}
    cfg["eps"] = float(adv_eps_z)
    return {}, adv_lib.adversarial_batch_transform(apply_fn, cfg), {"adversarial": cfg}
  if regime == "augment":
    a = c.augment
    aug = dict(flip=bool(a.flip), scale=float(a.scale), shift=float(a.shift))
    return {"augment": aug}, blur_transform(float(a.blur_sigma), float(a.blur_prob)), {"augment": a.to_dict()}
  if regime == "transfer":
    unknown = sorted(set(c.transfer) - set(config.model))
    if unknown:
      raise ValueError(f"config counter.transfer: {unknown} are not fields of config.model")
    return {}, None, {"model": dict(config.model.to_dict(), **c.transfer.to_dict())}
  raise ValueError(f"config counter.regimes: unknown regime {regime!r}; expected one of {REGIMES}")
