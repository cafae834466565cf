"""mri_poison: attacking and protecting brain-tumour MRI segmentation in JAX."""
import os
import sys

# The classic (non-partitionable) threefry: XLA:CPU compiles jax>=0.5's partitionable threefry 10-20x slower
# (jax 0.10.2, 2-core EPYC: one normal draw of a 3x3x3x4x8 kernel 4.8 s vs 0.33 s; a small U-Net's init 8.5 s
# vs 1.1 s), and every jitted attack, augmentation and init draws random numbers. Values stay sharding-invariant
# either way; partitionable only saves communication for random draws sharded over several devices. An explicit
# JAX_THREEFRY_PARTITIONABLE in the environment wins. Set through the environment when jax is not imported yet,
# so that importing the package (a benchmark's scheduler, io_utils alone) does not import jax.
if "JAX_THREEFRY_PARTITIONABLE" not in os.environ:
  if "jax" in sys.modules:
    _config = sys.modules["jax"].config
    if hasattr(_config, "jax_threefry_partitionable"):
      _config.update("jax_threefry_partitionable", False)
  else:
    os.environ["JAX_THREEFRY_PARTITIONABLE"] = "0"
