"""What every benchmark times and records with: median wall time of a jax call, peak memory, the environment."""
import datetime
import importlib.metadata
import os
import platform
import resource
import shutil
import statistics
import subprocess
import time

import jax

# Packages a benchmark record names (those not installed are left out).
PACKAGES = ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax", "orbax-checkpoint",
            "numpy", "grain", "ml-collections", "torch", "monai", "torchattacks")


def median_time(fn, n: int) -> float:
  """Median seconds of `n` calls of `fn()`, each blocked until its outputs are ready."""
  times = []
  for _ in range(n):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def peak_memory() -> dict:
  """{"device_peak_bytes": high-water mark of the first device's allocator (None where the backend keeps no
  statistics, e.g. CPU), "host_max_rss_bytes": this process's peak resident memory}.

  Both are process-wide high-water marks (jax has no reset): a benchmark that wants one figure per
  configuration runs each configuration in its own process (see gpu_check.py).
  """
  device_peak = None
  try:
    stats = jax.local_devices()[0].memory_stats() or {}
    device_peak = stats.get("peak_bytes_in_use")
  except Exception:  # pylint: disable=broad-except  (backends without memory statistics)
    pass
  return {"device_peak_bytes": device_peak,
          "host_max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def compiled_memory(compiled) -> dict:
  """XLA's own buffer plan of one compiled program: what it allocates besides what is already resident."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return {}
  if m is None:
    return {}
  out = {k: int(getattr(m, k)) for k in ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
                                         "temp_size_in_bytes") if hasattr(m, k)}
  if getattr(m, "peak_memory_in_bytes", 0):
    out["peak_memory_in_bytes"] = int(m.peak_memory_in_bytes)
  return out


def versions() -> dict:
  """{package: version} from the installed metadata (imports nothing, so it starts no accelerator)."""
  out = {"python": platform.python_version()}
  for name in PACKAGES:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return out


def cpu_name() -> str:
  name = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  return f"{name}, {os.cpu_count()} logical cores"


def gpus() -> list[dict]:
  """[{name, driver, memory}] from nvidia-smi, [] where there is none (the caller's jax is not touched)."""
  if not shutil.which("nvidia-smi"):
    return []
  try:
    out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=20, check=True).stdout
  except (OSError, subprocess.SubprocessError):
    return []
  rows = [[c.strip() for c in line.split(",")] for line in out.strip().splitlines() if line.strip()]
  return [dict(zip(("name", "driver", "memory"), r)) for r in rows]


def environment() -> dict:
  """Date, host, GPUs (nvidia-smi) and package versions; safe to call before any jax computation."""
  return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "cpu": cpu_name(), "gpus": gpus(),
          "versions": versions()}


def describe(env: dict) -> str:
  """One line for a benchmark's header."""
  gpu = "; ".join(f"{g['name']} ({g['memory']}, driver {g['driver']})" for g in env["gpus"]) or "no GPU"
  v = ", ".join(f"{k} {x}" for k, x in env["versions"].items())
  return f"date {env['date']}; {gpu}; CPU {env['cpu']}; {v}"


def measure_sliding_window(apply_fn, params, volume, *, window, overlap: float, batch: int, repeats: int = 3,
                           report=print) -> dict:
  """Median time of `train.evaluate.sliding_window_predict` on one volume (*S, C).

  Here, not in unet.py, so that a process can time it beside attacks.py (the bench modules' absl flags clash).
  """
  from mri_poison.train import evaluate
  run = lambda: evaluate.sliding_window_predict(apply_fn, params, volume, window=window, overlap=overlap,
                                               batch=batch)
  t = time.perf_counter()
  jax.block_until_ready(run())
  first_s = time.perf_counter() - t
  ms = 1e3 * median_time(run, repeats)
  n_windows = len(evaluate.window_starts(volume.shape[:-1], window, overlap))
  report(f"sliding window: median {ms:.1f} ms per {'x'.join(map(str, volume.shape[:-1]))} volume "
         f"(window {tuple(window)}, overlap {overlap}, {n_windows} windows, {batch} per call; "
         f"first call incl. compile {first_s:.1f} s)")
  return {"ms": ms, "first_s": first_s, "windows": n_windows}
