r"""The paper's setting in miniature: pre-train on the target data only, then fine-tune.

On Fashion-MNIST, for each seed: pre-train SplitMask and BEiT on the 60k
training images (no labels, nothing else), then fine-tune (a) a random-init
encoder, (b) the BEiT encoder and (c) the SplitMask encoder with the same
recipe, on all training labels and on a class-balanced 10% of them (the same
subset for every method and seed), and report test top-1. Seed 0's encoders are
also linearly probed at every block.

  python experiments/fashion_mnist_finetune.py --out=workdirs/experiment

`--recipe=light` fine-tunes without RandAugment, mixup and cutmix (into
finetune_light/), e.g. `--seeds=0 --labels=10% --recipe=light --no-probe`.

Every stage is a run of the package's entry point (`python -m splitmask_jax.main`);
the commands are printed and written to <out>/commands.txt, and a stage whose
workdir already holds final_metrics.json is not run again, so an interrupted
experiment resumes. Results: <out>/summary.json and <out>/results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Relative to the repository root, where every stage runs.
PRETRAIN_CONFIG = "configs/fashion_mnist.py"
FINETUNE_CONFIG = "configs/fashion_mnist_finetune.py"
INITS = ("random_init", "beit", "splitmask")
LABELS = {"full": "", "10%": "share=0.1"}
# 'table9': the paper's fine-tuning recipe as configs/fashion_mnist_finetune.py sets
# it. 'light': the same without RandAugment, mixup and cutmix, for schedules too
# short for that much regularisation.
RECIPES = {
  "table9": [],
  "light": [
    "--config.augment.randaugment_ops=0",
    "--config.augment.mixup=0",
    "--config.augment.cutmix=0",
  ],
}


def run_stage(name: str, args: list[str], workdir: pathlib.Path, log: dict) -> dict:
  """Runs one stage unless its workdir is finished; returns its final metrics."""
  cmd = [sys.executable, "-m", "splitmask_jax.main", *args, f"--workdir={workdir}"]
  final = workdir / "final_metrics.json"
  shown = " ".join(
    ["python", "-m", "splitmask_jax.main", *args, f"--workdir={os.path.relpath(workdir, ROOT)}"]
  ).replace(f"{ROOT}/", "")
  log["commands"].append(shown)
  if not final.exists():
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {shown}", flush=True)
    t0 = time.time()
    workdir.mkdir(parents=True, exist_ok=True)
    with open(workdir / "stdout.log", "w") as out:
      subprocess.run(cmd, cwd=ROOT, check=True, stdout=out, stderr=subprocess.STDOUT)
    log["wall_s"][name] = time.time() - t0
    (workdir / "wall_seconds.txt").write_text(f"{log['wall_s'][name]:.1f}\n")
  elif (workdir / "wall_seconds.txt").exists():
    log["wall_s"][name] = float((workdir / "wall_seconds.txt").read_text())
  return json.loads(final.read_text())


def _table(summary: dict, seeds: list[int], labels_run: list[str]) -> str:
  lines = [
    "| init | labels | test top-1 (mean ± std) | per seed | fine-tune wall (s, mean) |",
    "|---|---|---|---|---|",
  ]
  for labels in labels_run:
    for init in INITS:
      runs = summary["finetune"][labels][init]
      acc = np.array([runs[str(s)]["test_top1"] for s in seeds]) * 100
      walls = [runs[str(s)]["wall_s"] for s in seeds if runs[str(s)].get("wall_s")]
      spread = f" ± {acc.std(ddof=1):.2f}" if len(acc) > 1 else ""
      wall = f"{np.mean(walls):.0f}" if walls else "n/a"
      lines.append(
        f"| {init} | {labels} | {acc.mean():.2f}{spread} | "
        f"{', '.join(f'{a:.2f}' for a in acc)} | {wall} |"
      )
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default="workdirs/experiment", help="folder of all runs")
  parser.add_argument("--seeds", default="0,1", help="comma-separated seeds")
  parser.add_argument("--pretrain_epochs", type=float, default=2.0)
  parser.add_argument(
    "--finetune_epochs",
    type=float,
    default=1.0,
    help="epochs on the full split; the 10%% runs do as many updates",
  )
  parser.add_argument(
    "--probe",
    action=argparse.BooleanOptionalAction,
    default=True,
    help="probe every block of seed 0's encoders",
  )
  parser.add_argument(
    "--recipe",
    choices=sorted(RECIPES),
    default="table9",
    help="fine-tuning augmentation (see RECIPES)",
  )
  parser.add_argument(
    "--labels", default=",".join(LABELS), help="comma-separated label shares among full, 10%%"
  )
  args = parser.parse_args()
  labels_run = args.labels.split(",")
  if set(labels_run) - set(LABELS):
    parser.error(f"--labels must name shares among {list(LABELS)}, got {args.labels}")
  suffix = "" if args.recipe == "table9" else f"_{args.recipe}"
  out = pathlib.Path(args.out)
  if not out.is_absolute():
    out = ROOT / out
  seeds = [int(s) for s in args.seeds.split(",")]
  log = {"commands": [], "wall_s": {}}
  summary = {
    "seeds": seeds,
    "recipe": args.recipe,
    "pretrain": {},
    "finetune": {k: {i: {} for i in INITS} for k in labels_run},
    "probe": {},
  }
  t_start = time.time()
  for seed in seeds:
    for method in ("splitmask", "beit"):
      variant = ":beit" if method == "beit" else ""
      name = f"pretrain/{method}/seed{seed}"
      final = run_stage(
        name,
        [
          f"--config={PRETRAIN_CONFIG}{variant}",
          f"--config.seed={seed}",
          f"--config.num_epochs={args.pretrain_epochs}",
          "--config.knn.enabled=False",
        ],
        out / name,
        log,
      )
      summary["pretrain"].setdefault(method, {})[str(seed)] = {
        "val_loss": final.get("val_loss"),
        "wall_s": log["wall_s"].get(name),
      }
    for labels in labels_run:
      variant = LABELS[labels]
      for init in INITS:
        name = f"finetune{suffix}/{init}/{'labels10' if variant else 'full'}/seed{seed}"
        flags = [
          f"--config={FINETUNE_CONFIG}{':' + variant if variant else ''}",
          f"--config.seed={seed}",
          *RECIPES[args.recipe],
        ]
        scale = 10.0 if variant else 1.0  # the 10% runs keep the full split's updates
        flags += [
          f"--config.num_epochs={args.finetune_epochs * scale}",
          f"--config.optim.warmup_epochs={0.2 * args.finetune_epochs * scale}",
        ]
        if init == "random_init":
          # Layer decay keeps the lower blocks near their initialisation, which
          # only helps when that initialisation was learned: from scratch every
          # block learns at the full rate (DeiT's recipe).
          flags.append("--config.optim.layer_decay=1.0")
        else:
          flags.append(f"--config.init.workdir={out / 'pretrain' / init / f'seed{seed}'}")
        final = run_stage(name, flags, out / name, log)
        summary["finetune"][labels][init][str(seed)] = {
          "test_top1": final["test_top1"],
          "wall_s": log["wall_s"].get(name),
        }
    if args.probe and seed == seeds[0]:
      for method in ("splitmask", "beit"):
        name = f"probe/{method}/seed{seed}"
        final = run_stage(
          name,
          [
            f"--config={FINETUNE_CONFIG}:probe",
            f"--config.seed={seed}",
            f"--config.init.workdir={out / 'pretrain' / method / f'seed{seed}'}",
          ],
          out / name,
          log,
        )
        summary["probe"][method] = final
  summary["wall_s"] = log["wall_s"]
  summary["total_wall_s"] = sum(v for v in log["wall_s"].values() if v)
  (out / f"summary{suffix}.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
  (out / f"commands{suffix}.txt").write_text("\n".join(log["commands"]) + "\n")
  table = _table(summary, seeds, labels_run)
  (out / f"results{suffix}.md").write_text(table + "\n")
  print(table)
  print(
    f"Total wall time of the runs: {summary['total_wall_s'] / 60:.1f} min "
    f"(this invocation: {(time.time() - t_start) / 60:.1f} min)"
  )


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  main()
