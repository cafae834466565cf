"""mri_poison: attacking and protecting brain-tumour MRI segmentation in JAX."""
import os

import jax

# The classic (non-partitionable) threefry: XLA:CPU compiles jax>=0.5's partitionable threefry 10-20x slower
# (jax 0.10.2, 2-core EPYC: one normal draw of a 3x3x3x4x8 kernel 4.8 s vs 0.33 s; a small U-Net's init 8.5 s
# vs 1.1 s), and every jitted attack, augmentation and init draws random numbers. Values stay sharding-invariant
# either way; partitionable only saves communication for random draws sharded over several devices. An explicit
# JAX_THREEFRY_PARTITIONABLE in the environment wins.
if "JAX_THREEFRY_PARTITIONABLE" not in os.environ and hasattr(jax.config, "jax_threefry_partitionable"):
  jax.config.update("jax_threefry_partitionable", False)
