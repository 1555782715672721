r"""Throughput of the pre-training step: images/s, TFLOP/s and MFU, with a PyTorch peer.

For each model config (`VARIANT@IMAGE_SIZE`, e.g. `B/16@224`) and objective it
builds the run's real train step (train.build_training and make_train_step: AdamW,
clipping, the objective's loss and state) over all local devices, feeds it one
fixed synthetic batch (random pixels, or DINO's crops of them, and masks from the
real mask function) and times
steps after compilation. FLOPs per step are XLA's count of the step with the
blocks unrolled (plan.count_flops: a scanned body would be counted once); the
peak is a large matmul in the step's compute dtype measured on the same device,
so MFU = achieved FLOP/s / measured peak FLOP/s. `--scan`, `--attention` and
`--remat` set the model keys of the same names.

`--peer` times the same SplitMask step written with PyTorch and timm's ViT
(benchmarks/torch_peer.py) in the same run, alternately with JAX's
(`--peer_rounds` rounds: the machine's speed drifts between minutes), and reports
JAX's images/s over PyTorch's: the median of the rounds' ratios, their range in
brackets. `--pipeline_workers` times the grain input pipeline on its own
(Fashion-MNIST from TFDS: crop, flip, masks, batching).

  # CPU (2 cores): small configs, float32, the peer and the input pipeline.
  python -m benchmarks.throughput --configs=Test/8@32,Mini/8@32,Ti/8@64 \
      --batch_size=64 --vocab_size=512 --peer --pipeline_workers=0,2
  # One GPU: the paper's models in bfloat16.
  python -m benchmarks.throughput --configs=Ti/16@224,S/16@224,B/16@224,L/16@224 \
      --batch_size=256 --peer

Prints one Markdown table row per measurement and, with --json, writes them all.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import time
from collections.abc import Callable

if __name__ == "__main__":
  # As the entry point does, before JAX is imported: the figures are a run's.
  from splitmask_jax.runtime import host_memory

  host_memory.reexec_with_huge_pages()

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from splitmask_jax import config_base
from splitmask_jax import objectives
from splitmask_jax import plan
from splitmask_jax import tokenizers
from splitmask_jax import train
from splitmask_jax import train_step as train_step_lib
from splitmask_jax.data import datasets
from splitmask_jax.data import input_pipeline
from splitmask_jax.runtime import sharding


def make_config(
  spec: str,
  objective: str,
  *,
  batch_size: int,
  vocab_size: int,
  channels: int,
  dtype: str,
  scan: bool = True,
  attention: str = "auto",
  remat: str = "none",
):
  """A run config for `VARIANT@IMAGE_SIZE` with the paper's recipe otherwise.

  The tokenizer view has half the image's resolution, as in the paper (8 px
  token patches under 16 px ViT patches).
  """
  variant, size = spec.split("@")
  config = config_base.base_config()
  config.objective = objective
  config.model.variant = variant
  config.model.image_size = int(size)
  config.model.num_channels = channels
  config.model.dtype = dtype
  config.model.scan = scan
  config.model.attention = attention
  config.model.remat = remat
  config.tokenizer.vocab_size = vocab_size
  patch = int(variant.split("/")[1])
  config.tokenizer.patch_size = max(1, patch // 2)
  if objective in ("mae", "simmim"):
    config.masking.kind = "uniform"  # both papers draw their masks uniformly
  config.simmim.mask_patch_size = 2 * patch  # SimMIM's 32 px squares on 16 px patches
  if objective == "dino":
    # DINO's local crops are 96 px of its 224: the same fraction of the image,
    # in whole patches.
    config.dino.local_crop_size = max(patch, round(int(size) * 96 / 224 / patch) * patch)
  config.batch_size = batch_size
  config_base.validate_config(config)
  return config


def synthetic_batch(config, seed: int = 0, parts: train.Training | None = None) -> dict:
  """One host batch of `config`'s objective: uniform random pixels (or the
  objective's views of such images) and masks drawn by the run's mask function."""
  parts = parts or train.build_training(config, 10_000, 100.0)
  size, channels = config.model.image_size, config.model.num_channels
  rng = np.random.default_rng(seed)
  examples = []
  for _ in range(config.batch_size):
    image = rng.integers(0, 256, (size, size, channels), dtype=np.uint8)
    example = {"image": image} if parts.views_fn is None else parts.views_fn(image, rng)
    if parts.mask_fn is not None:
      example.update(parts.mask_fn(rng))
    examples.append(example)
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def _timed(run, steps: int, warmup: int, min_seconds: float = 3.0) -> float:
  """Seconds per call of `run` (which blocks until its work is done), after warmup.

  Times at least `steps` calls and at least `min_seconds`.
  """
  for _ in range(warmup):
    run()
  count, start = 0, time.perf_counter()
  while count < steps or time.perf_counter() - start < min_seconds:
    run()
    count += 1
  return (time.perf_counter() - start) / count


def jax_runner(config) -> tuple[Callable[[], None], dict]:
  """The compiled train step on a fixed batch, as a call that runs one step and
  waits for it, and {'flops_per_step' (all devices), 'compile_s', 'num_params'}."""
  mesh = sharding.make_mesh(config.mesh, jax.local_devices())
  parts = train.build_training(config, 10_000, 100.0, sharding.platform_of(mesh))
  codebook = tokenizers.random_projection_codebook(
    jax.random.PRNGKey(1), *train.codebook_shape(config)
  )
  host_batch = synthetic_batch(config, parts=parts)
  state = train_step_lib.init_train_state(
    parts.model,
    parts.optimizer,
    codebook,
    parts.example_inputs,
    jax.random.PRNGKey(0),
    mesh,
    parts.step.init_objective_state,
  )
  step = train.make_train_step(config, parts, mesh, state)
  batch = sharding.global_batch(host_batch, mesh)
  t0 = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  # XLA's count of the whole step with the blocks unrolled (a scanned body would
  # be counted once), for every device together.
  flops = plan.count_flops(config)
  holder = [state]

  def run():
    holder[0], metrics = compiled(holder[0], batch)
    jax.block_until_ready(metrics)

  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  return run, {"flops_per_step": flops, "compile_s": compile_s, "num_params": num_params}


def jax_step(
  config, run, info: dict, *, steps: int, warmup: int, trace_dir: str | None = None
) -> dict:
  """Times `jax_runner`'s step `run`; returns images/s and step_s beside its `info`.

  With `trace_dir`, `steps` more steps are traced there afterwards (XLA profiler).
  """
  seconds = _timed(run, steps, warmup)
  if trace_dir:
    _trace(run, steps, trace_dir)
  return {"images_per_sec": config.batch_size / seconds, "step_s": seconds, **info}


def _trace(run, steps: int, trace_dir: str) -> None:
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for _ in range(steps):
      run()


def torch_runner(config) -> tuple[Callable[[], None], dict]:
  """The PyTorch + timm peer of the SplitMask step on the same kind of batch, compiled
  (its first step, timed as 'first_step_s'), and where it runs."""
  from benchmarks import torch_peer  # pylint: disable=import-outside-toplevel

  step, setup = torch_peer.make_step(config, synthetic_batch(config))
  start = time.perf_counter()
  step()
  return step, {"first_step_s": time.perf_counter() - start, **setup}


def jax_against_peer(
  config,
  run,
  info: dict,
  *,
  steps: int,
  warmup: int,
  rounds: int,
  trace_dir: str | None = None,
) -> dict:
  """Times `jax_runner`'s step `run` and its PyTorch peer alternately, `rounds` times each.

  A shared machine's speed drifts by more than the gap being measured within
  minutes, so the two steps are never timed far apart: each round times JAX,
  then PyTorch, for `steps / rounds` steps (at least one, and a second) each,
  and the ratio is the median over rounds of the two rates of one round.

  Returns jax_step's keys (images/s and step_s from JAX's median round),
  'torch' ({'images_per_sec', 'step_s', 'first_step_s', ...}), 'jax_over_torch'
  (the median ratio) and 'jax_over_torch_range' (its lowest and highest round).
  """
  peer, setup = torch_runner(config)
  for _ in range(warmup):
    run()
    peer()
  per_round = max(1, -(-steps // rounds))
  times = [
    (_timed(run, per_round, 0, min_seconds=1.0), _timed(peer, per_round, 0, min_seconds=1.0))
    for _ in range(rounds)
  ]
  if trace_dir:
    _trace(run, steps, trace_dir)
  jax_s, torch_s = (float(np.median(t)) for t in zip(*times))
  ratios = [t_torch / t_jax for t_jax, t_torch in times]
  return {
    "images_per_sec": config.batch_size / jax_s,
    "step_s": jax_s,
    **info,
    "torch": {"images_per_sec": config.batch_size / torch_s, "step_s": torch_s, **setup},
    "rounds": times,
    "jax_over_torch": float(np.median(ratios)),
    "jax_over_torch_range": (min(ratios), max(ratios)),
  }


def matmul_peak(dtype: str, size: int, reps: int = 5) -> float:
  """FLOP/s of the fastest of `reps` size x size matmuls per local device (`dtype`)."""
  devices = jax.local_devices()
  # One independent matmul per device: a batch of them split over the devices.
  spec = NamedSharding(Mesh(np.asarray(devices), ("devices",)), P("devices"))
  a = jax.device_put(jnp.ones((len(devices), size, size), dtype), spec)
  matmul = jax.jit(lambda x: jnp.einsum("bij,bjk->bik", x, x), out_shardings=spec)
  matmul(a).block_until_ready()
  best = min(
    _timed(lambda: matmul(a).block_until_ready(), 1, 0, min_seconds=0) for _ in range(reps)
  )
  return 2 * size**3 / best


def pipeline(config, *, num_workers: int, batches: int, data_dir: str | None) -> float:
  """Images/s of the grain pre-training pipeline on Fashion-MNIST's train split."""
  datasets.prepare_dataset("fashion_mnist", data_dir)
  source = datasets.load_source("fashion_mnist", "train", data_dir)
  grid = config_base.grid_size(config)
  mask_fn = objectives.make_mask_fn(config, grid)
  data = iter(
    input_pipeline.pretrain_dataset(
      source,
      batch_size=config.batch_size,
      image_size=config.model.image_size,
      crop_scale=tuple(config.data.crop_scale),
      mask_fn=mask_fn,
      seed=0,
      num_workers=num_workers,
    )
  )
  seconds = _timed(lambda: next(data), batches, warmup=2 + num_workers)
  return config.batch_size / seconds


