r"""Plans a pre-training run for TPUs or NVIDIA GPUs, from any machine.

Compiles the real train step (the function `train.py` runs, with its shardings and
its donated state) and the eval step for the target's devices, with no accelerator
here, and reports per chip: the parameters and optimizer state, the batch, the
temporaries, their total against the chip's memory; the FLOPs of a step; and from
them the step time, the schedule's wall-clock hours and chip-hours at the stated
MFUs.

  python -m splitmask_jax.plan --config=configs/imagenet.py --target=v5e-16
  python -m splitmask_jax.plan --config=configs/imagenet.py:beit --target=h100-8
  python -m splitmask_jax.plan --config=configs/imagenet.py --config.model.variant=L/16 \
      --config.mesh.fsdp=16 --target=v5e-64

Targets: `runtime/targets.py` (TPU product names and topologies, several slices,
hosts of H100 / H200). The compilers come with `pip install -e '.[plan]'`.

How the figures are obtained:
  * memory: XLA's memory analysis of the compiled step, per device. TPUs: the
    program's peak (arguments, the state and batch shards, included) + code,
    the figure XLA itself checks against the chip; a TPU compile that does not
    fit fails in XLA, and its temporaries are then read from the error. GPUs:
    arguments + the temporary allocation + outputs not aliased to the donated
    state + code, compared with the 75% of the card that JAX's allocator takes
    by default (XLA_PYTHON_CLIENT_MEM_FRACTION raises it). The GPU compile here uses cuBLAS for every matmul (XLA's Triton
    GEMMs cannot be tiled without a device), which a GPU machine may replace by
    Triton kernels of about the same memory.
  * the largest per-chip batch that fits: memory is close to affine in the
    per-chip batch, so compiles at the config's batch and at twice or half of it
    give a line, whose prediction is compiled and refined (secant steps inside a
    bracket) until the batch is known to within 2% or --search_compiles are spent.
  * FLOPs: XLA's count of the step with the blocks unrolled and no
    rematerialisation (a scanned body would be counted once, and recomputation is
    not useful work), lowered but not compiled; per chip = total / chips.
  * time: FLOPs per chip / (the chip's bf16 peak x MFU), times the schedule's steps.

Exit status: 0 when the config fits its target, 3 when it does not (the message
says by how much and what would make it fit), 2 for a bad target or a missing
compiler, 1 for other errors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import sys
import time
from collections.abc import Callable
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from splitmask_jax import config_base
from splitmask_jax import loop
from splitmask_jax import objectives
from splitmask_jax import recipes
from splitmask_jax import train
from splitmask_jax import train_step as train_step_lib
from splitmask_jax.runtime import sharding
from splitmask_jax.runtime import targets

EXIT_DOES_NOT_FIT = 3
EXIT_BAD_TARGET = 2
# Training-set sizes of datasets no recipe lists, for schedules stated in epochs.
_KNOWN_TRAIN_SIZES = {"fashion_mnist": 60_000}
# XLA flag a deviceless GPU compile needs: its Triton GEMM tiling asks the device.
GPU_COMPILE_FLAG = "--xla_gpu_enable_triton_gemm=false"


@dataclasses.dataclass
class Memory:
  """Bytes per chip of one compiled step."""

  state: int  # parameters, optimizer state, codebook: this chip's shards
  batch: int  # this chip's shard of the batch
  temporaries: int
  total: int  # arguments + temporaries + unaliased outputs + code
  compile_s: float
  out_of_memory: bool = False  # XLA refused it; `temporaries` is from its message


@dataclasses.dataclass
class Plan:
  """What `plan` found; `report()` renders it."""

  config_summary: str
  target: targets.Target
  mesh_shape: dict[str, int]
  global_batch: int
  per_chip_batch: int  # examples per chip of one micro-batch (all of them when accum_steps is 1)
  num_params: int
  params_bytes: int  # per chip
  opt_state_bytes: int  # per chip
  train: Memory
  eval: Memory | None
  flops_per_step: float  # all chips
  total_steps: int
  mfus: tuple[float, ...]
  # The search's outcome, per chip: the largest batch that fitted (None when no
  # compile fitted; 0 when even 1 does not) and the smallest that did not.
  largest_batch: int | None = None
  smallest_refused: int | None = None
  largest_batch_note: str = ""
  accum_steps: int = 1  # config.accum_steps: micro-batches per update

  @property
  def capacity(self) -> int:
    return self.target.chip.usable_bytes

  @property
  def fits(self) -> bool:
    return _fits(self.train, self.capacity) and (
      self.eval is None or _fits(self.eval, self.capacity)
    )

  def step_seconds(self, mfu: float) -> float:
    return self.flops_per_step / self.target.num_chips / (self.target.chip.peak_flops * mfu)

  def report(self) -> str:
    chip, gib = self.target.chip, targets.GIB
    ev = self.eval

    def row(name, train_bytes, eval_bytes=None):
      cells = f"{train_bytes / gib:10.2f}"
      if eval_bytes is not None:
        cells += f"  {eval_bytes / gib:10.2f}"
      return f"  {name:<24} {cells}"

    lines = [
      f"Plan: {self.config_summary}",
      f"Target: {self.target.description}; mesh {self.mesh_shape}; global batch "
      f"{self.global_batch} ({self.per_chip_batch} per chip"
      + (f" in each of {self.accum_steps} micro-batches" if self.accum_steps > 1 else "")
      + f"); {self.num_params / 1e6:.3g}M "
      "parameters",
      "",
      "Memory per chip (GiB)       train step   eval step",
      row("parameters", self.params_bytes),
      row("optimizer state", self.opt_state_bytes),
      row("batch", self.train.batch, ev and ev.batch),
      row("temporaries", self.train.temporaries, ev and ev.temporaries),
      row("total", self.train.total, ev and ev.total)
      + ("  (XLA: out of memory)" if self.train.out_of_memory else ""),
      row(f"chip ({chip.name})", chip.memory_bytes)
      + (f"  (JAX's default share: {self.capacity / gib:.2f})" if chip.usable_fraction < 1 else ""),
      f"  {'fits':<24} {'yes' if self.fits else 'NO':>10}",
    ]
    if self.largest_batch_note:
      found = "not found" if self.largest_batch is None else str(self.largest_batch)
      lines.append(f"  {'largest per-chip batch':<24} {found:>10}  ({self.largest_batch_note})")
    per_chip = self.flops_per_step / self.target.num_chips
    lines += [
      "",
      f"FLOPs per step: {self.flops_per_step:.4g} in all, {per_chip:.4g} per chip, "
      f"{self.flops_per_step / self.global_batch / 1e9:.4g} GFLOP per image (XLA's count "
      "with the blocks unrolled, no recomputation)",
      f"Schedule: {self.total_steps:,} steps; chip peak {chip.peak_flops / 1e12:.0f} TFLOP/s bf16",
      "",
      "  MFU   step (s)   images/s   wall-clock (h)   chip-hours",
    ]
    for mfu in self.mfus:
      step = self.step_seconds(mfu)
      hours = step * self.total_steps / 3600
      lines.append(
        f"  {mfu:4.0%} {step:10.4g} {self.global_batch / step:10.0f} {hours:16.1f} "
        f"{hours * self.target.num_chips:12.0f}"
      )
    lines.append(
      f"Compile: train step {self.train.compile_s:.0f} s"
      + (f", eval step {ev.compile_s:.0f} s" if ev else "")
    )
    return "\n".join(lines)


def _fits(memory: Memory, capacity: int) -> bool:
  return not memory.out_of_memory and memory.total <= capacity


def _sharded_bytes(tree, shardings) -> int:
  """Bytes of one device's shards of every array of `tree` (shapes) laid out by `shardings`."""
  total = 0
  for leaf, sharding_ in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
    total += math.prod(sharding_.shard_shape(leaf.shape)) * np.dtype(leaf.dtype).itemsize
  return total


