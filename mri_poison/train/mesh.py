"""The one device mesh: a "data" axis over every device of every process; batches sharded, params replicated."""
from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices=None) -> jax.sharding.Mesh:
  """A 1-D mesh with axis "data" over `devices` (default: all devices of all processes), grouped by process.

  The devices are stably sorted by process index, so process p's devices hold the p-th contiguous block of
  every batch sharded on "data": rows [p*B/P, (p+1)*B/P), the rows the data pipeline gives process p (see
  mri_poison.data.pipeline). Within a process the order jax.make_mesh chose is kept.
  Axis types are Auto: with Explicit axes a vmapped, jitted attack on a batch-sharded input failed with
  ShardingTypeError (jax 0.10.2), see architecture.md.
  """
  axis_types = (jax.sharding.AxisType.Auto,)
  if devices is None:
    devices = jax.make_mesh((jax.device_count(),), (DATA_AXIS,), axis_types=axis_types).devices
  devices = sorted(np.asarray(devices).reshape(-1), key=lambda d: d.process_index)
  return jax.sharding.Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=axis_types)


def process_rows(batch_size: int, mesh: jax.sharding.Mesh) -> tuple[int, int]:
  """[start, stop) of the rows of a global batch of `batch_size` that this process's devices hold on `mesh`.

  Raises a ValueError when they are not one contiguous block (a mesh not grouped by process).
  """
  indices = data_sharding(mesh).addressable_devices_indices_map((int(batch_size),)).values()
  rows = sorted({r for index in indices for r in range(*index[0].indices(int(batch_size)))})
  if not rows or rows != list(range(rows[0], rows[-1] + 1)):
    raise ValueError(f"process {jax.process_index()} holds rows {rows} of a batch of {batch_size} on this mesh: "
                     "not one block; build the mesh with train.mesh.make_mesh (devices grouped by process)")
  return rows[0], rows[-1] + 1


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
