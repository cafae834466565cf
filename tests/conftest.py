"""Test-session settings: compile each program once, and compile the cheap form of attack loops.

Most of the suite's time is compilation of small programs that then run once or twice.
- One persistent XLA compilation cache shared by every test process: a study run again (the notebook tour after
  the pipeline test), an xdist worker compiling what the other already compiled, launcher subprocesses. JAX's
  cache (keyed by the program, the jax version and the flags, so never stale) lets each compile once.
  MRI_POISON_TEST_JAX_CACHE=0 turns it off.
- Attack and optimisation loops stay rolled (`attacks.optimize.scan_unroll`): on CPU the unrolled form runs
  several times faster but compiles about a second per step, which pays only when a program runs many times.
  Both forms give the same results (tests/test_attacks_optimize.py checks it with the forms forced).
Set before jax is imported by any test module, and inherited by the subprocesses tests start.
"""
import os

if os.environ.get("MRI_POISON_TEST_JAX_CACHE", "1") != "0":
  _CACHE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache", "jax")
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # the many small eager programs too
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("MRI_POISON_UNROLL", "rolled")
