"""What every absl launcher shares: the --multiprocess flag and printing where results went."""
from absl import flags

_MULTIPROCESS = flags.DEFINE_bool(
    "multiprocess", False, "Call jax.distributed.initialize() first (SLURM, TPU pods, launch/local_multiprocess.sh).")


def init_processes() -> None:
  if _MULTIPROCESS.value:
    import jax
    jax.distributed.initialize()
