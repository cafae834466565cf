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

Min-min (Huang et al., ICLR 2021), one `fit` state {"surrogate": part, "noise": {"delta", "done", "stopped_at"}}.
One `fit` step is one round of their schedule: `train_steps` surrogate steps on random protected batches, then
a noise pass over EVERY record (in order, `batch` records at a time, `pgd_steps` sign steps of step_frac * eps
each, projected onto the eps-ball) minimising the surrogate's CE + Dice, then the stop test: the surrogate's
class-balanced per-voxel accuracy on the protected brain voxels (mean recall over the label classes present,
the analogue of their training accuracy, which background would otherwise dominate) >= `stop_accuracy`; later
rounds are no-ops (`noise.stopped_at` records the round). Each round also logs the hallmark of error-minimising
noise, the surrogate's voxel CE on the protected records over its CE on the clean ones (`hallmark`): it falls
far below 1 only when the noise, not the tumour, is what the surrogate has learnt.
"sample" noise is one tensor per record, on the brain; "region" noise is one tensor per label class
(K, X, Y, C), applied where the label has that class.
Noise is stored in scaled units (|u| <= eps) and applied as u * r_c.

Class-wise random noise (`classwise_noise`): the region-wise layout with a FIXED random sign pattern per class
(K, X, Y, C), no surrogate (in classification, class-wise random noise alone makes data unlearnable, Huang et
al.). A convolution can decode such a pattern only by knowing the absolute position, so it understates what a
shortcut can do. The class pattern (`classpattern_noise`) is the positive control: per class one small sign
tile (`tile` x `tile` x C) repeated over the slice, the same at every position, applied where the label has
that class; a 3x3 convolution reads it anywhere.

UMed (arXiv 2403.14250 as re-implemented by a third party; methods.md study 4), one `fit` state
{"contour": G_c, "texture": G_t, "surrogate": S}: x_p = clip(x + delta_c + delta_t) with
delta_c = eps tanh(G_c(x)) C and delta_t = clip(eps tanh(G_t(x)), +-eps LBP(x)) I (models.perturbators);
the surrogate (trained from scratch by default) minimises CE + Dice on x_p every k-th step with the generators
frozen, and both generators minimise the frozen surrogate's CE + Dice on x_p on the other steps (`lax.cond`),
after `surrogate_warmup` (default 0) surrogate-only steps on clean batches. The batch hallmark (surrogate CE on
x_p over CE on x) is logged every step. C, I and LBP come from the clean slice and its label.
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

NOISE_MODES = ("sample", "region")


