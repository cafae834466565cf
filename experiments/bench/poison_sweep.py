r"""Times study 1's six segmenters trained as ONE vmapped program against six sequential trainings.

Measures the train step only (data from memory, same batch layout as the study: (B, M, X, Y, 1)): the median
time of one stacked step over M models vs M single-model steps, after warm-up, plus compile times.

CPU (the default variant's sizes):
  python -m experiments.bench.poison_sweep --config experiments/configs/poison.py --steps 20
GPU (BraTS sizes; the issue's target is >= 2x for the vmapped sweep):
  python -m experiments.bench.poison_sweep --config experiments/configs/poison.py:brats --steps 50 \
      --config.data.batch_size=16
"""
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from experiments.bench import timing

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/poison.py", "Study 1 config.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps (after 2 warm-up steps).")
_MODELS = flags.DEFINE_integer("models", 6, "Models in the sweep (M).")


def main(argv):
  del argv
  from mri_poison.studies.poison import training
  from mri_poison.train import parts, trainer
  from mri_poison.train import state as state_lib
  config = _CONFIG.value
  m = int(_MODELS.value)
  sub = training.segmenter_config(config, 0)
  model = state_lib.make_model(sub.model)
  tx = state_lib.make_optimizer(sub.train)
  single = jax.jit(trainer.guard_finite(training.loop.train_step_fn(model, tx, training.et_bce_dice)))
  stacked_step = jax.jit(parts.stacked_step(training.loop.train_step_fn(model, tx, training.et_bce_dice),
                                            batch_axis=1))
  b = int(sub.data.batch_size)
  patch = tuple(int(p) for p in sub.data.patch_shape)
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(b, m, *patch, 1)).astype(np.float32),
           "label": (rng.random((b, m, *patch)) < 0.05).astype(np.int32) * 3}
  one = training.initial_state(sub)
  states = {"stacked": parts.stack(one, m), "single": [one] * m}

  t = time.perf_counter()
  jax.block_until_ready(stacked_step(states["stacked"], batch))
  compile_stacked = time.perf_counter() - t
  t = time.perf_counter()
  jax.block_until_ready(single(one, jax.tree.map(lambda v: v[:, 0], batch)))
  compile_single = time.perf_counter() - t

  def run_stacked():
    states["stacked"], metrics = stacked_step(states["stacked"], batch)
    return metrics

  def run_sequential():
    out = []
    for i in range(m):
      states["single"][i], metrics = single(states["single"][i], jax.tree.map(lambda v, i=i: v[:, i], batch))
      out.append(metrics)
    return out

  for _ in range(2):
    jax.block_until_ready(run_stacked())
    jax.block_until_ready(run_sequential())
  n = int(_STEPS.value)
  t_stacked, t_seq = timing.median_time(run_stacked, n), timing.median_time(run_sequential, n)
  device = jax.devices()[0]
  print(f"device: {device.platform} ({device.device_kind}); M={m}, batch {b}, patch {patch}, "
        f"U-Net features {tuple(sub.model.features)}, {sub.model.dtype}")
  print(f"compile: stacked {compile_stacked:.1f} s, single {compile_single:.1f} s")
  print(f"one training step of all {m} models: vmapped {1e3 * t_stacked:.1f} ms, sequential {1e3 * t_seq:.1f} ms "
        f"-> speed-up {t_seq / t_stacked:.2f}x")


if __name__ == "__main__":
  app.run(main)
