r"""Compile time of the train step with the encoder's blocks scanned and unrolled.

Compiles the ImageNet config's real train step (`plan.plan`, no eval step, no
batch search) for a target from this machine, once with `model.scan=False` and
once with `model.scan=True`, and prints the seconds of each compile:

  python -m benchmarks.compile_time --variant=L/16 --target=h100-8
  python -m benchmarks.compile_time --variant=B/16 --target=v5e-16 --batch_size=1024
"""

from __future__ import annotations

import os

import jax
from absl import app
from absl import flags

from benchmarks import plans
from splitmask_jax import plan

_VARIANT = flags.DEFINE_string("variant", "L/16", "Model variant.")
_TARGET = flags.DEFINE_string("target", "h100-8", "Target to compile for.")
_BATCH = flags.DEFINE_integer("batch_size", None, "Global batch (default: the config's).")


def main(argv):
  del argv
  jax.config.update("jax_platforms", "cpu")
  overrides = {"model.variant": _VARIANT.value}
  if _BATCH.value:
    overrides["batch_size"] = _BATCH.value
  print(f"| train step of configs/imagenet.py for {_TARGET.value} | blocks | compile (s) |")
  print("|---|---|---|")
  flags_text = " ".join(f"--config.{k}={v}" for k, v in overrides.items())
  for scan in (False, True):
    config = plans.load_config("", {**overrides, "model.scan": scan})
    result = plan.plan(config, _TARGET.value, search_compiles=0, compile_eval=False)
    layout = "scanned" if scan else "unrolled"
    print(f"| {flags_text} | {layout} | {result.train.compile_s:.0f} |")


if __name__ == "__main__":
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {plan.GPU_COMPILE_FLAG}".strip()
  app.run(main)
