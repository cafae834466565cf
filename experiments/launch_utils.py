"""What every absl launcher shares: the --multiprocess flag and quiet library logs."""
import logging as py_logging

from absl import flags
from absl import logging

_MULTIPROCESS = flags.DEFINE_bool(
    "multiprocess", False, "Call jax.distributed.initialize() first (SLURM, TPU pods, launch/local_multiprocess.sh).")
_CHATTY = ("/orbax/", "/grain/", "/tensorflow_datasets/")


class _QuietLibraries(py_logging.Filter):
  """Drops INFO records from orbax/grain/tfds: per-save I/O statistics would bury the progress lines."""

  def filter(self, record):
    return record.levelno >= py_logging.WARNING or not any(p in record.pathname for p in _CHATTY)


def init_processes() -> None:
  logging.get_absl_handler().addFilter(_QuietLibraries())
  if _MULTIPROCESS.value:
    import jax
    jax.distributed.initialize()