def train_size(config, given: int | None = None) -> int:
  """The number of training examples a schedule in epochs refers to.

  From `given`, Table 3 (recipes.DATASETS, by TFDS name), the known sizes, or the
  prepared dataset's own count, times `data.train_fraction`.
  """
  data = config.data
  size = given
  if size is None:
    by_name = {d.tfds_name: d.train_size for d in recipes.DATASETS.values()}
    size = by_name.get(data.dataset, _KNOWN_TRAIN_SIZES.get(data.dataset))
  if size is None:
    from splitmask_jax.data import datasets  # pylint: disable=import-outside-toplevel

    try:
      size = datasets.dataset_info(data.dataset, data.data_dir).num_examples[data.train_split]
    except (datasets.DatasetNotPreparedError, KeyError) as e:
      raise ValueError(
        f"The size of {data.dataset!r} is unknown here ({e}); pass --train_size=N."
      ) from None
  return max(1, round(size * data.train_fraction))


def _with_batch(config, batch_size: int):
  config = config.copy_and_resolve_references()
  config.unlock()
  config.batch_size = batch_size
  return config


def _abstract_inputs(config, parts: train.Training, mesh):
  """(state shapes, state shardings, state, batch): the step's inputs as
  ShapeDtypeStructs that carry its shardings."""
  state = train_step_lib.abstract_train_state(
    parts.model,
    parts.optimizer,
    train.codebook_shape(config),
    parts.example_inputs,
    parts.step.init_objective_state,
  )
  shardings = train_step_lib.state_shardings(state, mesh)
  state_in = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
  )
  batch_sharding = sharding.batch_sharded(mesh)
  batch = {
    key: jax.ShapeDtypeStruct(
      (config.batch_size, *value.shape), value.dtype, sharding=batch_sharding
    )
    for key, value in train.example_arrays(config, parts).items()
  }
  return state, shardings, state_in, batch


