"""Mesh and sharding helpers (1 CPU device here; 4 fake devices are exercised in test_train.py)."""
import jax
import numpy as np
import pytest

from mri_poison.train import mesh as mesh_lib


def test_mesh_axis_and_batch_sharding():
  mesh = mesh_lib.make_mesh()
  assert mesh.axis_names == ("data",) and mesh.size == jax.device_count()
  batch = {"image": np.arange(2 * 4 * 4 * 3, dtype=np.float32).reshape(2, 4, 4, 3), "label": np.ones((2, 4, 4), np.int32)}
  out = mesh_lib.shard_batch(batch, mesh)
  assert out["image"].sharding.spec[0] == "data"
  np.testing.assert_array_equal(np.asarray(out["image"]), batch["image"])
  rep = mesh_lib.replicate({"w": np.ones(3)}, mesh)
  assert rep["w"].sharding.is_fully_replicated


def test_batch_size_must_divide_device_count():
  mesh = mesh_lib.make_mesh()
  assert mesh_lib.check_batch_size(4, mesh) == 4 // jax.process_count()
  with pytest.raises(ValueError, match="data.batch_size=0"):
    mesh_lib.check_batch_size(0, mesh)


def test_mesh_groups_devices_by_process_and_names_this_process_rows():
  mesh = mesh_lib.make_mesh()
  processes = [d.process_index for d in mesh.devices.reshape(-1)]
  assert processes == sorted(processes)
  n = mesh.size
  assert mesh_lib.process_rows(4 * n, mesh) == (4 * n * jax.process_index() // jax.process_count(),
                                                4 * n * (jax.process_index() + 1) // jax.process_count())
