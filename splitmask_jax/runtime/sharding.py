"""The device mesh and how arrays are laid out on it.

The mesh has two axes: `data` and `fsdp`. Batches are split along their first
dimension over both axes, so every device holds a distinct slice of the global
batch. Parameters, optimizer state and the codebook are sharded over `fsdp`
(fully sharded data parallelism: each of the `fsdp` devices of a data replica
holds 1/fsdp of every large array, and XLA gathers weights where a step uses
them) and replicated over `data`. With `fsdp` = 1 this is plain data
parallelism. The step functions are written for global arrays, so the same code
runs on one CPU, on N fake CPU devices, on a GPU or across hosts; only the mesh
changes.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)
# Arrays smaller than this many elements stay replicated: gathering a bias or a
# norm scale costs more in latency than its copies cost in memory.
MIN_FSDP_SIZE = 2**10


def check_mesh_config(mesh_config) -> None:
  """Raises ValueError unless `mesh_config.data` and `.fsdp` are sizes or -1 (not both)."""
  for key in ("data", "fsdp"):
    value = mesh_config[key]
    if value == 0 or value < -1:
      raise ValueError(
        f"config.mesh.{key}={value!r} is invalid: use a positive size "
        "or -1 (the rest of the devices)."
      )
  if mesh_config.data == -1 and mesh_config.fsdp == -1:
    raise ValueError(
      "config.mesh.data=-1 and config.mesh.fsdp=-1 are invalid together: "
      "at most one axis can take the rest of the devices."
    )


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, int]:
  """(data, fsdp) sizes from `mesh_config.data` and `.fsdp` (-1: the rest).

  The mesh uses the first data * fsdp devices, a divisor of `num_devices`.
  """
  check_mesh_config(mesh_config)
  data, fsdp = mesh_config.data, mesh_config.fsdp
  if data == -1 or fsdp == -1:
    known_key, known = ("fsdp", fsdp) if data == -1 else ("data", data)
    if num_devices % known:
      raise ValueError(
        f"config.mesh.{known_key}={known!r} is invalid: it must divide the {num_devices} devices."
      )
    rest = num_devices // known
    data, fsdp = (rest, fsdp) if data == -1 else (data, rest)
  if num_devices % (data * fsdp):
    raise ValueError(
      f"config.mesh.data={mesh_config.data!r}, config.mesh.fsdp={mesh_config.fsdp!r} "
      f"are invalid: data * fsdp = {data * fsdp} must divide the {num_devices} devices "
      "(use -1 on one axis for the rest)."
    )
  return data, fsdp


def make_mesh(mesh_config, devices=None) -> Mesh:
  """A ('data', 'fsdp') mesh over `devices` (default: all devices of all hosts).

  Args:
    mesh_config: has `data` and `fsdp`, the sizes of the two axes; -1 on one of
      them gives it the rest of the devices.
    devices: optional explicit device list (tests build meshes over subsets).
      With several processes the mesh must span every device, so that each
      process feeds its own devices.
  """
  devices = list(jax.devices() if devices is None else devices)
  data, fsdp = mesh_shape(mesh_config, len(devices))
  if jax.process_count() > 1 and data * fsdp != jax.device_count():
    raise ValueError(
      f"config.mesh.data={mesh_config.data!r}, config.mesh.fsdp={mesh_config.fsdp!r} "
      f"are invalid with {jax.process_count()} processes: the mesh must span all "
      f"{jax.device_count()} devices."
    )
  devices = devices[: data * fsdp]
  # Auto axes: XLA's sharding propagation places the gathers and reductions.
  axis_types = (AxisType.Auto, AxisType.Auto)
  slices = len({getattr(d, "slice_index", 0) for d in devices})
  if slices > 1:
    # Several TPU slices talk over the data-centre network: only the data axis,
    # whose one all-reduce per step tolerates it, spans them.
    if data % slices:
      raise ValueError(
        f"config.mesh.data={data} must be a multiple of the {slices} slices: only the data "
        "axis spans slices."
      )
    grid = mesh_utils.create_hybrid_device_mesh(
      (data // slices, fsdp), (slices, 1), devices, allow_split_physical_axes=True
    )
    return Mesh(grid, (DATA_AXIS, FSDP_AXIS), axis_types=axis_types)
  return jax.make_mesh((data, fsdp), (DATA_AXIS, FSDP_AXIS), axis_types=axis_types, devices=devices)


def platform_of(devices) -> str:
  """'cpu', 'gpu' or 'tpu': the kind of the first of `devices` (a list or a Mesh)."""
  first = devices.devices.flat[0] if isinstance(devices, Mesh) else list(devices)[0]
  return _PLATFORMS.get(first.platform, first.platform)


def default_platform() -> str:
  """'cpu', 'gpu' or 'tpu': the kind of JAX's default devices."""
  return _PLATFORMS.get(jax.default_backend(), jax.default_backend())


