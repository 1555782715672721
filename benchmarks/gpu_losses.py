r"""Does the train step compute the same losses on an accelerator as on the CPU?

Runs the same steps of a small SplitMask config (the real train step: tokenizer,
both losses, AdamW) from the same initial state on the same synthetic batches,
once on the first accelerator and once on the CPU, and compares the loss of every
step:
  * float32, with matmuls at full float32 precision on both (GPUs would otherwise
    use TF32): within `--f32_rtol` (1e-4) relative;
  * bfloat16 compute: within `--bf16_rtol` (5e-3) relative. bfloat16 keeps 8
    bits of mantissa (relative rounding 2^-9 = 0.2%), and the two backends fuse
    and order their sums differently, so each step rounds differently. On the
    CPU alone, bfloat16 against float32 differ by at most 4.7e-4 relative over
    these 10 steps (`--cpu_only`, Ti/16 at 64 px, batch 32, learning rate
    1.5e-3 from the first step); the bound is ten times that.

  python -m benchmarks.gpu_losses --compare_steps=10 --losses_json=OUT.json
  python -m benchmarks.gpu_losses --cpu_only   # bfloat16 against float32, both on the CPU

Exit status 1 when a comparison fails.
"""

from __future__ import annotations

import json
import sys

import jax
import ml_collections
import numpy as np
from absl import app
from absl import flags

from benchmarks import throughput
from splitmask_jax import tokenizers
from splitmask_jax import train
from splitmask_jax import train_step as train_step_lib
from splitmask_jax.runtime import sharding

_STEPS = flags.DEFINE_integer("compare_steps", 10, "Steps compared.")
_CONFIG = flags.DEFINE_string("compare_config", "Ti/16@64", "VARIANT@IMAGE_SIZE of the step.")
_BATCH = flags.DEFINE_integer("compare_batch_size", 32, "Global batch.")
_F32_RTOL = flags.DEFINE_float("f32_rtol", 1e-4, "Relative bound, float32.")
_BF16_RTOL = flags.DEFINE_float("bf16_rtol", 5e-3, "Relative bound, bfloat16.")
_CPU_ONLY = flags.DEFINE_bool(
  "cpu_only", False, "Compare bfloat16 with float32 on the CPU instead (no accelerator)."
)
_JSON = flags.DEFINE_string("losses_json", None, "Write the losses and the verdicts here.")


def losses(config, device, steps: int) -> list[float]:
  """The loss of each of `steps` train steps of `config` on `device`, float64 list."""
  mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": 1, "fsdp": 1}), [device])
  parts = train.build_training(config, 1000, 100.0, sharding.platform_of(mesh))
  codebook = tokenizers.random_projection_codebook(
    jax.random.PRNGKey(1), *train.codebook_shape(config)
  )
  # Initialised on the CPU and copied: both runs start from the same bits.
  cpu_mesh = sharding.make_mesh(
    ml_collections.ConfigDict({"data": 1, "fsdp": 1}), jax.devices("cpu")[:1]
  )
  state = train_step_lib.init_train_state(
    parts.model, parts.optimizer, codebook, parts.example_inputs, jax.random.PRNGKey(0), cpu_mesh
  )
  state = jax.device_put(jax.device_get(state), device)
  step = train.make_train_step(config, parts, mesh, state)
  out = []
  for i in range(steps):
    batch = sharding.global_batch(throughput.synthetic_batch(config, seed=i), mesh)
    state, metrics = step(state, batch)
    out.append(float(metrics["loss"]))
  return out


def _config(dtype: str):
  config = throughput.make_config(
    _CONFIG.value, "splitmask", batch_size=_BATCH.value, vocab_size=1024, channels=3, dtype=dtype
  )
  config.unlock()
  config.model.drop_path = 0.0
  # The full learning rate from the first step: 10 steps move the weights enough
  # for differences in the updates to show in the losses.
  config.optim.warmup_epochs = 0.0
  config.optim.base_batch_size = config.batch_size
  return config


def compare(name: str, got: list[float], want: list[float], rtol: float) -> dict:
  worst = float(np.max(np.abs(np.subtract(got, want)) / np.abs(want)))
  verdict = {"name": name, "max_rel_diff": worst, "rtol": rtol, "ok": worst <= rtol}
  print(
    f"{name}: max relative difference {worst:.2e} (bound {rtol:.0e}): "
    f"{'ok' if verdict['ok'] else 'FAILED'}"
  )
  return verdict


def main(argv):
  del argv
  cpu = jax.devices("cpu")[0]
  results = {"steps": _STEPS.value, "config": _CONFIG.value, "batch_size": _BATCH.value}
  verdicts = []
  if _CPU_ONLY.value:
    with jax.default_matmul_precision("highest"):
      f32 = losses(_config("float32"), cpu, _STEPS.value)
    bf16 = losses(_config("bfloat16"), cpu, _STEPS.value)
    results.update(cpu_float32=f32, cpu_bfloat16=bf16)
    verdicts.append(compare("CPU bfloat16 vs CPU float32", bf16, f32, _BF16_RTOL.value))
  else:
    accelerator = jax.devices()[0]
    if accelerator.platform == "cpu":
      print("No accelerator: nothing to compare (use --cpu_only).", file=sys.stderr)
      sys.exit(2)
    results["device"] = accelerator.device_kind
    with jax.default_matmul_precision("highest"):
      got = losses(_config("float32"), accelerator, _STEPS.value)
      want = losses(_config("float32"), cpu, _STEPS.value)
    results.update(accelerator_float32=got, cpu_float32=want)
    verdicts.append(compare("float32", got, want, _F32_RTOL.value))
    got = losses(_config("bfloat16"), accelerator, _STEPS.value)
    want = losses(_config("bfloat16"), cpu, _STEPS.value)
    results.update(accelerator_bfloat16=got, cpu_bfloat16=want)
    verdicts.append(compare("bfloat16", got, want, _BF16_RTOL.value))
  results["verdicts"] = verdicts
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(results, f, indent=2)
  if not all(v["ok"] for v in verdicts):
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
