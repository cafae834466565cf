r"""Attack benchmark: PGD-10 time per batch on a U-Net, and an eps sweep in one call vs separate calls.

  python -m experiments.bench.attacks                                    # CPU, small: 2D 64^2 and 3D 32^3
  python -m experiments.bench.attacks --sizes=128 --dims=3 --batch=2 --features=32,32,64,128,256,32 \
      --dtype=bfloat16 --repeats=5                                       # the GPU run (128^3, batch 2)
"""
import datetime
import platform
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

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


def _model(dtype):
  from mri_poison.models.unet import UNet  # pylint: disable=g-import-not-at-top
  model = UNet(features=tuple(int(f) for f in _FEATURES.value), out_channels=4, dtype=dtype)
  return model, model.apply


def _timed(fn, repeats):
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return first, float(np.median(times))


def bench_one(ndim, size):
  dtype = jnp.bfloat16 if _DTYPE.value == "bfloat16" else jnp.float32
  model, apply_fn = _model(dtype)
  shape = (_BATCH.value,) + (size,) * ndim + (_CHANNELS.value,)
  x = jax.random.normal(jax.random.key(0), shape)
  params = jax.jit(model.init)(jax.random.key(1), x)
  labels = jax.random.randint(jax.random.key(2), shape[:-1], 0, 4)
  lf = losses.cross_entropy(apply_fn, params, labels)
  r = _REPEATS.value
  tag = f"{ndim}D {size}^{ndim} batch {_BATCH.value} {_DTYPE.value}"

  first, t = _timed(lambda: gradient.pgd(lf, x, eps=0.05, step_size=0.0125, steps=_STEPS.value,
                                         key=jax.random.key(3)), r)
  print(f"{tag}: PGD-{_STEPS.value} {t * 1e3:.1f} ms/batch (first call incl. compile {first:.1f} s)")

  grid = jnp.linspace(0.01, 0.1, _N_EPS.value)
  n = _SWEEP_STEPS.value
  chunk = _CHUNK.value or None
  first_s, t_sweep = _timed(lambda: eps_sweep.sweep(gradient.ifgsm, lf, x, eps=grid, step_size_frac=0.25, steps=n,
                                                chunk_size=chunk), r)
  sep = lambda: [gradient.ifgsm(lf, x, eps=e, step_size=e / 4, steps=n) for e in grid]
  first_sep, t_sep = _timed(sep, r)
  print(f"{tag}: i-FGSM-{n} x {_N_EPS.value} eps: one sweep call {t_sweep * 1e3:.1f} ms, separate calls "
        f"{t_sep * 1e3:.1f} ms -> {t_sep / t_sweep:.2f}x (first calls {first_s:.1f} s / {first_sep:.1f} s)")
  return {"pgd_ms": t * 1e3, "sweep_ms": t_sweep * 1e3, "separate_ms": t_sep * 1e3}


def main(argv):
  del argv
  import flax  # pylint: disable=g-import-not-at-top
  print(f"date {datetime.datetime.now().isoformat(timespec='seconds')}; python {platform.python_version()}, "
        f"jax {jax.__version__}, flax {flax.__version__}; devices {jax.devices()}; "
        f"{platform.processor() or platform.machine()}")
  print(f"UNet features {','.join(_FEATURES.value)}, {_CHANNELS.value} channels -> 4 classes")
  sizes = _SIZES.value * len(_DIMS.value) if len(_SIZES.value) == 1 else _SIZES.value
  for d, s in zip(_DIMS.value, sizes):
    bench_one(int(d), int(s))


if __name__ == "__main__":
  app.run(main)
