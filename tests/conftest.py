"""Test-session settings: one persistent XLA compilation cache shared by every test process.

Most of the suite's time is compilation of the same small programs: a study run again (the notebook tour after
the pipeline test), an xdist worker compiling what the other already compiled, launcher subprocesses. JAX's
persistent cache (keyed by the program, the jax version and the flags, so never stale) lets each compile once.
Set before jax is imported by any test module; MRI_POISON_TEST_JAX_CACHE=0 turns it off.
"""
import os

if os.environ.get("MRI_POISON_TEST_JAX_CACHE", "1") != "0":
  _CACHE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache", "jax")
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # the many small eager programs too
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
