r"""Times study 1's six segmenters trained as ONE vmapped program against six sequential trainings.

Measures the train step only (data from memory, same batch layout as the study: (B, M, X, Y, 1)): the median
time of one step of all M models, after warm-up, plus compile times, in up to three layouts:

  vmapped     `train.parts.stacked_step` (what the study runs). jax's batching rule turns each vmapped
              convolution into ONE grouped convolution with the models on the feature axis
              (feature_group_count = M; `grouped_convs` counts them in the compiled program).
  mapped      one jitted program that runs the M single-model steps one after another (`lax.map` over the
              model axis): the single model's ungrouped convolutions, but one dispatch for all M.
  sequential  M calls of the jitted single-model step.
If vmapped is slower than mapped, the grouped convolutions are the cause (mapped does the same work with the
single model's kernels).

CPU (the default variant's sizes):
  python -m experiments.bench.poison_sweep --config experiments/configs/poison.py --steps 20
GPU (BraTS sizes; the issue's target is >= 2x for the vmapped sweep):
  python -m experiments.bench.poison_sweep --config experiments/configs/poison.py:brats --steps 50 \
      --config.data.batch_size=16
"""
import re
import time

import jax
import numpy as np
from absl import flags
from ml_collections import config_flags

from experiments import launch_utils
from experiments.bench import timing

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/poison.py", "Study 1 config.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps (after 2 warm-up steps).")
_MODELS = flags.DEFINE_integer("models", 6, "Models in the sweep (M).")
_LAYOUTS = flags.DEFINE_list("layouts", ["vmapped", "mapped", "sequential"], "Layouts to time.")

LAYOUTS = ("vmapped", "mapped", "sequential")


def mapped_step(step_fn, *, batch_axis: int = 1):
  """Like `train.parts.stacked_step(step_fn, batch_axis=1)`, but the models run one after another inside one
  program (`lax.map` over the model axis) instead of side by side (vmap). Same outputs."""
  from mri_poison.train import parts
  from mri_poison.train.trainer import guard_finite
  one = guard_finite(step_fn, keep=parts.SHARED)

  def step(state, batch):
    shared = {k: state[k] for k in parts.SHARED}
    stacked = {k: v for k, v in state.items() if k not in parts.SHARED}
    per_model = jax.tree.map(lambda v: jax.numpy.moveaxis(v, batch_axis, 0), batch)

    def body(xs):
      own, b = xs
      new, metrics = one({**own, **shared}, b)
      return {k: new[k] for k in stacked}, metrics, {k: new[k] for k in parts.SHARED}
    new, metrics, new_shared = jax.lax.map(body, (stacked, per_model))
    # The shared counters advance the same way in every model: keep model 0's.
    return {**new, **jax.tree.map(lambda v: v[0], new_shared)}, metrics
  return step


def _grouped_convs(compiled, m: int) -> int:
  """Convolutions with feature_group_count or batch_group_count = m in a compiled program's HLO."""
  try:
    text = compiled.as_text()
  except Exception:  # pylint: disable=broad-except
    return -1
  return len(re.findall(rf"(?:feature|batch)_group_count={m}\b", text))


def measure(config, *, models: int = 6, steps: int = 20, layouts=LAYOUTS, report=print) -> dict:
  """ms per step of all `models` segmenters in each of `layouts`, compile seconds, and speed-ups vs sequential."""
  from mri_poison.studies.poison import training
  from mri_poison.train import parts, trainer
  m = int(models)
  unknown = set(layouts) - set(LAYOUTS)
  if unknown:
    raise ValueError(f"layouts {sorted(unknown)}: expected some of {LAYOUTS}")
  sub = training.segmenter_config(config, 0)
  model = training.state_lib.make_model(sub.model)
  tx = training.state_lib.make_optimizer(sub.train)
  step_fn = training.loop.train_step_fn(model, tx, training.et_bce_dice)
  b = int(sub.data.batch_size)
  patch = tuple(int(p) for p in sub.data.patch_shape)
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(b, m, *patch, 1)).astype(np.float32),
           "label": (rng.random((b, m, *patch)) < 0.05).astype(np.int32) * 3}
  batch = jax.device_put(batch)
  one = training.initial_state(sub)
  out = {"models": m, "batch": b, "patch": list(patch), "features": [int(f) for f in sub.model.features],
         "dtype": str(sub.model.dtype)}
  report(f"M={m}, batch {b}, patch {patch}, U-Net features {tuple(sub.model.features)}, {sub.model.dtype}")

  runs = {}
  if "vmapped" in layouts or "mapped" in layouts:
    stacked_state = parts.stack(one, m)
  for name in ("vmapped", "mapped"):
    if name not in layouts:
      continue
    fn = parts.stacked_step(step_fn, batch_axis=1) if name == "vmapped" else mapped_step(step_fn, batch_axis=1)
    t = time.perf_counter()
    compiled = jax.jit(fn).lower(stacked_state, batch).compile()
    out[f"{name}_compile_s"] = time.perf_counter() - t
    out[f"{name}_memory"] = timing.compiled_memory(compiled)
    if name == "vmapped":
      out["grouped_convs"] = _grouped_convs(compiled, m)
    holder = {"state": stacked_state}

    def run(compiled=compiled, holder=holder):
      holder["state"], metrics = compiled(holder["state"], batch)
      return metrics
    runs[name] = run
  if "sequential" in layouts:
    single = jax.jit(trainer.guard_finite(step_fn))
    slices = [jax.tree.map(lambda v, i=i: v[:, i], batch) for i in range(m)]
    t = time.perf_counter()
    compiled_single = single.lower(one, slices[0]).compile()
    out["sequential_compile_s"] = time.perf_counter() - t
    states = [one] * m

    def run_sequential():
      metrics = []
      for i in range(m):
        states[i], mi = compiled_single(states[i], slices[i])
        metrics.append(mi)
      return metrics
    runs["sequential"] = run_sequential

  for run in runs.values():  # warm-up
    for _ in range(2):
      jax.block_until_ready(run())
  for name, run in runs.items():
    out[f"{name}_ms"] = 1e3 * timing.median_time(run, int(steps))
  for name in ("vmapped", "mapped"):
    if f"{name}_ms" in out and "sequential_ms" in out:
      out[f"{name}_speedup"] = out["sequential_ms"] / out[f"{name}_ms"]
  compile_line = ", ".join(f"{n} {out[n + '_compile_s']:.1f} s" for n in runs)
  report(f"compile: {compile_line}; vmapped program: {out.get('grouped_convs', 'n/a')} grouped convolutions")
  report(f"one training step of all {m} models: " + ", ".join(f"{n} {out[n + '_ms']:.1f} ms" for n in runs)
         + "".join(f"; {n} speed-up {out[n + '_speedup']:.2f}x" for n in ("vmapped", "mapped")
                   if n + "_speedup" in out))
  return out


def main(argv):
  del argv
  print(timing.describe(timing.environment()))
  device = jax.devices()[0]
  print(f"device: {device.platform} ({device.device_kind})")
  measure(_CONFIG.value, models=_MODELS.value, steps=_STEPS.value, layouts=tuple(_LAYOUTS.value))


if __name__ == "__main__":
  launch_utils.run_plain(main)
