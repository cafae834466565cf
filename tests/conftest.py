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

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

# The main job at `test` size is the suite's longest run; the pipeline's tests and the end-to-end tests of studies
# 2 and 3 read the same run (they would otherwise train and attack the same models again), so their modules go to
# one xdist worker as one unit. Every other module is a unit of its own, as with --dist loadfile.
MAIN_JOB_MODULES = ("test_studies_reproduce.py", "test_studies_robustify.py", "test_studies_deform.py")
# Modules by measured time, longest first (2 cores, cold caches, 2026-12-07): handing the long ones out first
# keeps one worker from finishing minutes after the other. Modules not listed follow in collection order.
SLOWEST_FIRST = MAIN_JOB_MODULES + (
    "test_multihost.py", "test_models_conv.py", "test_poison_unlearnable.py", "test_datasets.py",
    "test_attacks_deform.py", "test_train.py", "test_studies_poison.py", "test_defenses.py", "test_unet.py",
    "test_bench_gpu_check.py", "test_readme.py", "test_studies_unlearnable.py", "test_evaluate.py",
    "test_parts.py", "test_phantom_v2.py")


def pytest_collection_modifyitems(config, items):
  del config
  rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: collection order within a rank


def pytest_xdist_make_scheduler(config, log):
  """Units of work for the xdist workers: a module, or the main job's modules together, handed out in order.

  A scheduler of our own because xdist's `--dist loadgroup` marks did not group tests here (pytest 9.2, xdist 3.8).
  """
  from xdist.scheduler import LoadScopeScheduling  # pylint: disable=g-import-not-at-top

  class ModuleScheduling(LoadScopeScheduling):

    def _split_scope(self, nodeid):
      path = nodeid.split("::", 1)[0]
      return "main_job" if os.path.basename(path) in MAIN_JOB_MODULES else path

  return ModuleScheduling(config, log)


@pytest.fixture(scope="session")
def main_job_at_test_size(tmp_path_factory):
  """The main job (`experiments.reproduce`) at `test` size, run once: (workdir, stage records, report.md)."""
  from experiments.configs.reproduce import get_config  # pylint: disable=g-import-not-at-top
  from mri_poison.studies import reproduce  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp("reproduce"))
  config = get_config("test")
  # In this process, one stage at a time: the tests that follow on this worker reuse its compiled programs, and
  # the other xdist worker keeps the second core busy. Stages in worker processes: test_studies_reproduce.py.
  config.concurrent_stages = 1
  records = reproduce.run(config, workdir)
  with open(os.path.join(workdir, "report.md")) as f:
    return workdir, records, f.read()
