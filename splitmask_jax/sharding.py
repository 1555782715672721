"""The device mesh and how arrays are laid out on it.

Data parallelism over a `data` mesh axis: batches are split along their first
dimension, parameters and optimizer state are replicated. The step functions
are written for global arrays, so the same code runs on one CPU, on N fake CPU
devices, on a GPU or across hosts; only the mesh changes.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(mesh_config, devices=None) -> Mesh:
  """A one-axis ('data') mesh over `devices` (default: all devices of all hosts).

  Args:
    mesh_config: has `data`, the number of devices on the data axis, -1 for all.
    devices: optional explicit device list (tests build 1- and 8-device meshes).
  """
  devices = list(jax.devices() if devices is None else devices)
  size = len(devices) if mesh_config.data == -1 else mesh_config.data
  if size <= 0 or size > len(devices) or len(devices) % size:
    raise ValueError(
        f"config.mesh.data={mesh_config.data!r} is invalid: {len(devices)} devices "
        "are available; use -1 (all) or a divisor of the device count.")
  return Mesh(np.asarray(devices[:size]), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over the data axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(batch_size: int, mesh: Mesh, key: str = "batch_size") -> int:
  """Returns the per-process batch size; raises if the mesh cannot split it.

  Args:
    key: the config key of `batch_size`, named in the error.
  """
  devices = mesh.devices.size
  if batch_size % devices:
    raise ValueError(
        f"config.{key}={batch_size} is invalid: it must be divisible by the "
        f"{devices} devices of the mesh.")
  if batch_size % jax.process_count():
    raise ValueError(
        f"config.{key}={batch_size} is invalid: it must be divisible by the "
        f"{jax.process_count()} processes.")
  return batch_size // jax.process_count()


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """Assembles this process's share of a batch into global, sharded arrays."""
  sharding = batch_sharded(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
      local_batch)
