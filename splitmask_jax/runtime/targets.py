"""Accelerator targets to compile for on a machine that has none of them.

A target is a TPU slice (or several) or hosts of NVIDIA GPUs, named as users know
them: `v5e-16`, `v5p-128`, `v4-8`, `v6e-256` (Cloud TPU's product names),
`v5e:4x4`, `v4:2x2x1` (topologies), `2xv5e-256` (two slices), `h100-8` (one host of
eight H100s), `h100:2x8` (two hosts of eight), `h200-8`. `devices(target)` gives
JAX's compile-only devices of that target, from which a mesh is built and a
step compiled exactly as on the real machines (`jax.jit(...).lower(...).compile()`).

Deviceless compilation needs the target's compiler: libtpu for TPUs, the CUDA
PJRT plugin for GPUs (`pip install -e '.[plan]'`, which installs the versions of
the installed jax). The GPU compiler also needs a description of the card
(`gpu_descriptions/*.txtpb`, XLA's GpuTargetConfigProto in text form).

Chip figures are the vendors' bf16 dense peaks and memory sizes; they are what a
predicted step time and a memory check are measured against.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import os
import pathlib
import re

_DESCRIPTIONS = pathlib.Path(__file__).parent / "gpu_descriptions"
GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator chip.

  Attributes:
    name: as users write it ('v5e', 'h100').
    platform: 'tpu' or 'gpu'.
    peak_flops: bf16 dense matmul peak, FLOP/s.
    memory_bytes: memory per chip.
    usable_fraction: the share of `memory_bytes` a JAX program may use by default
      (GPUs: the client preallocates 75%; TPUs: the compiler's own limit applies).
  """

  name: str
  platform: str
  peak_flops: float
  memory_bytes: int
  usable_fraction: float = 1.0

  @property
  def usable_bytes(self) -> int:
    return int(self.memory_bytes * self.usable_fraction)


# Per-chip vendor figures (TPU: Cloud TPU system architecture pages; GPU: NVIDIA's
# data sheets, SXM parts, dense bf16). H200: 141 GB of HBM3e, as a card reports it.
CHIPS = {
  "v4": Chip("v4", "tpu", 275e12, 32 * GIB),
  "v5e": Chip("v5e", "tpu", 197e12, 16 * GIB),
  "v5p": Chip("v5p", "tpu", 459e12, 95 * GIB),
  "v6e": Chip("v6e", "tpu", 918e12, 32 * GIB),
  "h100": Chip("h100", "gpu", 989e12, 84_942_979_072, usable_fraction=0.75),
  "h200": Chip("h200", "gpu", 989e12, 143_771 * 2**20, usable_fraction=0.75),
}
# The topology-name prefix libtpu knows each TPU generation by.
_TPU_TOPOLOGY_PREFIX = {"v4": "v4", "v5e": "v5e", "v5p": "v5", "v6e": "v6e"}
# Generations whose product names count TensorCores (two per chip), and which
# libtpu describes per core unless asked for "megacore" chips.
_MEGACORE = ("v4", "v5p")
# The 2D slices of v5e / v6e (chips) and the 3D ones of v4 / v5p (chips), by size.
_SHAPES_2D = {
  1: "1x1",
  4: "2x2",
  8: "2x4",
  16: "4x4",
  32: "4x8",
  64: "8x8",
  128: "8x16",
  256: "16x16",
}
_SHAPES_3D = {
  4: "2x2x1",
  8: "2x2x2",
  16: "2x2x4",
  32: "2x4x4",
  64: "4x4x4",
  128: "4x4x8",
  256: "4x8x8",
  512: "8x8x8",
  1024: "8x8x16",
  2048: "8x16x16",
  4096: "16x16x16",
}
GPUS_PER_HOST = 8

TARGET_HELP = (
  "a TPU slice by product name (v5e-16, v5p-128, v4-8, v6e-256; 'v5litepod-16' too) or "
  "topology (v5e:4x4, v4:2x2x1, v5p:2x2x2), optionally 'Nx' before it for N slices "
  "(2xv5e-256); or NVIDIA GPUs: h100 (one), h100-16 (16, in hosts of 8), h100:2x8 "
  "(hosts x GPUs per host), likewise h200"
)


class TargetError(ValueError):
  """A target name that cannot be read, or a compiler that is not installed."""


@dataclasses.dataclass(frozen=True)
class Target:
  """A parsed target.

  Attributes:
    spec: the name the user gave.
    chip: the chip's figures.
    topology: libtpu's topology name ('v5e:4x4') or the GPU grid ('2x8': hosts x
      GPUs per host).
    num_slices: TPU slices (1 for GPUs).
    num_chips: chips in all.
  """

  spec: str
  chip: Chip
  topology: str
  num_slices: int
  num_chips: int

  @property
  def description(self) -> str:
    if self.chip.platform == "gpu":
      hosts, per_host = self.topology.split("x")
      return f"{self.num_chips} {self.chip.name.upper()} ({hosts} host(s) of {per_host})"
    slices = f"{self.num_slices} slices of " if self.num_slices > 1 else ""
    return f"{slices}TPU {self.topology} ({self.num_chips} {self.chip.name} chips)"


def _chips_in(shape: str) -> int:
  count = 1
  for side in shape.split("x"):
    count *= int(side)
  return count


