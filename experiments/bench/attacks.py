r"""Attack benchmark: PGD-10 time per batch on a U-Net, and an eps sweep in one call vs separate calls.

  python -m experiments.bench.attacks                                    # CPU, small: 2D 64^2 and 3D 32^3
  python -m experiments.bench.attacks --sizes=128 --dims=3 --batch=2 --features=32,32,64,128,256,32 \
      --dtype=bfloat16 --repeats=5                                       # the GPU run (128^3, batch 2)
`problem`, `measure_pgd`, `measure_sweep` and `measure_sliding_window_attack` are what
experiments/bench/gpu_check.py runs.
"""
import time

from absl import flags
import jax
import jax.numpy as jnp

from experiments import launch_utils
from experiments.bench import timing
from mri_poison.attacks import gradient
from mri_poison.attacks import losses
from mri_poison.attacks import eps_sweep

_DIMS = flags.DEFINE_list("dims", ["2", "3"], "Spatial dims to run (2 = slices, 3 = volumes).")
_SIZES = flags.DEFINE_list("sizes", ["64", "32"], "Edge per entry of --dims (or one edge for all).")
_BATCH = flags.DEFINE_integer("batch", 2, "Batch size.")
_CHANNELS = flags.DEFINE_integer("channels", 4, "Input modalities.")
_FEATURES = flags.DEFINE_list("features", ["8", "16", "32"], "UNet encoder widths.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "UNet compute dtype.")
_STEPS = flags.DEFINE_integer("steps", 10, "PGD steps.")
_SWEEP_STEPS = flags.DEFINE_integer("sweep_steps", 5, "i-FGSM steps in the eps-sweep comparison.")
_N_EPS = flags.DEFINE_integer("n_eps", 4, "eps grid size for the sweep comparison.")
_CHUNK = flags.DEFINE_integer("chunk", 0, "Sweep chunk size (0 = all eps at once).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repeats (median reported).")


def _timed(fn, repeats):
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - t0
  return first, timing.median_time(fn, repeats)


def problem(ndim: int, size, batch: int, *, features, dtype="float32", channels: int = 4, spatial=None):
  """(UNet apply_fn, params, x, labels, a CE loss_fn(x)) on random data: the attacked model and input.

  `spatial` (a shape) overrides (size,) * ndim, e.g. a 240 x 240 x 155 volume.
  """
  from mri_poison.models.unet import UNet  # pylint: disable=g-import-not-at-top
  dtype = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
  model = UNet(features=tuple(int(f) for f in features), out_channels=4, dtype=dtype)
  spatial = tuple(spatial) if spatial is not None else (int(size),) * ndim
  shape = (int(batch),) + spatial + (int(channels),)
  x = jax.random.normal(jax.random.key(0), shape)
  # Params do not depend on the input's extent: init on one window-sized example.
  params = jax.jit(model.init)(jax.random.key(1), jnp.zeros((1,) + (int(size),) * len(spatial) + shape[-1:]))
  labels = jax.random.randint(jax.random.key(2), shape[:-1], 0, 4)
  return model.apply, params, x, labels, losses.cross_entropy(model.apply, params, labels)


def measure_pgd(loss_fn, x, *, steps: int = 10, repeats: int = 3, tag: str = "", report=print) -> dict:
  """Median time of one PGD-`steps` attack on the batch `x` (random start, L-inf)."""
  first, t = _timed(lambda: gradient.pgd(loss_fn, x, eps=0.05, step_size=0.0125, steps=steps,
                                         key=jax.random.key(3)), repeats)
  report(f"{tag}: PGD-{steps} {t * 1e3:.1f} ms/batch (first call incl. compile {first:.1f} s)")
  return {"pgd_ms": t * 1e3, "pgd_first_s": first, "steps": int(steps)}


def measure_sweep(loss_fn, x, *, n_eps: int = 4, steps: int = 5, chunk: int = 0, repeats: int = 3, tag: str = "",
                  report=print) -> dict:
  """i-FGSM-`steps` over `n_eps` budgets: one `eps_sweep.sweep` call vs one call per eps (same results)."""
  grid = jnp.linspace(0.01, 0.1, int(n_eps))
  first_s, t_sweep = _timed(lambda: eps_sweep.sweep(gradient.ifgsm, loss_fn, x, eps=grid, step_size_frac=0.25,
                                                    steps=steps, chunk_size=chunk or None), repeats)
  sep = lambda: [gradient.ifgsm(loss_fn, x, eps=e, step_size=e / 4, steps=steps) for e in grid]
  first_sep, t_sep = _timed(sep, repeats)
  report(f"{tag}: i-FGSM-{steps} x {n_eps} eps: one sweep call {t_sweep * 1e3:.1f} ms, separate calls "
         f"{t_sep * 1e3:.1f} ms -> {t_sep / t_sweep:.2f}x (first calls {first_s:.1f} s / {first_sep:.1f} s)")
  return {"sweep_ms": t_sweep * 1e3, "separate_ms": t_sep * 1e3, "speedup": t_sep / t_sweep,
          "sweep_first_s": first_s, "separate_first_s": first_sep, "n_eps": int(n_eps), "steps": int(steps)}


def measure_sliding_window_attack(apply_fn, params, x, labels, *, window, overlap: float = 0.5, batch: int = 1,
                                  steps: int = 10, repeats: int = 1, report=print) -> dict:
  """PGD-`steps` on whole volumes x (B, *S, C) scored through Gaussian-blended sliding-window inference."""
  from mri_poison.attacks import sliding_window
  windowed = sliding_window.windowed_apply(apply_fn, window=window, overlap=overlap, batch=batch)
  loss_fn = losses.cross_entropy(windowed, params, labels)
  out = measure_pgd(loss_fn, x, steps=steps, repeats=repeats, report=lambda s: None)
  report(f"sliding-window PGD-{steps} on {'x'.join(map(str, x.shape[1:-1]))} (window {tuple(window)}, overlap "
         f"{overlap}, {batch} windows per call): {out['pgd_ms'] / 1e3:.2f} s per attack "
         f"(first call incl. compile {out['pgd_first_s']:.1f} s)")
  return out


def bench_one(ndim, size):
  tag = f"{ndim}D {size}^{ndim} batch {_BATCH.value} {_DTYPE.value}"
  _, _, x, _, lf = problem(ndim, size, _BATCH.value, features=_FEATURES.value, dtype=_DTYPE.value,
                           channels=_CHANNELS.value)
  out = measure_pgd(lf, x, steps=_STEPS.value, repeats=_REPEATS.value, tag=tag)
  out.update(measure_sweep(lf, x, n_eps=_N_EPS.value, steps=_SWEEP_STEPS.value, chunk=_CHUNK.value,
                           repeats=_REPEATS.value, tag=tag))
  return out


def main(argv):
  del argv
  print(timing.describe(timing.environment()), f"devices {jax.devices()}")
  print(f"UNet features {','.join(_FEATURES.value)}, {_CHANNELS.value} channels -> 4 classes")
  sizes = _SIZES.value * len(_DIMS.value) if len(_SIZES.value) == 1 else _SIZES.value
  for d, s in zip(_DIMS.value, sizes):
    bench_one(int(d), int(s))


if __name__ == "__main__":
  launch_utils.run_plain(main)
