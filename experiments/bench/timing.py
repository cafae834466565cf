"""What every benchmark times with: the median wall time of a jax call, waited for on the device."""
import statistics
import time

import jax


def median_time(fn, n: int) -> float:
  """Median seconds of `n` calls of `fn()`, each blocked until its outputs are ready."""
  times = []
  for _ in range(n):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return statistics.median(times)
