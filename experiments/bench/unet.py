r"""Times the U-Net train step (median of N after warmup) and sliding-window evaluation.

CPU (small):
  python -m experiments.bench.unet --config experiments/configs/unet.py:phantom3d --size 32 --batch 2 --steps 5
GPU (the issue's comparison: batch 2, 128^3, BasicUNet layout, bf16; beside ../shared/bench/peer_unet3d.py):
  python -m experiments.bench.unet --config experiments/configs/unet.py:brats3d,basic_unet --size 128 \
      --batch 2 --dtype bfloat16 --steps 20 --eval_size 160
`measure_train_step` (and timing.measure_sliding_window) are what experiments/bench/gpu_check.py runs.
"""
import time

import jax
import numpy as np
from absl import flags
from ml_collections import config_flags

from experiments import launch_utils
from experiments.bench import timing

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/unet.py:phantom3d", "Model/train config.")
_SIZE = flags.DEFINE_integer("size", 32, "Cubic patch size (3D) or square slice size (2D).")
_BATCH = flags.DEFINE_integer("batch", 2, "Global batch.")
_DTYPE = flags.DEFINE_string("dtype", None, "Compute dtype override (float32 | bfloat16).")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (after 2 warmup steps).")
_EVAL_SIZE = flags.DEFINE_integer("eval_size", 0, "Volume edge for the sliding-window timing (0 = skip).")


def measure_train_step(config, *, size: int, batch: int, steps: int, dtype: str | None = None,
                       remat: bool | None = None, report=print) -> dict:
  """Median train-step time of `config.model` on random (batch, size^ndim, C) data; returns numbers and state.

  The step is compiled ahead (`lower().compile()`), so compile time and XLA's buffer plan (`memory`) are
  reported apart from the steady state. Keys: params, gflop (XLA's cost analysis), compile_s, first_step_s, step_ms, examples_per_s,
  memory (XLA plan), peak (process high-water marks), and "state"/"model" for a following eval timing.
  """
  from mri_poison.train import loop, mesh as mesh_lib, state as state_lib
  config = config.unlock() if hasattr(config, "unlock") else config
  if dtype:
    config.model.dtype = dtype
  if remat is not None:
    config.model.remat = bool(remat)
  ndim = 2 if config.data.mode == "2d" else 3
  shape = (int(size),) * ndim
  channels = len(tuple(config.data.modalities))
  report(f"model features={tuple(config.model.features)} dtype={config.model.dtype} "
         f"remat={bool(config.model.get('remat', False))} batch={batch} patch={shape}")
  mesh = mesh_lib.make_mesh()
  mesh_lib.check_batch_size(batch, mesh)
  model = state_lib.make_model(config.model)
  tx = state_lib.make_optimizer(config.train)
  rng = np.random.default_rng(0)
  host_batch = {"image": rng.normal(size=(batch, *shape, channels)).astype(np.float32),
                "label": rng.integers(0, 4, size=(batch, *shape)).astype(np.int32)}
  with jax.set_mesh(mesh):
    params = state_lib.init_params(model, jax.random.PRNGKey(0), (1, *shape, channels))
    n_params = sum(x.size for x in jax.tree.leaves(params))
    state = mesh_lib.replicate(state_lib.init_state(params, tx, jax.random.PRNGKey(1)), mesh)
    dev_batch = mesh_lib.shard_batch(host_batch, mesh)
    step = loop.make_train_step(model, tx, loop.make_loss_fn(config), mesh=mesh)
    t = time.perf_counter()
    compiled = step.lower(state, dev_batch).compile()
    compile_s = time.perf_counter() - t
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
    t = time.perf_counter()
    state, _ = compiled(state, dev_batch)
    jax.block_until_ready(state)
    first_s = time.perf_counter() - t
    report(f"params {n_params / 1e6:.2f}M  compile {compile_s:.1f}s  first step {first_s:.2f}s")
    holder = {"state": state}

    def one():
      holder["state"], metrics = compiled(holder["state"], dev_batch)
      return metrics["loss"]
    timing.median_time(one, 2)
    ms = 1e3 * timing.median_time(one, steps)
  report(f"train step: median {ms:.2f} ms over {steps} steps ({batch / ms * 1e3:.1f} examples/s)")
  return {"params": int(n_params), "gflop": float(cost.get("flops", float("nan"))) / 1e9, "compile_s": compile_s, "first_step_s": first_s, "step_ms": ms,
          "examples_per_s": batch / ms * 1e3, "memory": timing.compiled_memory(compiled),
          "peak": timing.peak_memory(), "state": holder["state"], "model": model}


def main(argv):
  del argv
  from mri_poison.train import state as state_lib
  print(timing.describe(timing.environment()), f"devices {jax.devices()}")
  config = _CONFIG.value
  out = measure_train_step(config, size=_SIZE.value, batch=_BATCH.value, steps=_STEPS.value, dtype=_DTYPE.value)
  ndim = 2 if config.data.mode == "2d" else 3
  if _EVAL_SIZE.value and ndim == 3:
    channels = len(tuple(config.data.modalities))
    volume = np.random.default_rng(0).normal(size=(_EVAL_SIZE.value,) * 3 + (channels,)).astype(np.float32)
    timing.measure_sliding_window(state_lib.make_apply_fn(out["model"]), out["state"]["params"], volume,
                           window=(_SIZE.value,) * 3, overlap=float(config.eval.overlap),
                           batch=int(config.eval.sw_batch))


if __name__ == "__main__":
  launch_utils.run_plain(main)
