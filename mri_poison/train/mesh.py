"""The one device mesh: a "data" axis over every device of every process; batches sharded, params replicated."""
from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices=None) -> jax.sharding.Mesh:
  """A 1-D mesh with axis "data" over `devices` (default: all devices of all processes).

  Axis types are Auto: with Explicit axes a vmapped, jitted attack on a batch-sharded input failed with
  ShardingTypeError (jax 0.10.2), see architecture.md.
  """
  axis_types = (jax.sharding.AxisType.Auto,)
  if devices is None:
    return jax.make_mesh((jax.device_count(),), (DATA_AXIS,), axis_types=axis_types)
  devices = np.asarray(devices).reshape(-1)
  return jax.sharding.Mesh(devices, (DATA_AXIS,), axis_types=axis_types)


def data_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading (batch) axis split over "data", the rest whole."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(batch_size: int, mesh: jax.sharding.Mesh, key: str = "data.batch_size") -> int:
  """The per-process batch; raises a ValueError naming `key` if the global batch does not split evenly."""
  batch_size, n = int(batch_size), mesh.size
  if batch_size < 1 or batch_size % n:
    raise ValueError(f"config {key}={batch_size} must be a positive multiple of the device count {n} "
                     f"(the batch is split over the mesh axis {DATA_AXIS!r}); try {key}={max(n, n * round(batch_size / n))}")
  if batch_size % jax.process_count():
    raise ValueError(f"config {key}={batch_size} must be a multiple of the process count {jax.process_count()}")
  return batch_size // jax.process_count()


def shard_batch(batch: Mapping[str, Any], mesh: jax.sharding.Mesh) -> dict[str, Any]:
  """This process's slice of a global batch (a pytree of numpy arrays, e.g. {"a": {...}, "b": {...}} from
  zipped streams) -> global arrays sharded on "data" along their leading axis (multi-host safe)."""
  sharding = data_sharding(mesh)
  return jax.tree.map(lambda v: jax.make_array_from_process_local_data(sharding, np.asarray(v)), dict(batch))


def replicate(tree, mesh: jax.sharding.Mesh):
  """Every leaf placed whole on every device of the mesh."""
  return jax.device_put(tree, replicated(mesh))
