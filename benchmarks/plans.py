r"""The planner's figures for the paper's ImageNet configs on TPU slices and H100s.

Runs `splitmask_jax.plan.plan` (real compiles of the train and eval steps for each
target, on this machine) for every row and prints a Markdown table: memory per
chip, the largest per-chip batch that fits, FLOPs per image, and the predicted
hours and chip-hours of Table 3's 300 epochs at 50% MFU, beside the paper's own
wall clock (Table 8: ViT-B, 16 GPUs, 34.0 h for SplitMask, 32.5 h for BEiT).

  python -m benchmarks.plans --json=plans.json            # every row (about an hour)
  python -m benchmarks.plans --rows=b16_splitmask_h100-8  # one
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import time

import jax
from absl import app
from absl import flags

from splitmask_jax import plan
from splitmask_jax.runtime import targets

ROOT = pathlib.Path(__file__).resolve().parents[1]
GIB = targets.GIB
MFU = 0.5
TPUS = ("v5e-16", "v5p-8", "v4-8")

# name -> (config argument, target, overrides)
ROWS = {
  **{
    f"b16_{objective}_{target}": (":beit" if objective == "beit" else "", target, {})
    for objective in ("splitmask", "beit")
    for target in (*TPUS, "h100-8")
  },
  # What makes the paper's batch fit a v5e-16: recomputing the rest of each block.
  "b16_splitmask_v5e-16_save_dots": ("", "v5e-16", {"model.remat": "save_dots"}),
  "l16_splitmask_v5e-64_fsdp": (
    "",
    "v5e-64",
    {"model.variant": "L/16", "mesh.fsdp": 16, "mesh.data": -1},
  ),
  "l16_splitmask_v5e-64_fsdp_remat": (
    "",
    "v5e-64",
    {"model.variant": "L/16", "mesh.fsdp": 16, "mesh.data": -1, "model.remat": "full"},
  ),
}

_ROWS = flags.DEFINE_list("rows", list(ROWS), "Rows to plan.")
_SEARCH = flags.DEFINE_integer("search_compiles", 3, "Compiles for the largest batch, per row.")
_JSON = flags.DEFINE_string("json", None, "Write the rows here.")


def load_config(arg: str, overrides: dict):
  path = ROOT / "configs" / "imagenet.py"
  spec = importlib.util.spec_from_file_location("imagenet_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg.lstrip(":") or None)
  config.update_from_flattened_dict(overrides)
  return config


def command(arg: str, target: str, overrides: dict) -> str:
  flags_text = " ".join(f"--config.{k}={v}" for k, v in overrides.items())
  return (
    f"python -m splitmask_jax.plan --config=configs/imagenet.py{arg} --target={target} {flags_text}"
  ).strip()


def row(name: str) -> dict:
  arg, target, overrides = ROWS[name]
  t0 = time.time()
  result = plan.plan(
    load_config(arg, overrides), target, mfus=(MFU,), search_compiles=_SEARCH.value
  )
  step = result.step_seconds(MFU)
  hours = step * result.total_steps / 3600
  return {
    "name": name,
    "command": command(arg, target, overrides),
    "objective": "BEiT" if arg == ":beit" else "SplitMask",
    "variant": overrides.get("model.variant", "B/16"),
    "remat": overrides.get("model.remat", "none"),
    "target": target,
    "chips": result.target.num_chips,
    "mesh": result.mesh_shape,
    "global_batch": result.global_batch,
    "per_chip_batch": result.per_chip_batch,
    "state_gib": (result.params_bytes + result.opt_state_bytes) / GIB,
    "temporaries_gib": result.train.temporaries / GIB,
    "total_gib": result.train.total / GIB,
    "eval_total_gib": result.eval.total / GIB if result.eval else None,
    "capacity_gib": result.capacity / GIB,
    "fits": result.fits,
    "largest_per_chip_batch": result.largest_batch,
    "smallest_refused_per_chip_batch": result.smallest_refused,
    "largest_note": result.largest_batch_note,
    "gflop_per_image": result.flops_per_step / result.global_batch / 1e9,
    "step_s_at_50": step,
    "hours_at_50": hours,
    "chip_hours_at_50": hours * result.target.num_chips,
    "compile_s": result.train.compile_s,
    "planning_s": time.time() - t0,
    "report": result.report(),
  }


def _fitted(r: dict) -> str:
  """The search's bracket: the largest compiled batch that fitted / the smallest
  that did not ("-" where there is none)."""
  low, high = r["largest_per_chip_batch"], r.get("smallest_refused_per_chip_batch")
  return f"{'-' if low is None else low} / {'-' if high is None else high}"


def table(rows: list[dict]) -> str:
  lines = [
    "| config | target | batch (per chip) | state GiB | temporaries GiB | total GiB | chip GiB | "
    "fits | per-chip batch: fits / does not | GFLOP/img | h at 50% MFU | chip-h |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    config = f"{r['objective']} {r['variant']}" + (
      f", remat {r['remat']}" if r["remat"] != "none" else ""
    )
    if r["mesh"].get("fsdp", 1) > 1:
      config += f", fsdp {r['mesh']['fsdp']}"
    lines.append(
      f"| {config} | {r['target']} | {r['global_batch']} ({r['per_chip_batch']}) | "
      f"{r['state_gib']:.2f} | {r['temporaries_gib']:.2f} | {r['total_gib']:.2f} | "
      f"{r['capacity_gib']:.2f} | {'yes' if r['fits'] else 'no'} | "
      f"{_fitted(r)} | {r['gflop_per_image']:.1f} | {r['hours_at_50']:.1f} | "
      f"{r['chip_hours_at_50']:.0f} |"
    )
  return "\n".join(lines)


def main(argv):
  del argv
  jax.config.update("jax_platforms", "cpu")
  rows = []
  for name in _ROWS.value:
    rows.append(row(name))
    print(rows[-1]["report"], flush=True)
    if _JSON.value:  # after every row: a long run keeps what it has
      with open(_JSON.value, "w") as f:
        json.dump(rows, f, indent=2)
  print(table(rows))


if __name__ == "__main__":
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {plan.GPU_COMPILE_FLAG}".strip()
  app.run(main)
