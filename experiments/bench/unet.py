r"""Times the U-Net train step (median of N after warmup) and sliding-window evaluation.

CPU (small):
  python -m experiments.bench.unet --config experiments/configs/unet.py:phantom3d --size 32 --batch 2 --steps 5
GPU (the issue's comparison: batch 2, 128^3, BasicUNet layout, bf16; beside ../shared/bench/peer_unet3d.py):
  python -m experiments.bench.unet --config experiments/configs/unet.py:brats3d,basic_unet --size 128 \
      --batch 2 --dtype bfloat16 --steps 20 --eval_size 160
"""
import datetime
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from experiments.bench import timing

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/unet.py:phantom3d", "Model/train config.")
_SIZE = flags.DEFINE_integer("size", 32, "Cubic patch size (3D) or square slice size (2D).")
_BATCH = flags.DEFINE_integer("batch", 2, "Global batch.")
_DTYPE = flags.DEFINE_string("dtype", None, "Compute dtype override (float32 | bfloat16).")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (after 2 warmup steps).")
_EVAL_SIZE = flags.DEFINE_integer("eval_size", 0, "Volume edge for the sliding-window timing (0 = skip).")


def main(argv):
  del argv
  from mri_poison.train import evaluate, loop, mesh as mesh_lib, state as state_lib
  import flax, optax
  config = _CONFIG.value.unlock()
  if _DTYPE.value:
    config.model.dtype = _DTYPE.value
  ndim = 2 if config.data.mode == "2d" else 3
  shape = (_SIZE.value,) * ndim
  channels = len(tuple(config.data.modalities))
  print(f"date {datetime.datetime.now().isoformat(timespec='seconds')}  jax {jax.__version__}  "
        f"flax {flax.__version__}  optax {optax.__version__}  devices {jax.devices()}")
  print(f"model features={tuple(config.model.features)} dtype={config.model.dtype} batch={_BATCH.value} "
        f"patch={shape}")
  mesh = mesh_lib.make_mesh()
  mesh_lib.check_batch_size(_BATCH.value, mesh)
  model = state_lib.make_model(config.model)
  tx = state_lib.make_optimizer(config.train)
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(_BATCH.value, *shape, channels)).astype(np.float32),
           "label": rng.integers(0, 4, size=(_BATCH.value, *shape)).astype(np.int32)}
  with jax.set_mesh(mesh):
    params = state_lib.init_params(model, jax.random.PRNGKey(0), (1, *shape, channels))
    n_params = sum(x.size for x in jax.tree.leaves(params))
    state = mesh_lib.replicate(state_lib.init_state(params, tx, jax.random.PRNGKey(1)), mesh)
    batch = mesh_lib.shard_batch(batch, mesh)
    step = loop.make_train_step(model, tx, loop.make_loss_fn(config), mesh=mesh)
    t = time.perf_counter()
    state, _ = step(state, batch)
    jax.block_until_ready(state)
    print(f"params {n_params / 1e6:.2f}M  compile+first step {time.perf_counter() - t:.1f}s")
    holder = {"state": state}

    def one():
      holder["state"], metrics = step(holder["state"], batch)
      return metrics["loss"]
    timing.median_time(one, 2)
    ms = 1e3 * timing.median_time(one, _STEPS.value)
    print(f"train step: median {ms:.2f} ms over {_STEPS.value} steps ({_BATCH.value / ms * 1e3:.1f} examples/s)")
    if _EVAL_SIZE.value and ndim == 3:
      apply_fn = state_lib.make_apply_fn(model)
      volume = rng.normal(size=(_EVAL_SIZE.value,) * 3 + (channels,)).astype(np.float32)
      run = lambda: evaluate.sliding_window_predict(apply_fn, holder["state"]["params"], volume, window=shape,
                                                   overlap=float(config.eval.overlap),
                                                   batch=int(config.eval.sw_batch))
      jax.block_until_ready(run())
      ms = 1e3 * timing.median_time(run, 3)
      print(f"sliding window: median {ms:.1f} ms per {_EVAL_SIZE.value}^3 volume "
            f"(window {shape}, overlap {config.eval.overlap}, {len(evaluate.window_starts(volume.shape[:3], shape, float(config.eval.overlap)))} windows)")


if __name__ == "__main__":
  app.run(main)