_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _out_of_memory_temporaries(message: str) -> int | None:
  """The temporaries XLA said a program needs, from a TPU out-of-memory error.

  None when the message is not an out-of-memory error; 0 when it is one without
  a figure.
  """
  if not re.search(r"RESOURCE_EXHAUSTED|[Oo]ut of memory|[Rr]an out of memory", message):
    return None
  for pattern in (
    r"required for HLO temporaries \((\d+(?:\.\d+)?)([KMGT])",
    r"[Uu]sed (\d+(?:\.\d+)?)([KMGT])",
  ):
    match = re.search(pattern, message)
    if match:
      return int(float(match.group(1)) * _UNITS[match.group(2)])
  return 0


def _compile(
  step, state_in, batch, state_bytes: int, batch_bytes: int, platform: str
) -> tuple[Memory, object]:
  """Compiles `step` for the abstract inputs: (its memory per device, the compiled
  step or None when XLA found it too large)."""
  t0 = time.time()
  try:
    compiled = step.lower(state_in, batch).compile()
  except Exception as e:  # pylint: disable=broad-except
    # XLA raises its runtime error type, whose module differs between versions.
    temporaries = _out_of_memory_temporaries(str(e))
    if temporaries is None:
      raise
    logging.info("XLA: %s", str(e).splitlines()[0][:300])
    total = state_bytes + batch_bytes + temporaries
    return Memory(state_bytes, batch_bytes, temporaries, total, time.time() - t0, True), None
  seconds = time.time() - t0
  m = compiled.memory_analysis()
  fixed = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
  peak = getattr(m, "peak_memory_in_bytes", 0)
  if peak and platform == "tpu":
    # XLA:TPU places buffers in HBM by their lifetimes and checks the program's
    # peak (arguments included) against the chip; the temporary allocation it
    # also reports adds buffers that are never live together.
    total = peak + m.generated_code_size_in_bytes
  else:
    # XLA:GPU allocates the temporaries as one block beside the arguments.
    total = fixed + m.temp_size_in_bytes + m.generated_code_size_in_bytes
  temporaries = max(0, total - fixed - m.generated_code_size_in_bytes)
  return Memory(state_bytes, batch_bytes, temporaries, total, seconds), compiled


def count_flops(config) -> float:
  """FLOPs of one train step of `config` over its whole global batch.

  XLA's cost analysis of the step lowered (not compiled) for one CPU device with
  the encoder blocks unrolled and no rematerialisation: a scanned body would be
  counted once, and recomputation is not useful work.
  """
  config = config.copy_and_resolve_references()
  config.unlock()
  config.model.scan = False
  config.model.remat = "none"
  config.accum_steps = 1  # a scanned micro-batch too; the same FLOPs over the global batch
  config.model.attention = "xla"
  mesh = sharding.make_mesh(
    ml_collections.ConfigDict({"data": 1, "fsdp": 1}), jax.devices("cpu")[:1]
  )
  parts = train.build_training(config, total_steps=1000, steps_per_epoch=10.0, platform="cpu")
  _, _, state_in, batch = _abstract_inputs(config, parts, mesh)
  cost = train.make_train_step(config, parts, mesh, state_in).lower(state_in, batch).cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per program
    cost = cost[0]
  return float(cost["flops"])


