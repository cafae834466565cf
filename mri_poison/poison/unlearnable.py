"""Unlearnable examples for segmentation: error-minimising noise (min-min) and UMed, trained with `train.fit`.

Records. Both methods protect 2D axial slices: a training split of volumes is turned into ONE on-device slice
set (`slice_set`): every axial slice that holds brain, with its label, masks and its case's intensity range.
The slice set is a `fit` step argument (replicated, never re-read from the host); each step draws its batch of
record indices from the step key, so the per-record min-min noise is a state tensor (N, X, Y, C) gathered and
scattered with those indices, fully on device. `to_volumes` pastes protected slices back into the cases.

Budgets. eps is given on intensities scaled to [0, 1]: our data is z-scored, so each case c is scaled by its own
per-channel range r_c = max - min over the volume (x01 = (x - min_c) / r_c), and a budget eps is
eps * r_c in z-score units. Protected images are clipped to [min_c, max_c] (UMed's clip to [0, 1]).
`scaled_psnr` is the PSNR on those [0, 1]-scaled intensities: 10 log10(1 / MSE), the MSE over every voxel
and channel of the case ((x_p - x) / r_c)^2 (whole volume, background included, as image PSNR is usually
reported).

Min-min (Huang et al., ICLR 2021), one `fit` state {"surrogate": part, "noise": {"delta", "ema", "done",
"stopped_at"}}. Each step: inner `attacks.optimize` (sign steps of alpha * eps, projection onto the eps-ball,
`inner_steps` steps) on the batch's noise minimising the surrogate's CE + Dice, then one surrogate step on the
protected batch. Stopping criterion: once an exponential moving average (0.9) of the surrogate's voxel
cross-entropy on protected batches is <= `stop_loss`, the surrogate has fitted the protected data and every
later step is a no-op (`noise.stopped_at` records when). The criterion uses the CE alone: the soft Dice part
has a floor near 1 on slices without tumour (a class absent from a slice scores Dice ~0 unless the predicted
probability mass stays below `smooth`), so CE + Dice never falls to a small threshold even for a perfect fit.
"sample" noise is one tensor per record, on the brain; "region" noise is one tensor per label class
(K, X, Y, C), applied where the label has that class.
Noise is stored in scaled units (|u| <= eps) and applied as u * r_c.

Class-wise random noise (`classwise_noise`): the region-wise layout with a FIXED random sign pattern per class
(K, X, Y, C), no surrogate: the simplest label-correlated shortcut (in classification, class-wise random noise
alone makes data unlearnable, Huang et al.), so it is the sanity baseline of the mechanism on this data.

UMed (arXiv 2403.14250 as re-implemented by a third party; methods.md study 4), one `fit` state
{"contour": G_c, "texture": G_t, "surrogate": S}: x_p = clip(x + delta_c + delta_t) with
delta_c = eps tanh(G_c(x)) C and delta_t = clip(eps tanh(G_t(x)), +-eps LBP(x)) I (models.perturbators);
both generators minimise the surrogate's CE + Dice on x_p every step, the surrogate minimises the same loss on
x_p (generators frozen) every k-th step (`lax.cond`), after `surrogate_warmup` surrogate-only steps on clean
batches. C, I and LBP come from the clean slice and its label.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mri_poison import losses
from mri_poison.attacks.optimize import optimize, sign_step
from mri_poison.models.perturbators import PerturbatorUNet, contour_delta, texture_delta
from mri_poison.ops import morphology, texture
from mri_poison.train import parts as parts_lib

METHODS = ("none", "random", "classwise", "minmin", "umed")
NOISE_MODES = ("sample", "region")


def default_config() -> ml_collections.ConfigDict:
  """The protection settings ([ref]: third-party UMed re-implementation; [ours]: chosen here)."""
  return ml_collections.ConfigDict(dict(
      eps=4 / 255,  # L-inf budget on [0, 1]-scaled intensities [ref]; z-units: eps * (max - min) per case/channel
      batch=16,  # slices per protection step [ours]
      seed=0,
      minmin=dict(
          mode="sample",  # "sample": one noise per slice record; "region": one per label class [paper baseline]
          inner_steps=10,  # inner sign steps on delta per outer step [Huang et al.]
          step_frac=0.125,  # inner step size = step_frac * eps (eps / 8) [Huang et al.]
          steps=200,  # most outer steps [ours]
          lr=1e-3,  # surrogate Adam learning rate [ours]
          stop_loss=0.05,  # stop when the EMA of the surrogate's voxel CE on protected batches <= this [ours]
      ),
      umed=dict(
          steps=300,  # generator steps [ours]
          lr=1e-4,  # Adam lr of both perturbators [ref]
          surrogate_lr=1e-3,  # Adam lr of the surrogate [ours]
          k=5,  # the surrogate is updated every k-th step [ref]
          width=3,  # contour band: dilate - erode with a width x width box [ref: w = 3]
          theta=0.5,  # CDC theta [ref]
          features=(8, 16),  # perturbator U-Net widths [ours]
          surrogate_warmup=0,  # surrogate-only steps on clean data before the bi-level loop (in `steps`) [ours]
      ),
  ))


# ------------------------------------------------------------------------------------------------ records


def slice_set(cases, *, width: int = 3) -> dict[str, np.ndarray]:
  """Every axial slice with brain of `cases` as one record set (numpy; see the module doc).

  image (N, X, Y, C) f32, label (N, X, Y) i32, brain / band / interior (N, X, Y) bool (band and interior of the
  whole tumour, label > 0, in 2D with `width`), lbp (N, X, Y, C) f32, range / lo / hi (N, C) f32 (the case's
  per-channel max - min, min, max), case (N,) and z (N,) int32 (where the slice came from).
  """
  out = {k: [] for k in ("image", "label", "range", "lo", "hi", "case", "z")}
  for i, c in enumerate(cases):
    if c.label is None:
      raise ValueError(f"slice_set: case {c.case_id} has no label (protection needs the segmentation)")
    image = np.asarray(c.image, np.float32)
    lo, hi = image.min(axis=(0, 1, 2)), image.max(axis=(0, 1, 2))
    rng = np.where(hi > lo, hi - lo, 1.0).astype(np.float32)
    zs = np.flatnonzero((image != 0).any(axis=(0, 1, 3)))
    for z in zs:
      out["image"].append(image[:, :, z])
      out["label"].append(np.asarray(c.label[:, :, z], np.int32))
      out["range"].append(rng)
      out["lo"].append(lo)
      out["hi"].append(hi)
      out["case"].append(i)
      out["z"].append(z)
  if not out["image"]:
    raise ValueError("slice_set: no slice with brain voxels in the given cases")
  data = {k: np.stack(v).astype(np.int32 if k in ("label", "case", "z") else np.float32) for k, v in out.items()}
  data["brain"] = (data["image"] != 0).any(axis=-1)
  tumour = jnp.asarray(data["label"] > 0)
  data["band"] = np.asarray(morphology.contour_band(tumour, width, 2))
  data["interior"] = np.asarray(morphology.interior(tumour, width, 2))
  data["lbp"] = np.asarray(texture.lbp(data["image"], 2))
  return data


def to_volumes(cases, data: dict, images) -> list:
  """`cases` with their slices replaced by the protected slice images (N, X, Y, C) (other slices unchanged)."""
  images = np.asarray(images, np.float32)
  volumes = [np.array(c.image, np.float32, copy=True) for c in cases]
  for img, i, z in zip(images, data["case"], data["z"]):
    volumes[int(i)][:, :, int(z)] = img
  return [c.replace(image=v) for c, v in zip(cases, volumes)]


def _budget(data, index, eps):
  """(B, 1, 1, C) budget in z-units for the records `index`."""
  return (eps * data["range"][index])[:, None, None, :]


def _gather(data, index):
  return {k: v[index] for k, v in data.items()}


def _sample_index(key, n: int, batch: int):
  return jax.random.choice(key, n, (batch,), replace=n < batch)


# ------------------------------------------------------------------------------------------------ random noise


def random_noise(key, data: dict, eps: float):
  """Random sign noise of the same L-inf budget on the brain: eps * r_c * (+-1) per voxel and channel (z-units)."""
  image = jnp.asarray(data["image"])
  signs = jax.random.rademacher(key, image.shape, jnp.float32)
  delta = signs * (eps * jnp.asarray(data["range"]))[:, None, None, :] * jnp.asarray(data["brain"])[..., None]
  return jnp.clip(image + delta, jnp.asarray(data["lo"])[:, None, None], jnp.asarray(data["hi"])[:, None, None])


def classwise_noise(key, data: dict, eps: float, n_classes: int = 4):
  """Protected images with one fixed random sign pattern per label class: x + eps r_c u_{label} on the brain."""
  shape = (int(n_classes),) + tuple(np.shape(data["image"])[1:])
  u = eps * jax.random.rademacher(key, shape, jnp.float32)
  index = jnp.arange(np.shape(data["image"])[0])
  return _apply_minmin(u, jnp.asarray(data["image"]), jnp.asarray(data["label"]), jnp.asarray(data["range"]),
                       jnp.asarray(data["brain"]), jnp.asarray(data["lo"]), jnp.asarray(data["hi"]), index, "region")


# ------------------------------------------------------------------------------------------------ min-min


def minmin_init(apply_init, key, data: dict, tx, mode: str = "sample", n_classes: int = 4) -> dict:
  """The min-min `fit` state: surrogate part (params from `apply_init(key)`), zero noise, EMA/stop flags."""
  if mode not in NOISE_MODES:
    raise ValueError(f"config protect.minmin.mode={mode!r}: expected one of {NOISE_MODES}")
  init_key, rng = jax.random.split(key)
  shape = np.shape(data["image"])
  delta_shape = shape if mode == "sample" else (int(n_classes),) + tuple(shape[1:])
  noise = {"delta": jnp.zeros(delta_shape, jnp.float32), "ema": jnp.asarray(10.0, jnp.float32),
           "done": jnp.asarray(False), "stopped_at": jnp.asarray(-1, jnp.int32)}
  return parts_lib.init_state({"surrogate": parts_lib.make_part(apply_init(init_key), tx), "noise": noise}, rng)


def _applied_noise(delta, index, label, rng, brain, mode):
  """Noise in z-units for a batch: u * r_c on the brain (sample) or sum_k [label == k] u_k * r_c (region)."""
  if mode == "sample":
    u = delta
  else:
    onehot = jax.nn.one_hot(label, delta.shape[0], dtype=jnp.float32)  # (B, X, Y, K)
    u = jnp.einsum("bxyk,kxyc->bxyc", onehot, delta)
  return u * rng[:, None, None, :] * brain[..., None]


@functools.lru_cache(maxsize=8)
def minmin_step_fn(apply_fn, tx, *, batch: int, eps: float, inner_steps: int, step_frac: float,
                   stop_loss: float, mode: str = "sample"):
  """`step(state, batch_unused, data) -> (state, metrics)` for `fit` (data: `slice_set` arrays as a step arg)."""

  def loss_of(params, x, y):
    return losses.ce_dice(apply_fn(params, x, train=True), y)

  def active(state, data):
    n = data["image"].shape[0]
    key = jax.random.fold_in(state["rng"], state["step"])
    index = _sample_index(key, n, batch)
    b = _gather(data, index)
    params = state["surrogate"]["params"]
    delta = state["noise"]["delta"]
    lo, hi = b["lo"][:, None, None, :], b["hi"][:, None, None, :]

    def protect(u):
      return jnp.clip(b["image"] + _applied_noise(u, index, b["label"], b["range"], b["brain"], mode), lo, hi)

    def objective(u, _):
      per_example = loss_of(params, protect(u), b["label"])
      return per_example if mode == "sample" else jnp.mean(per_example)[None]

    u0 = delta[index] if mode == "sample" else delta
    project = lambda u: jnp.clip(u, -eps, eps)
    u, hist = optimize(objective, u0, update=sign_step(step_frac * eps), steps=inner_steps, project=project)
    delta = delta.at[index].set(u) if mode == "sample" else u
    x_p = jax.lax.stop_gradient(protect(u))

    def surrogate_loss(p):
      logits = apply_fn(p, x_p, train=True)
      ce = jnp.mean(losses.cross_entropy(logits, b["label"]))
      return ce + jnp.mean(losses.soft_dice(logits, b["label"])), ce

    (loss, ce), grads = jax.value_and_grad(surrogate_loss, has_aux=True)(params)
    surrogate = parts_lib.apply_gradients(state["surrogate"], grads, tx)
    ema = 0.9 * state["noise"]["ema"] + 0.1 * ce
    done = ema <= stop_loss
    noise = {"delta": delta, "ema": ema, "done": done,
             "stopped_at": jnp.where(done, state["step"] + 1, state["noise"]["stopped_at"])}
    metrics = {"loss": loss, "ce": ce, "ema": ema, "inner_gain": jnp.mean(hist["objective"][0] - hist["objective"][-1])}
    return {**state, "surrogate": surrogate, "noise": noise}, metrics

  def idle(state, data):
    del data
    ema = state["noise"]["ema"]
    return state, {"loss": ema, "ce": ema, "ema": ema, "inner_gain": jnp.zeros(())}

  def step(state, unused_batch, data):
    new, metrics = jax.lax.cond(state["noise"]["done"], idle, active, state, data)
    metrics["done"] = new["noise"]["done"].astype(jnp.float32)
    return {**new, "step": state["step"] + 1}, metrics

  return step


def minmin_protect(state, data: dict, mode: str = "sample"):
  """Protected slice images (N, X, Y, C) from a trained min-min state."""
  index = jnp.arange(np.shape(data["image"])[0])
  delta = state["noise"]["delta"]
  return _apply_minmin(delta, jnp.asarray(data["image"]), jnp.asarray(data["label"]), jnp.asarray(data["range"]),
                       jnp.asarray(data["brain"]), jnp.asarray(data["lo"]), jnp.asarray(data["hi"]), index, mode)


@functools.partial(jax.jit, static_argnames=("mode",))
def _apply_minmin(delta, image, label, rng, brain, lo, hi, index, mode):
  return jnp.clip(image + _applied_noise(delta, index, label, rng, brain, mode), lo[:, None, None], hi[:, None, None])


# ------------------------------------------------------------------------------------------------ UMed


def perturbators(umed_cfg, channels: int) -> tuple[PerturbatorUNet, PerturbatorUNet]:
  """(G_c with a CDC encoder, G_t with a plain encoder) from config protect.umed."""
  feats = tuple(int(f) for f in umed_cfg.features)
  g_c = PerturbatorUNet(features=feats, out_channels=channels, cdc=True, theta=float(umed_cfg.theta))
  g_t = PerturbatorUNet(features=feats, out_channels=channels, cdc=False)
  return g_c, g_t


def umed_delta(g_c, g_t, contour_params, texture_params, b: dict, eps: float):
  """delta_c + delta_t (z-units) for a batch dict of slice records (image, band, interior, lbp, range)."""
  e = eps * b["range"][:, None, None, :]
  d_c = contour_delta(g_c.apply({"params": contour_params}, b["image"]), b["band"], e)
  d_t = texture_delta(g_t.apply({"params": texture_params}, b["image"]), b["lbp"], b["interior"], e)
  return d_c + d_t


def umed_protect_batch(g_c, g_t, contour_params, texture_params, b: dict, eps: float):
  """x_p = clip(x + delta_c + delta_t, min_c, max_c) for a batch of slice records."""
  delta = umed_delta(g_c, g_t, contour_params, texture_params, b, eps)
  return jnp.clip(b["image"] + delta, b["lo"][:, None, None, :], b["hi"][:, None, None, :])


def umed_init(g_c, g_t, surrogate_init, key, data: dict, txs: dict) -> dict:
  """The UMed `fit` state {"contour", "texture", "surrogate"}; txs: {name: optax transformation}."""
  kc, kt, ks, rng = jax.random.split(key, 4)
  x = jnp.zeros((1,) + tuple(np.shape(data["image"])[1:]), jnp.float32)
  params = {"contour": g_c.init(kc, x)["params"], "texture": g_t.init(kt, x)["params"],
            "surrogate": surrogate_init(ks)}
  return parts_lib.init_state({k: parts_lib.make_part(p, txs[k]) for k, p in params.items()}, rng)


@functools.lru_cache(maxsize=8)
def umed_step_fn(g_c, g_t, apply_fn, txs: tuple, *, batch: int, eps: float, k: int, warmup: int = 0):
  """The bi-level UMed step for `fit`; txs = (contour_tx, texture_tx, surrogate_tx).

  The first `warmup` steps train only the surrogate, on clean batches (generators untouched): with k = 5 a
  surrogate trained from scratch inside the bi-level loop gets a fifth of the steps and may never fit the data,
  and then the generators minimise the loss of a barely trained model.
  """
  tx_c, tx_t, tx_s = txs

  def loss_of(params, x, y):
    return jnp.mean(losses.ce_dice(apply_fn(params, x, train=True), y))

  def step(state, unused_batch, data):
    return jax.lax.cond(state["step"] < warmup, warm_step, bilevel_step, state, data)

  def warm_step(state, data):
    key = jax.random.fold_in(state["rng"], state["step"])
    b = _gather(data, _sample_index(key, data["image"].shape[0], batch))
    loss, grads = jax.value_and_grad(loss_of)(state["surrogate"]["params"], b["image"], b["label"])
    surrogate = parts_lib.apply_gradients(state["surrogate"], grads, tx_s)
    return {**state, "surrogate": surrogate, "step": state["step"] + 1}, {"loss": loss, "linf_scaled": jnp.zeros(())}

  def bilevel_step(state, data):
    key = jax.random.fold_in(state["rng"], state["step"])
    b = _gather(data, _sample_index(key, data["image"].shape[0], batch))
    s_params = state["surrogate"]["params"]

    def gen_loss(gp):
      x_p = umed_protect_batch(g_c, g_t, gp["contour"], gp["texture"], b, eps)
      return loss_of(s_params, x_p, b["label"])

    gp = {"contour": state["contour"]["params"], "texture": state["texture"]["params"]}
    g_loss, g_grads = jax.value_and_grad(gen_loss)(gp)
    contour = parts_lib.apply_gradients(state["contour"], g_grads["contour"], tx_c)
    texture_part = parts_lib.apply_gradients(state["texture"], g_grads["texture"], tx_t)
    x_p = jax.lax.stop_gradient(umed_protect_batch(g_c, g_t, contour["params"], texture_part["params"], b, eps))

    def update_surrogate(part):
      loss, grads = jax.value_and_grad(loss_of)(part["params"], x_p, b["label"])
      return parts_lib.apply_gradients(part, grads, tx_s), loss

    def keep(part):
      return part, g_loss

    # The surrogate's loss on x_p before its update (every step: the generators' objective).
    surrogate, _ = jax.lax.cond(state["step"] % k == 0, update_surrogate, keep, state["surrogate"])
    delta = x_p - b["image"]
    metrics = {"loss": g_loss, "linf_scaled": jnp.max(jnp.abs(delta) / b["range"][:, None, None, :])}
    return {**state, "contour": contour, "texture": texture_part, "surrogate": surrogate,
            "step": state["step"] + 1}, metrics

  return step


def umed_protect(g_c, g_t, state, data: dict, eps: float, chunk: int = 64):
  """Protected slice images (N, X, Y, C) from a trained UMed state, `chunk` slices at a time."""
  fn = _umed_apply(g_c, g_t, float(eps))
  n = np.shape(data["image"])[0]
  keys = ("image", "band", "interior", "lbp", "range", "lo", "hi")
  outs = []
  for s in range(0, n, chunk):
    b = {k: jnp.asarray(data[k][s:s + chunk]) for k in keys}
    outs.append(np.asarray(fn(state["contour"]["params"], state["texture"]["params"], b)))
  return np.concatenate(outs)


@functools.lru_cache(maxsize=8)
def _umed_apply(g_c, g_t, eps):
  return jax.jit(lambda pc, pt, b: umed_protect_batch(g_c, g_t, pc, pt, b, eps))


# ------------------------------------------------------------------------------------------------ measures


def scaled_psnr(clean, protected, value_range) -> float:
  """PSNR (dB) on [0, 1]-scaled intensities: -10 log10(mean(((x_p - x) / r_c)^2)); inf when identical.

  clean, protected: (..., C); value_range: (C,) per-channel max - min of the clean case (see the module doc).
  """
  clean, protected = np.asarray(clean, np.float64), np.asarray(protected, np.float64)
  r = np.asarray(value_range, np.float64)
  mse = float(np.mean(((protected - clean) / r) ** 2))
  return float("inf") if mse == 0 else float(-10.0 * np.log10(mse))


def surrogate_ce(apply_fn, params, images, labels, chunk: int = 64) -> float:
  """Mean voxel cross-entropy of a segmenter on slices (N, X, Y, C): has it fitted these (protected) images?"""
  fn = _ce_fn(apply_fn)
  n = np.shape(images)[0]
  total = sum(float(fn(params, jnp.asarray(images[s:s + chunk]), jnp.asarray(labels[s:s + chunk])))
              for s in range(0, n, chunk))
  return total / n


@functools.lru_cache(maxsize=8)
def _ce_fn(apply_fn):
  return jax.jit(lambda p, x, y: jnp.sum(losses.cross_entropy(apply_fn(p, x), y)))


def case_range(image) -> np.ndarray:
  """(C,) per-channel max - min of a case's image (1 for a constant channel)."""
  image = np.asarray(image, np.float32)
  spatial = tuple(range(image.ndim - 1))
  r = image.max(axis=spatial) - image.min(axis=spatial)
  return np.where(r > 0, r, 1.0).astype(np.float32)


def share_inside(delta, region) -> float:
  """Share of the perturbation's L1 mass sum |delta| inside `region` (bool, delta's spatial shape); 0 if none."""
  a = np.abs(np.asarray(delta, np.float64)).sum(axis=-1)
  total = a.sum()
  return float(a[np.asarray(region, bool)].sum() / total) if total > 0 else 0.0