def _environment() -> dict:
  cpu = next(
    (
      line.split(":", 1)[1].strip()
      for line in open("/proc/cpuinfo")
      if line.startswith("model name")
    ),
    platform.processor(),
  )
  # A copy of the tree without its git folder (a rented machine's) is told its commit.
  commit = (
    os.environ.get("SPLITMASK_COMMIT")
    or subprocess.run(
      ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
  )
  dirty = subprocess.run(
    ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
  ).stdout.strip()
  device = jax.local_devices()[0]
  return {
    "date": datetime.datetime.now().astimezone().isoformat(timespec="minutes"),
    "commit": commit + ("-dirty" if dirty else ""),
    "cpu": cpu,
    "cpu_count": os.cpu_count(),
    "load_avg_1m": os.getloadavg()[0],
    "device": f"{jax.local_device_count()} x {device.device_kind}",
    "platform": device.platform,
    "jax": jax.__version__,
    "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
  }


_CONFIGS = flags.DEFINE_list(
  "configs",
  ["Test/8@32", "Mini/8@32", "Ti/8@64"],
  "Model configs as VARIANT@IMAGE_SIZE, e.g. B/16@224.",
)
_OBJECTIVES = flags.DEFINE_list("objectives", list(config_base.OBJECTIVES), "Objectives to time.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Global batch size.")
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 8192, "Visual words.")
_CHANNELS = flags.DEFINE_integer("channels", 3, "Image channels of the step benchmark.")
_DTYPE = flags.DEFINE_string(
  "dtype", None, "Compute dtype; default float32 on CPU, bfloat16 elsewhere."
)
_SCAN = flags.DEFINE_bool("scan", True, "config.model.scan: the encoder's blocks under nn.scan.")
_ATTENTION = flags.DEFINE_string("attention", "auto", "config.model.attention: auto, xla, cudnn.")
_REMAT = flags.DEFINE_string("remat", "none", "config.model.remat: none, full, save_dots.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compiling.")
_MATMUL_SIZE = flags.DEFINE_integer(
  "matmul_size", None, "Side of the peak matmul; default 2048 on CPU, 8192 elsewhere."
)
_PEER = flags.DEFINE_bool(
  "peer", False, "Also time the PyTorch + timm SplitMask step, alternately with JAX's."
)
_PEER_ROUNDS = flags.DEFINE_integer(
  "peer_rounds", 5, "Alternate rounds of JAX and PyTorch timing with --peer."
)
_PIPELINE_WORKERS = flags.DEFINE_list(
  "pipeline_workers", [], "Time the input pipeline with these numbers of workers."
)
_PIPELINE_BATCHES = flags.DEFINE_integer("pipeline_batches", 100, "Timed pipeline batches.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data dir of the pipeline benchmark.")
_JSON = flags.DEFINE_string("json", None, "Write every measurement to this file.")
_TRACE_DIR = flags.DEFINE_string(
  "trace_dir", None, "Trace --steps JAX steps of each measurement in TRACE_DIR/CONFIG/OBJECTIVE."
)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  for objective in _OBJECTIVES.value:
    if objective not in config_base.OBJECTIVES:
      raise app.UsageError(f"--objectives: {objective!r} is not one of {config_base.OBJECTIVES}")
  env = _environment()
  on_cpu = env["platform"] == "cpu"
  dtype = _DTYPE.value or ("float32" if on_cpu else "bfloat16")
  peak = matmul_peak(dtype, _MATMUL_SIZE.value or (2048 if on_cpu else 8192))
  batch_size = _BATCH_SIZE.value
  print(f"{env}\npeak {dtype} matmul: {peak / 1e12:.3f} TFLOP/s per device\n")
  print(
    "| config | objective | params | batch | JAX img/s | TFLOP/s | MFU | "
    "PyTorch img/s | JAX / PyTorch |"
  )
  print("|---|---|---|---|---|---|---|---|---|")
  rows = []
  for spec in _CONFIGS.value:
    for objective in _OBJECTIVES.value:
      config = make_config(
        spec,
        objective,
        batch_size=batch_size,
        vocab_size=_VOCAB_SIZE.value,
        channels=_CHANNELS.value,
        dtype=dtype,
        scan=_SCAN.value,
        attention=_ATTENTION.value,
        remat=_REMAT.value,
      )
      row = {
        "config": spec,
        "objective": objective,
        "batch_size": batch_size,
        "vocab_size": _VOCAB_SIZE.value,
        "dtype": dtype,
        "scan": _SCAN.value,
        "attention": _ATTENTION.value,
        "remat": _REMAT.value,
      }
      timing = dict(
        steps=_STEPS.value,
        warmup=_WARMUP.value,
        trace_dir=_TRACE_DIR.value
        and os.path.join(_TRACE_DIR.value, spec.replace("/", "_"), objective),
      )
      run, info = jax_runner(config)
      peer = "- | -"
      measured = None
      if _PEER.value and objective == "splitmask":
        try:
          measured = jax_against_peer(config, run, info, rounds=_PEER_ROUNDS.value, **timing)
        except Exception as e:  # pylint: disable=broad-except
          # The peer is a comparison: its failure (no torch, out of memory) is
          # reported beside the JAX figures, which stand on their own.
          row["torch_error"] = f"{type(e).__name__}: {e}"[:500]
          peer = "failed | -"
        else:
          low, high = measured["jax_over_torch_range"]
          peer = (
            f"{measured['torch']['images_per_sec']:.1f} | "
            f"{measured['jax_over_torch']:.2f} ({low:.2f}-{high:.2f})"
          )
      row.update(measured or jax_step(config, run, info, **timing))
      row["tflops"] = row["flops_per_step"] / row["step_s"] / 1e12
      row["mfu"] = row["tflops"] * 1e12 / (peak * jax.local_device_count())
      rows.append(row)
      print(
        f"| {spec} | {objective} | {row['num_params'] / 1e6:.2f}M | {batch_size} | "
        f"{row['images_per_sec']:.1f} | {row['tflops']:.3f} | {row['mfu']:.1%} | "
        f"{peer} |",
        flush=True,
      )

  pipeline_rows = []
  if _PIPELINE_WORKERS.value:
    print("\n| input pipeline | workers | batch | img/s |\n|---|---|---|---|")
    # The pipeline's work depends on the image size and the patch grid only.
    configs = {}
    for spec in _CONFIGS.value:
      # Fashion-MNIST is grey: one channel.
      config = make_config(
        spec,
        "splitmask",
        batch_size=batch_size,
        vocab_size=_VOCAB_SIZE.value,
        channels=1,
        dtype=dtype,
      )
      configs.setdefault((config.model.image_size, config_base.grid_size(config)), config)
    for (size, grid), config in configs.items():
      for workers in map(int, _PIPELINE_WORKERS.value):
        rate = pipeline(
          config, num_workers=workers, batches=_PIPELINE_BATCHES.value, data_dir=_DATA_DIR.value
        )
        pipeline_rows.append(
          {"image_size": size, "grid": grid, "workers": workers, "images_per_sec": rate}
        )
        print(
          f"| Fashion-MNIST -> {size} px, SplitMask masks on {grid[0]}x{grid[1]} | "
          f"{workers} | {batch_size} | {rate:.0f} |",
          flush=True,
        )

  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(
        {"environment": env, "peak_flops": peak, "steps": rows, "pipeline": pipeline_rows},
        f,
        indent=2,
      )


if __name__ == "__main__":
  app.run(main)