def default_config() -> ml_collections.ConfigDict:
  """The protection settings ([ref]: third-party UMed re-implementation; [ours]: chosen here)."""
  return ml_collections.ConfigDict(dict(
      eps=4 / 255,  # L-inf budget on [0, 1]-scaled intensities [ref]; z-units: eps * (max - min) per case/channel
      batch=16,  # slices per protection step [ours]
      seed=0,
      minmin=dict(
          mode="sample",  # "sample": one noise per slice record; "region": one per label class [paper baseline]
          train_steps=10,  # surrogate steps per round [Huang et al.]
          pgd_steps=20,  # sign steps on each record's noise per round [Huang et al.]
          step_frac=0.1,  # noise step = step_frac * eps (0.8/255 at 8/255) [Huang et al.]
          steps=30,  # most rounds [ours]
          lr=1e-3,  # surrogate Adam learning rate [ours]
          stop_accuracy=0.99,  # stop once the surrogate's balanced voxel accuracy on protected data >= this
                               # [Huang et al.: training accuracy > 99 %]
      ),
      classpattern=dict(tile=2),  # side of the per-class sign tile [ours]
      hallmark_max=0.3,  # a protection whose surrogate CE ratio (protected / clean) ends above this is "not
                         # converged" and is not reported as a result [ours]
      umed=dict(
          steps=300,  # generator steps [ours]
          lr=1e-4,  # Adam lr of both perturbators [ref]
          surrogate_lr=1e-3,  # Adam lr of the surrogate [ours]
          k=5,  # the surrogate is updated every k-th step [ref]
          width=7,  # contour band: dilate - erode with a width x width box [ref port: a 7-voxel kernel]
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


def classpattern_noise(key, data: dict, eps: float, n_classes: int = 4, tile: int = 2):
  """Protected images with one position-independent sign tile per label class repeated over the slice."""
  x, y, c = np.shape(data["image"])[1:]
  tile = int(tile)
  tiles = jax.random.rademacher(key, (int(n_classes), tile, tile, c), jnp.float32)
  u = eps * jnp.tile(tiles, (1, -(-x // tile), -(-y // tile), 1))[:, :x, :y]
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
  last = {k: jnp.zeros((), jnp.float32) for k in ("accuracy", "ce_protected", "ce_clean", "hallmark")}
  noise = {"delta": jnp.zeros(delta_shape, jnp.float32), "done": jnp.asarray(False),
           "stopped_at": jnp.asarray(-1, jnp.int32), "last": last}
  return parts_lib.init_state({"surrogate": parts_lib.make_part(apply_init(init_key), tx), "noise": noise}, rng)


def _applied_noise(delta, index, label, rng, brain, mode):
  """Noise in z-units for a batch: u * r_c on the brain (sample) or sum_k [label == k] u_k * r_c (region)."""
  if mode == "sample":
    u = delta
  else:
    onehot = jax.nn.one_hot(label, delta.shape[0], dtype=jnp.float32)  # (B, X, Y, K)
    u = jnp.einsum("bxyk,kxyc->bxyc", onehot, delta)
  return u * rng[:, None, None, :] * brain[..., None]


def fit_measures(apply_fn, params, data: dict, protected, n_classes: int, batch: int):
  """(balanced voxel accuracy on `protected` brain voxels, mean voxel CE on `protected`, on the clean images),
  over every record in batches of `batch` (compiled loop; records past N wrap around and count twice)."""
  n = data["image"].shape[0]

  def body(j, acc):
    index = (j * batch + jnp.arange(batch)) % n
    y, brain = data["label"][index], data["brain"][index]
    logits_p = apply_fn(params, protected[index])
    pred = jnp.argmax(logits_p, -1)
    onehot = jax.nn.one_hot(y, n_classes, dtype=jnp.float32) * brain[..., None]
    correct = jnp.sum(onehot * (pred == y)[..., None], axis=(0, 1, 2))
    ce_p = jnp.sum(losses.cross_entropy(logits_p, y))
    ce_c = jnp.sum(losses.cross_entropy(apply_fn(params, data["image"][index]), y))
    return acc[0] + correct, acc[1] + jnp.sum(onehot, axis=(0, 1, 2)), acc[2] + ce_p, acc[3] + ce_c

  zeros = jnp.zeros((n_classes,), jnp.float32)
  correct, total, ce_p, ce_c = jax.lax.fori_loop(0, -(-n // batch), body, (zeros, zeros, 0.0, 0.0))
  present = total > 0
  balanced = jnp.sum(jnp.where(present, correct / jnp.maximum(total, 1.0), 0.0)) / jnp.maximum(jnp.sum(present), 1)
  return balanced, ce_p, ce_c


@functools.lru_cache(maxsize=8)
def minmin_step_fn(apply_fn, tx, *, batch: int, eps: float, train_steps: int, pgd_steps: int, step_frac: float,
                   stop_accuracy: float, mode: str = "sample", n_classes: int = 4):
  """One round of Huang et al.'s schedule as a `fit` step: `step(state, batch_unused, data) -> (state, metrics)`
  (data: `slice_set` arrays as a step argument)."""

  def loss_of(params, x, y):
    return losses.ce_dice(apply_fn(params, x, train=True), y)

  def protect(b, index, u):
    noise = _applied_noise(u, index, b["label"], b["range"], b["brain"], mode)
    return jnp.clip(b["image"] + noise, b["lo"][:, None, None, :], b["hi"][:, None, None, :])

  def active(state, data):
    n = data["image"].shape[0]
    key = jax.random.fold_in(state["rng"], state["step"])
    delta = state["noise"]["delta"]

    def train_body(i, part):
      index = _sample_index(jax.random.fold_in(key, i), n, batch)
      b = _gather(data, index)
      x_p = protect(b, index, delta[index] if mode == "sample" else delta)
      grads = jax.grad(lambda p: jnp.mean(loss_of(p, x_p, b["label"])))(part["params"])
      return parts_lib.apply_gradients(part, grads, tx)

    surrogate = jax.lax.fori_loop(0, int(train_steps), train_body, state["surrogate"])
    params = surrogate["params"]

    def noise_body(j, delta):
      index = (j * batch + jnp.arange(batch)) % n
      b = _gather(data, index)

      def objective(u, _):
        per_example = loss_of(params, protect(b, index, u), b["label"])
        return per_example if mode == "sample" else jnp.mean(per_example)[None]

      u0 = delta[index] if mode == "sample" else delta
      u, _ = optimize(objective, u0, update=sign_step(step_frac * eps), steps=int(pgd_steps),
                      project=lambda v: jnp.clip(v, -eps, eps))
      return delta.at[index].set(u) if mode == "sample" else u

    delta = jax.lax.fori_loop(0, -(-n // batch), noise_body, delta)
    index = jnp.arange(n)
    protected = protect(data, index, delta)
    accuracy, ce_p, ce_c = fit_measures(apply_fn, params, data, protected, n_classes, batch)
    done = accuracy >= stop_accuracy
    metrics = {"accuracy": accuracy, "ce_protected": ce_p / n, "ce_clean": ce_c / n,
               "hallmark": ce_p / jnp.maximum(ce_c, 1e-12)}
    noise = {"delta": delta, "done": done, "last": metrics,
             "stopped_at": jnp.where(done, state["step"] + 1, state["noise"]["stopped_at"])}
    return {**state, "surrogate": surrogate, "noise": noise}, dict(metrics)

  def idle(state, data):  # stopped: nothing moves; the log repeats the last round's measures
    del data
    return state, dict(state["noise"]["last"])

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
    return {**state, "surrogate": surrogate, "step": state["step"] + 1}, {"loss": loss, "hallmark": jnp.ones(()),
                                                                          "linf_scaled": jnp.zeros(())}

  def bilevel_step(state, data):
    key = jax.random.fold_in(state["rng"], state["step"])
    b = _gather(data, _sample_index(key, data["image"].shape[0], batch))
    gp = {"contour": state["contour"]["params"], "texture": state["texture"]["params"]}
    x_p = jax.lax.stop_gradient(umed_protect_batch(g_c, g_t, gp["contour"], gp["texture"], b, eps))

    def surrogate_turn(state):  # every k-th step: the surrogate learns the protected batch, generators frozen
      loss, grads = jax.value_and_grad(loss_of)(state["surrogate"]["params"], x_p, b["label"])
      return {**state, "surrogate": parts_lib.apply_gradients(state["surrogate"], grads, tx_s)}, loss

    def generator_turn(state):  # the other steps: the generators lower the (frozen) surrogate's loss
      s_params = state["surrogate"]["params"]
      loss, grads = jax.value_and_grad(
          lambda g: loss_of(s_params, umed_protect_batch(g_c, g_t, g["contour"], g["texture"], b, eps),
                            b["label"]))(gp)
      return {**state, "contour": parts_lib.apply_gradients(state["contour"], grads["contour"], tx_c),
              "texture": parts_lib.apply_gradients(state["texture"], grads["texture"], tx_t)}, loss

    new, loss = jax.lax.cond(state["step"] % k == 0, surrogate_turn, generator_turn, state)
    s_params = state["surrogate"]["params"]
    ce_p = jnp.mean(losses.cross_entropy(apply_fn(s_params, x_p), b["label"]))
    ce_c = jnp.mean(losses.cross_entropy(apply_fn(s_params, b["image"]), b["label"]))
    metrics = {"loss": loss, "hallmark": ce_p / jnp.maximum(ce_c, 1e-12),
               "linf_scaled": jnp.max(jnp.abs(x_p - b["image"]) / b["range"][:, None, None, :])}
    return {**new, "step": state["step"] + 1}, metrics

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