# JAX's platform names of NVIDIA and AMD devices.
_PLATFORMS = {"cuda": "gpu", "rocm": "gpu"}


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over every device of the mesh."""
  return NamedSharding(mesh, P(BATCH_AXES))


def fsdp_spec(
  shape: tuple[int, ...], fsdp_size: int, min_size: int = MIN_FSDP_SIZE, first_dim: int = 0
) -> P:
  """Where an array of `shape` is split over the fsdp axis.

  The largest dimension divisible by `fsdp_size` is split (the first of equals);
  arrays below `min_size` elements, with no divisible dimension, or with an fsdp
  axis of one device are replicated.

  Args:
    shape: the array's shape.
    fsdp_size: devices on the fsdp axis.
    min_size: the fewest elements an array needs to be split.
    first_dim: dimensions before it are never split (1 for a stack of scanned
      layers, whose leading axis a scan slices one layer at a time).
  Returns:
    a PartitionSpec naming FSDP_AXIS at most once.
  """
  if fsdp_size == 1 or math.prod(shape) < min_size:
    return P()
  divisible = [i for i, d in enumerate(shape) if i >= first_dim and d % fsdp_size == 0]
  if not divisible:
    return P()
  dim = max(divisible, key=lambda i: shape[i])
  return P(*(FSDP_AXIS if i == dim else None for i in range(len(shape))))


# The parameters (and optimizer moments) of scanned layers sit below this name,
# stacked on a leading axis of layers (vit.Encoder.scan).
SCANNED = "blocks"


def fsdp_shardings(tree, mesh: Mesh):
  """NamedShardings of every array of `tree` (arrays or ShapeDtypeStructs) by `fsdp_spec`;
  the leading (layer) axis of scanned layers stays whole."""
  fsdp_size = mesh.shape[FSDP_AXIS]

  def spec(path, x):
    scanned = any(getattr(k, "key", getattr(k, "name", None)) == SCANNED for k in path)
    return NamedSharding(mesh, fsdp_spec(x.shape, fsdp_size, first_dim=int(scanned)))

  return jax.tree_util.tree_map_with_path(spec, tree)


def check_batch_size(
  batch_size: int, mesh: Mesh, key: str = "batch_size", accum_steps: int = 1
) -> int:
  """Returns the per-process batch size; raises if the mesh cannot split it.

  Args:
    key: the config key of `batch_size`, named in the error.
    accum_steps: micro-batches per update (config.accum_steps), each of which the
      mesh must split.
  """
  devices = mesh.devices.size
  if accum_steps > 1 and (batch_size % accum_steps or (batch_size // accum_steps) % devices):
    raise ValueError(
      f"config.{key}={batch_size} with config.accum_steps={accum_steps} is invalid: "
      f"each micro-batch of {key} / accum_steps examples must be divisible by the "
      f"{devices} devices of the mesh (use a {key} that is a multiple of "
      f"{accum_steps * devices}, or fewer accum_steps)."
    )
  if batch_size % devices:
    raise ValueError(
      f"config.{key}={batch_size} is invalid: it must be divisible by the "
      f"{devices} devices of the mesh."
    )
  if batch_size % jax.process_count():
    raise ValueError(
      f"config.{key}={batch_size} is invalid: it must be divisible by the "
      f"{jax.process_count()} processes."
    )
  return batch_size // jax.process_count()


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """Assembles this process's share of a batch into global, sharded arrays.

  Each process's rows land on its own devices; the global batch holds every
  process's rows, in process order when the mesh lists devices in that order.
  """
  sharding = batch_sharded(mesh)
  return jax.tree.map(
    lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch
  )
