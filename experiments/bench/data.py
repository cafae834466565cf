r"""Data benchmark: phantom cases/s at 64^3 and grain pipeline patches/s (3D 32^3 patches, batch 2) on this CPU.

  python -m experiments.bench.data                  # ~1 min on 2 cores
  python -m experiments.bench.data --steps=500 --read_threads=8
  taskset -c 0 python -m experiments.bench.data --generation_only --shapes=64,128   # per case on one core
"""
import datetime
import os
import platform
import sys
import tempfile
import time

from absl import flags
import numpy as np

from experiments import launch_utils
from experiments.bench import timing

_CASES = flags.DEFINE_integer("cases", 8, "Phantom cases generated (and fed to the pipeline).")
_SHAPE = flags.DEFINE_integer("shape", 64, "Phantom grid edge (and the preprocessed grid the pipeline reads).")
_PATCH = flags.DEFINE_integer("patch", 32, "3D patch edge.")
_BATCH = flags.DEFINE_integer("batch", 2, "Batch size.")
_STEPS = flags.DEFINE_integer("steps", 200, "Timed pipeline batches per source.")
_THREADS = flags.DEFINE_integer("read_threads", 4, "grain reader threads.")
_VERSIONS = flags.DEFINE_list("versions", ["v1", "v2"], "Phantom versions whose generation is timed.")
_SHAPES = flags.DEFINE_list("shapes", ["64"], "Grid edges at which generation is timed (--cases each, 2 at >= 128).")
_GENERATION_ONLY = flags.DEFINE_bool("generation_only", False, "Time phantom generation only (no pipeline).")
_TFDS = flags.DEFINE_bool("tfds", True, "Also time the pipeline over a brats_phantom TFDS build (array_record).")


def _versions() -> str:
  import grain
  import jax
  import tensorflow_datasets as tfds
  return (f"python {platform.python_version()}, numpy {np.__version__}, jax {jax.__version__}, "
          f"grain {getattr(grain, '__version__', '?')}, tensorflow_datasets {tfds.__version__}")


def _time_pipeline(source, data_cfg, steps):
  from mri_poison.data import pipeline
  it = pipeline.train_iterator(source, data_cfg, seed=0, shard_index=0, shard_count=1)
  for _ in range(10):  # warm up the reader threads and prefetch buffer
    next(it)
  start = time.perf_counter()
  for _ in range(steps):
    batch = next(it)
  seconds = time.perf_counter() - start
  assert batch["image"].shape[0] == data_cfg.batch_size
  return steps * data_cfg.batch_size / seconds, steps / seconds


def main(argv):
  del argv
  from mri_poison.data import datasets, phantom
  from mri_poison.data.preprocess import preprocess_case

  n, edge = _CASES.value, _SHAPE.value
  shape = (edge,) * 3
  print(f"mri_poison data bench  {datetime.datetime.now().isoformat(timespec='seconds')}")
  print(f"device: {timing.cpu_name()}")
  print(f"versions: {_versions()}")

  print(f"CPUs this process may use: {len(os.sched_getaffinity(0))}")
  for version in _VERSIONS.value:
    for e in (int(s) for s in _SHAPES.value):
      k = n if e < 128 else min(n, 2)
      phantom.make_case(1000, shape=(e,) * 3, version=version)  # warm-up (imports, template caches, compiles)
      start = time.perf_counter()
      for i in range(k):
        phantom.make_case(i, shape=(e,) * 3, version=version)
      t = (time.perf_counter() - start) / k
      print(f"phantom {version} make_case {e}^3 x4 modalities: {t:6.2f} s/case ({k} cases)", flush=True)
  if _GENERATION_ONLY.value:
    return
  start = time.perf_counter()
  raw = [phantom.make_case(i, shape=shape) for i in range(n)]
  t_make = time.perf_counter() - start
  start = time.perf_counter()
  cases = [preprocess_case(c, shape=shape) for c in raw]
  t_pre = time.perf_counter() - start
  print(f"phantom {phantom.DEFAULT_VERSION} make_case {edge}^3 x4 modalities: {n / t_make:7.2f} cases/s  "
        f"({1e3 * t_make / n:.0f} ms/case)")
  print(f"  + preprocess_case to {edge}^3:          {n / (t_make + t_pre):7.2f} cases/s  "
        f"({1e3 * t_pre / n:.0f} ms/case preprocessing)")

  cfg = datasets.default_data_config()
  cfg.update(dict(mode="3d", patch_shape=(_PATCH.value,) * 3, batch_size=_BATCH.value, shape=shape,
                  read_threads=_THREADS.value))
  what = f"{_PATCH.value}^3 patches, batch {_BATCH.value}, fg 0.5, flip+scale+shift, {_THREADS.value} threads"
  patches, batches = _time_pipeline(cases, cfg, _STEPS.value)
  print(f"pipeline over in-memory Cases ({what}): {patches:8.1f} patches/s ({batches:.1f} batches/s)")

  if _TFDS.value:
    import tensorflow_datasets as tfds
    from mri_poison.data.tfds import BratsPhantom, BratsPhantomConfig
    tfds.disable_progress_bar()
    with tempfile.TemporaryDirectory() as data_dir:
      config = BratsPhantomConfig(name=f"bench{edge}", n_cases=n, phantom_shape=shape, grid=shape)
      builder = BratsPhantom(config=config, data_dir=data_dir, file_format="array_record")
      start = time.perf_counter()
      builder.download_and_prepare()
      t_build = time.perf_counter() - start
      source = builder.as_data_source()["train"]
      start = time.perf_counter()
      for i in range(len(source)):
        source[i]
      t_read = (time.perf_counter() - start) / len(source)
      print(f"tfds brats_phantom build ({n} cases, {edge}^3): {t_build:.1f} s; random read+decode "
            f"{1e3 * t_read:.1f} ms/record")
      patches, batches = _time_pipeline(source, cfg, _STEPS.value)
      print(f"pipeline over tfds.data_source   ({what}): {patches:8.1f} patches/s ({batches:.1f} batches/s)")
      assert "tensorflow" not in sys.modules


if __name__ == "__main__":
  launch_utils.run_plain(main)