def largest_batch(
  measure: Callable[[int], Memory], known: dict[int, Memory], capacity: int, max_compiles: int = 5
) -> tuple[int | None, int | None, str]:
  """The largest per-chip batch whose step fits `capacity`, the smallest that does
  not, and how they were found.

  Memory is close to affine in the batch, so each step compiles where the line
  through the largest batch that fits and the smallest that does not (or, before
  both are known, the two nearest ones) meets the capacity.

  Args:
    measure: per-chip batch -> Memory (one compile each).
    known: the batches already compiled (the config's own).
    capacity: bytes per chip.
    max_compiles: compiles this search may add.
  Returns:
    (the largest batch that compiled and fitted: 0 when even 1 does not, None
    when no compile fitted within `max_compiles`; the smallest compiled batch that
    did not fit, None when all fitted; a note).
  """
  points = dict(known)

  def bracket():
    good = [b for b, m in points.items() if _fits(m, capacity)]
    bad = [b for b, m in points.items() if not _fits(m, capacity)]
    return max(good, default=0), min(bad, default=None)

  for _ in range(max_compiles):
    low, high = bracket()
    if high is not None and high - low <= max(1, low // 50):
      break
    good = sorted(b for b in points if _fits(points[b], capacity))
    if len(good) >= 2:  # the line through the two largest batches that fit
      ends = good[-2:]
    elif low and high is not None:
      ends = [low, high]
    else:  # nothing fits: the two smallest batches
      ends = sorted(points)[:2]
    guess = None
    if len(ends) == 2:
      (b1, m1), (b2, m2) = ((b, points[b]) for b in ends)
      slope = (m2.total - m1.total) / (b2 - b1)
      if slope > 0:
        guess = int(b1 + (capacity - m1.total) / slope)
    if high is None:  # grow, at most 16-fold a step: far from a compile the line bends
      guess = min(max(guess or 0, 2 * low), 16 * low)
    elif not low:
      guess = min(guess if guess is not None else high // 2, high // 2)
    elif guess is None or not low < guess < high or min(guess - low, high - guess) < 1:
      guess = int(math.sqrt(low * high))  # bisect (geometrically) instead
    guess = max(guess, 1)
    if guess in points:
      break
    points[guess] = measure(guess)
  low, high = bracket()
  tried = ", ".join(str(b) for b in sorted(points))
  note = f"compiled at {tried}" + (f"; {high} does not fit" if high is not None else "")
  if not low and 1 not in points:
    return None, high, note + f"; none fitted in {max_compiles} more compiles"
  return low, high, note


@contextlib.contextmanager
def _deviceless_cudnn(version: int):
  """Lets JAX emit cuDNN's fused attention while compiling for GPUs that are not here.

  JAX asks the cuDNN library for its version before it emits the kernel, and a
  machine without a GPU has no library to ask; the target machine's version is
  given instead. Where JAX's internals differ, nothing is patched and the
  lowering fails as it would without cuDNN.
  """
  try:
    from jax._src.cudnn import fused_attention_stablehlo as attention  # pylint: disable=g-import-not-at-top
  except ImportError:
    yield
    return
  original = getattr(attention, "check_cudnn_version", None)
  if original is None:
    yield
    return
  attention.check_cudnn_version = lambda: version
  try:
    yield
  finally:
    attention.check_cudnn_version = original


def plan(
  config,
  target_spec: str,
  *,
  mfus: Sequence[float] = (0.4, 0.5, 0.55),
  search_compiles: int = 5,
  train_examples: int | None = None,
  compile_eval: bool = True,
  cudnn_version: int = 90800,
  on_compiled: Callable[[object], None] | None = None,
) -> Plan:
  """Compiles `config`'s steps for `target_spec` and returns what they need.

  Args:
    search_compiles: compiles that may be spent finding the largest per-chip batch
      that fits (0: no search).
    cudnn_version: the cuDNN of the GPU machines (major * 10000 + minor * 100),
      which decides the attention kernels JAX emits there.
    on_compiled: called with the compiled train step (e.g. to read its text).

  Raises:
    targets.TargetError: an unknown target, or its compiler is not installed.
    ValueError: an invalid config or one the target's mesh cannot split.
  """
  config_base.validate_config(config)
  if config.task != "pretrain":
    raise ValueError(f"config.task={config.task!r}: the planner compiles pre-training steps.")
  target = targets.parse_target(target_spec)
  devices = targets.devices(target)
  mesh = sharding.make_mesh(config.mesh, devices)
  sharding.check_batch_size(config.batch_size, mesh, accum_steps=config.accum_steps)
  chips = mesh.devices.size
  if chips != target.num_chips:
    raise ValueError(
      f"config.mesh ({dict(config.mesh)}) uses {chips} of the {target.num_chips} chips of "
      f"{target_spec}: use -1 on one axis."
    )
  if config.num_steps is not None:
    total_steps, steps_per_epoch = int(config.num_steps), float(config.num_steps)
  else:
    total_steps, steps_per_epoch = loop.num_steps(config, train_size(config, train_examples))
  platform = target.chip.platform
  # JAX asks for cuDNN's version while tracing (the attention kernel), for the whole plan.
  with _deviceless_cudnn(cudnn_version) if platform == "gpu" else contextlib.nullcontext():
    # A per-chip batch is that of one micro-batch: accumulation keeps the
    # micro-batch's memory whatever the number of micro-batches.
    accum = config.accum_steps

    def build(per_chip: int):
      cfg = _with_batch(config, per_chip * chips * accum)
      parts = train.build_training(cfg, total_steps, steps_per_epoch, platform)
      state, shardings, state_in, batch = _abstract_inputs(cfg, parts, mesh)
      batch_bytes = _sharded_bytes(batch, jax.tree.map(lambda b: b.sharding, batch))
      return cfg, parts, state, shardings, state_in, batch, batch_bytes

    def measure(per_chip: int, callback=None) -> Memory:
      cfg, parts, state, shardings, state_in, batch, batch_bytes = build(per_chip)
      step = train.make_train_step(cfg, parts, mesh, state_in)
      memory, compiled = _compile(
        step, state_in, batch, _sharded_bytes(state, shardings), batch_bytes, platform
      )
      if callback is not None and compiled is not None:
        callback(compiled)
      logging.info(
        "Per-chip batch %d: %.2f GiB per chip%s (compiled in %.0f s)",
        per_chip,
        memory.total / targets.GIB,
        ", out of memory" if memory.out_of_memory else "",
        memory.compile_s,
      )
      return memory

    per_chip = config.batch_size // chips // accum
    train_memory = measure(per_chip, on_compiled)
    _, parts, state, shardings, state_in, batch, batch_bytes = build(per_chip)
    eval_memory = None
    if compile_eval:
      eval_memory, _ = _compile(
        train.make_eval_step(parts, mesh, state_in),
        state_in,
        batch,
        _sharded_bytes(state, shardings),
        batch_bytes,
        platform,
      )
    # The pixel objectives and DINO build no codebook: no vocabulary to report.
    uses_words = objectives.get(config.objective).USES_TOKENIZER
    vocabulary = f"vocabulary {config.tokenizer.vocab_size}, " if uses_words else ""
    result = Plan(
      config_summary=(
        f"{config.objective} {config.model.variant} at {config.model.image_size} px, "
        f"{config.model.dtype}, {vocabulary}scan={config.model.scan}, "
        f"remat={config.model.remat}, attention={config.model.attention}"
      ),
      target=target,
      mesh_shape=dict(mesh.shape),
      global_batch=config.batch_size,
      per_chip_batch=per_chip,
      num_params=sum(math.prod(x.shape) for x in jax.tree.leaves(state.params)),
      params_bytes=_sharded_bytes(state.params, shardings.params),
      opt_state_bytes=_sharded_bytes(state.opt_state, shardings.opt_state),
      train=train_memory,
      eval=eval_memory,
      flops_per_step=count_flops(config),
      total_steps=total_steps,
      mfus=tuple(mfus),
      accum_steps=accum,
    )
    if search_compiles:
      result.largest_batch, result.smallest_refused, result.largest_batch_note = largest_batch(
        measure, {per_chip: train_memory}, result.capacity, max_compiles=search_compiles
      )
    return result


def advice(result: Plan) -> str:
  """Why a plan does not fit, and what would make it fit."""
  gib = targets.GIB
  need = max(result.train.total, result.eval.total if result.eval else 0)
  chip = result.target.chip
  lines = [
    f"Does not fit: the train step needs {need / gib:.2f} GiB per chip"
    + (" (XLA refused to compile it)" if result.train.out_of_memory else "")
    + f"; one {chip.name} chip has {result.capacity / gib:.2f} GiB"
    + (" for JAX by default" if chip.usable_fraction < 1 else "")
    + ".",
    "What would make it fit:",
  ]
  if result.largest_batch:
    lines.append(
      f"  - a per-chip batch of at most {result.largest_batch}, now {result.per_chip_batch} "
      f"(--config.batch_size="
      f"{result.largest_batch * result.target.num_chips * result.accum_steps}; "
      f"{result.largest_batch_note})"
    )
    # The same global batch in more, smaller micro-batches: the fewest that fit.
    per_update = result.per_chip_batch * result.accum_steps
    accum = next(
      k
      for k in range(1, per_update + 1)
      if not per_update % k and per_update // k <= result.largest_batch
    )
    if accum > result.accum_steps:
      lines.append(
        f"  - or the same global batch in {accum} micro-batches (--config.accum_steps={accum}, "
        f"now {result.accum_steps}; SplitMask's match then has fewer negatives per image)"
      )
  elif result.largest_batch == 0:
    lines.append("  - no per-chip batch fits as the model is laid out now")
  elif result.largest_batch_note:
    lines.append(
      f"  - a per-chip batch below {result.smallest_refused} ({result.largest_batch_note}; "
      "--search_compiles allows more)"
    )
  fsdp = result.mesh_shape.get(sharding.FSDP_AXIS, 1)
  state = result.params_bytes + result.opt_state_bytes
  if fsdp < result.target.num_chips and state > 0.1 * result.capacity:
    lines.append(
      f"  - more fsdp (--config.mesh.fsdp={min(fsdp * 4, result.target.num_chips)}, now "
      f"{fsdp}): parameters and optimizer state take {state / gib:.2f} GiB per chip"
    )
  lines.append(
    "  - rematerialisation (--config.model.remat=full, or save_dots): the temporaries take "
    f"{result.train.temporaries / gib:.2f} GiB per chip"
  )
  if chip.usable_fraction < 1:
    lines.append("  - XLA_PYTHON_CLIENT_MEM_FRACTION=0.95, to let JAX take more of the card")
  lines.append("  - a larger target: more chips for the same global batch")
  return "\n".join(lines)


def _define_flags() -> dict:
  """The command's flags (defined only when it runs: `main.py` defines `--config` too)."""
  return dict(
    config=config_flags.DEFINE_config_file(
      "config", None, "Path to a config file.", lock_config=True
    ),
    target=flags.DEFINE_string("target", None, targets.TARGET_HELP, required=True),
    mfu=flags.DEFINE_list("mfu", ["0.4", "0.5", "0.55"], "MFUs to predict times at."),
    search_compiles=flags.DEFINE_integer(
      "search_compiles",
      5,
      "Compiles that may be spent finding the largest per-chip batch that fits (0: none).",
    ),
    train_size=flags.DEFINE_integer(
      "train_size",
      None,
      "Training examples, for a schedule in epochs of a dataset the planner does not know.",
    ),
    cudnn_version=flags.DEFINE_integer(
      "cudnn_version", 90800, "GPU targets: the cuDNN version there (major*10000 + minor*100)."
    ),
  )


def main(argv, flag_values):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if flag_values["config"].value is None:
    raise app.UsageError("--config is required.")
  try:
    result = plan(
      flag_values["config"].value,
      flag_values["target"].value,
      mfus=[float(m) for m in flag_values["mfu"].value],
      search_compiles=flag_values["search_compiles"].value,
      train_examples=flag_values["train_size"].value,
      cudnn_version=flag_values["cudnn_version"].value,
    )
  except targets.TargetError as e:
    print(f"Error: {e}", file=sys.stderr)
    sys.exit(EXIT_BAD_TARGET)
  print(result.report())
  if not result.fits:
    print("\n" + advice(result), file=sys.stderr)
    sys.exit(EXIT_DOES_NOT_FIT)


if __name__ == "__main__":
  # The planner compiles for its target's devices and never runs on this machine's;
  # XLA reads its flags when its first client starts, which has not happened yet.
  jax.config.update("jax_platforms", "cpu")
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {GPU_COMPILE_FLAG}".strip()
  _FLAGS = _define_flags()
  app.run(lambda argv: main(argv, _FLAGS))