def parse_target(spec: str) -> Target:
  """Reads a target name (see TARGET_HELP); raises TargetError naming what is wrong."""
  text = spec.strip().lower()
  slices = 1
  match = re.fullmatch(r"(\d+)x([a-z].*)", text)
  if match:
    slices, text = int(match.group(1)), match.group(2)
  text = text.replace("v5litepod", "v5e")
  gpu = re.fullmatch(r"(h100|h200)(?:-(\d+)|:(\d+)x(\d+))?", text)
  if gpu:
    if slices != 1:
      raise TargetError(
        f"Target {spec!r}: slices ('Nx') are a TPU notion; give GPU hosts as h100:HOSTSxGPUS."
      )
    name, total, hosts, per_host = gpu.groups()
    if hosts:
      hosts, per_host = int(hosts), int(per_host)
    else:
      total = int(total or 1)
      hosts, per_host = max(1, total // GPUS_PER_HOST), min(total, GPUS_PER_HOST)
      if hosts * per_host != total:
        raise TargetError(
          f"Target {spec!r}: {total} GPUs do not fill hosts of "
          f"{GPUS_PER_HOST}; write h100:HOSTSxGPUS."
        )
    if hosts < 1 or not 1 <= per_host <= GPUS_PER_HOST:
      raise TargetError(f"Target {spec!r}: 1 to {GPUS_PER_HOST} GPUs per host.")
    return Target(spec, CHIPS[name], f"{hosts}x{per_host}", 1, hosts * per_host)
  product = re.fullmatch(r"(v4|v5e|v5p|v6e)-(\d+)", text)
  topology = re.fullmatch(r"(v4|v5e|v5p|v5|v6e):(\d+(?:x\d+)+)", text)
  if product:
    generation, count = product.group(1), int(product.group(2))
    chips = count // 2 if generation in _MEGACORE else count
    shapes = _SHAPES_3D if generation in _MEGACORE else _SHAPES_2D
    if generation in _MEGACORE and count % 2 or chips not in shapes:
      sizes = [2 * n if generation in _MEGACORE else n for n in shapes]
      raise TargetError(f"Target {spec!r}: {generation} slices come in sizes {sizes}.")
    shape = shapes[chips]
  elif topology:
    generation, shape = topology.groups()
    generation = "v5p" if generation == "v5" else generation
    dims = 3 if generation in _MEGACORE else 2
    if shape.count("x") != dims - 1:
      raise TargetError(f"Target {spec!r}: a {generation} topology has {dims} dimensions.")
  else:
    raise TargetError(f"Unknown target {spec!r}: expected {TARGET_HELP}.")
  if slices < 1:
    raise TargetError(f"Target {spec!r}: at least one slice.")
  chips = _chips_in(shape) * slices
  return Target(
    spec, CHIPS[generation], f"{_TPU_TOPOLOGY_PREFIX[generation]}:{shape}", slices, chips
  )


def _missing(module: str) -> bool:
  return importlib.util.find_spec(module) is None


def check_compiler(target: Target) -> None:
  """Raises TargetError saying what to install when the target's compiler is missing."""
  if target.chip.platform == "tpu" and _missing("libtpu"):
    raise TargetError(
      f"Compiling for {target.spec} needs libtpu, the TPU compiler (no TPU needed): "
      "pip install -e '.[plan]' (or pip install 'jax[tpu]' for the installed jax)."
    )
  if target.chip.platform == "gpu" and _missing("jax_plugins.xla_cuda12"):
    raise TargetError(
      f"Compiling for {target.spec} needs the CUDA compiler plugin of the installed jax "
      "(no GPU needed): pip install -e '.[plan]' (or pip install 'jax[cuda12-local]')."
    )


@functools.cache
def _gpu_description(chip: str) -> str:
  """The GpuTargetConfigProto text of a card; the H200 is the H100's with its memory."""
  text = (_DESCRIPTIONS / "h100_sxm.txtpb").read_text()
  if chip == "h200":
    text = re.sub(
      r"device_memory_size: \d+", f"device_memory_size: {CHIPS['h200'].memory_bytes}", text
    )
    text = re.sub(r"memory_bandwidth: \d+", "memory_bandwidth: 4800000000000", text)
  return text


@contextlib.contextmanager
def _environment(**values: str):
  """Sets environment variables (unless set) for the duration of a compiler's start-up
  only: later processes this one starts (a training run) must not see them."""
  added = {k: v for k, v in values.items() if k not in os.environ}
  os.environ.update(added)
  try:
    yield
  finally:
    for key in added:
      os.environ.pop(key, None)


def devices(target: Target) -> list:
  """JAX's compile-only devices of `target`, in an order `jax.make_mesh` accepts.

  Raises:
    TargetError: the target's compiler is not installed.
  """
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

  check_compiler(target)
  if target.chip.platform == "gpu":
    # Without it the plugin checks the CUDA libraries of a GPU machine and refuses
    # to load on one that has none.
    with _environment(JAX_SKIP_CUDA_CONSTRAINTS_CHECK="1"):
      return list(
        topologies.get_topology_desc(
          platform="cuda",
          topology_name=target.chip.name,
          target_config=_gpu_description(target.chip.name),
          topology=f"1x{target.topology}",
        ).devices
      )
  kwargs = {}
  if target.chip.name in _MEGACORE:
    # One device per chip (both TensorCores), as a TPU VM's JAX sees them.
    kwargs = dict(chip_config_name="megacore", chips_per_host_bounds=(2, 2, 1))
  # libtpu asks the machine which TPU it is on (saying one keeps it from warning),
  # and its lock file guards real TPUs against two processes: compiling needs none.
  with _environment(
    TPU_ACCELERATOR_TYPE="v5litepod-1",
    TPU_WORKER_HOSTNAMES="localhost",
    ALLOW_MULTIPLE_LIBTPU_LOAD="1",
  ):
    return list(
      topologies.get_topology_desc(
        platform="tpu", topology_name=target.topology, num_slices=target.num_slices, **kwargs
      ).devices
    )
