r"""The data-scaling study in miniature: dataset share x schedule length -> held-out
MIM loss -> fine-tuned accuracy (after "On Data Scaling in Masked Image Modeling").

On Fashion-MNIST, for every share of the training images (class-balanced,
`data.train_fraction`) and every schedule length (in updates, so a smaller share
is seen for more epochs), pre-train SplitMask, tracking the held-out MIM loss
(`val_loss`, on test images never trained on) and keeping the checkpoint with
the lowest one; then fine-tune that checkpoint on a fixed class-balanced 10% of
the labels, beside one random-init fine-tuning. The question: does the
validation loss predict the fine-tuned accuracy, and when does a long schedule
overfit a small share?

  python experiments/data_scaling.py --out=workdirs/data_scaling

Every stage is a run of the entry point, resumed when interrupted, as in
experiments/fashion_mnist_finetune.py. Writes <out>/summary.json,
<out>/results.md and <out>/data_scaling.png.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np
from fashion_mnist_finetune import FINETUNE_CONFIG
from fashion_mnist_finetune import PRETRAIN_CONFIG
from fashion_mnist_finetune import RECIPES
from fashion_mnist_finetune import run_stage

# Fine-tuning: the light recipe (no RandAugment, mixup, cutmix) on 10% of the
# labels, a fixed number of updates; warmup as a share of them.
FINETUNE_FLAGS = [
  "--config.data.train_fraction=0.1",
  "--config.optim.warmup_fraction=0.1",
  "--config.optim.layer_decay=0.65",
  *RECIPES["light"],
]


def _pretrain_flags(share: float, steps: int, patches: int) -> list[str]:
  return [
    f"--config={PRETRAIN_CONFIG}",
    f"--config.data.train_fraction={share}",
    f"--config.num_steps={steps}",
    f"--config.eval_every={max(1, steps // 6)}",
    f"--config.checkpoint_every={steps}",
    "--config.optim.warmup_fraction=0.1",
    f"--config.tokenizer.kmeans_num_patches={patches}",
    "--config.knn.enabled=False",
  ]


def _val_curve(workdir: pathlib.Path) -> list[tuple[int, float]]:
  curve = {}
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    record = json.loads(line)
    if "val_loss" in record:
      curve[record["step"]] = record["val_loss"]
  return sorted(curve.items())


def _plot(summary: dict, path: pathlib.Path) -> None:
  runs = summary["runs"]
  shares = sorted({r["share"] for r in runs})
  lengths = sorted({r["steps"] for r in runs})
  markers = dict(zip(lengths, "os^Dv"))
  colours = dict(zip(shares, plt.cm.viridis(np.linspace(0.1, 0.85, len(shares)))))
  fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
  for r in runs:
    axes[0].scatter(
      r["best_val_loss"],
      100 * r["test_top1"],
      color=colours[r["share"]],
      marker=markers[r["steps"]],
      s=60,
      label=f"{r['share']:.1%} of images, {r['steps']} updates",
    )
  axes[0].axhline(100 * summary["random_init_top1"], color="grey", ls="--", label="random init")
  axes[0].set(
    xlabel="lowest held-out MIM loss",
    ylabel="fine-tuned top-1 (%), 10% labels",
    title="validation loss vs fine-tuned accuracy",
  )
  axes[0].legend(fontsize=7)
  for steps in lengths:
    sel = sorted((r for r in runs if r["steps"] == steps), key=lambda r: r["share"])
    x = [r["share"] for r in sel]
    axes[1].plot(
      x, [r["best_val_loss"] for r in sel], marker=markers[steps], label=f"{steps} updates, lowest"
    )
    axes[1].plot(
      x,
      [r["final_val_loss"] for r in sel],
      marker=markers[steps],
      ls=":",
      label=f"{steps} updates, last",
    )
    axes[2].plot(
      x, [100 * r["test_top1"] for r in sel], marker=markers[steps], label=f"{steps} updates"
    )
  axes[2].axhline(100 * summary["random_init_top1"], color="grey", ls="--", label="random init")
  for r in runs:
    if r["steps"] == lengths[-1]:
      steps, losses = zip(*r["val_curve"])
      axes[3].plot(
        steps,
        losses,
        color=colours[r["share"]],
        marker=".",
        label=f"{r['share']:.1%} of images ({r['epochs']:.0f} epochs)",
      )
  axes[3].set(
    xlabel="update",
    ylabel="held-out MIM loss",
    title=f"validation loss during {lengths[-1]} updates",
  )
  axes[3].legend(fontsize=7)
  for ax, ylabel, title in (
    (axes[1], "held-out MIM loss", "validation loss vs data share"),
    (axes[2], "fine-tuned top-1 (%)", "accuracy vs data share"),
  ):
    ax.set(xscale="log", xlabel="share of the 60k training images", ylabel=ylabel, title=title)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def _table(summary: dict) -> str:
  lines = [
    "| share (images) | updates | epochs | val loss: lowest (step) | val loss: last "
    "| fine-tuned top-1 |",
    "|---|---|---|---|---|---|",
  ]
  for r in summary["runs"]:
    lines.append(
      f"| {r['share']:.1%} ({r['images']:,}) | {r['steps']} | {r['epochs']:.1f} | "
      f"{r['best_val_loss']:.3f} ({r['best_step']}) | {r['final_val_loss']:.3f} | "
      f"{100 * r['test_top1']:.1f} |"
    )
  lines.append(f"| random init | | | | | {100 * summary['random_init_top1']:.1f} |")
  return "\n".join(lines) + "\n"


def main() -> None:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--out", default="workdirs/data_scaling", type=pathlib.Path)
  parser.add_argument("--shares", default="0.002,0.02,0.1,1.0")
  parser.add_argument("--steps", default="200,600", help="pre-training updates")
  parser.add_argument("--finetune_steps", type=int, default=150)
  parser.add_argument("--kmeans_patches", type=int, default=50_000)
  args = parser.parse_args()
  out = args.out.resolve()
  log = {"commands": [], "wall_s": {}}
  finetune = [
    f"--config={FINETUNE_CONFIG}",
    f"--config.num_steps={args.finetune_steps}",
    *FINETUNE_FLAGS,
  ]
  runs = []
  for share in [float(s) for s in args.shares.split(",")]:
    for steps in [int(s) for s in args.steps.split(",")]:
      name = f"share{share:g}_steps{steps}"
      pre_dir = out / "pretrain" / name
      final = run_stage(
        f"pretrain/{name}", _pretrain_flags(share, steps, args.kmeans_patches), pre_dir, log
      )
      tuned = run_stage(
        f"finetune/{name}",
        [*finetune, f"--config.init.workdir={pre_dir}", "--config.init.checkpoint=best"],
        out / "finetune" / name,
        log,
      )
      curve = _val_curve(pre_dir)
      images = round(60_000 * share)
      runs.append(
        {
          "share": share,
          "steps": steps,
          "images": images,
          "epochs": steps * 256 / images,
          "best_step": final["best_step"],
          "best_val_loss": final["best_val_loss"],
          "final_val_loss": curve[-1][1],
          "val_curve": curve,
          "test_top1": tuned["test_top1"],
        }
      )
  # Layer decay keeps the lower blocks near their initialisation, which only
  # makes sense for a learned one (as in experiments/fashion_mnist_finetune.py).
  baseline_flags = [f for f in finetune if not f.startswith("--config.optim.layer_decay")]
  baseline = run_stage(
    "finetune/random_init",
    [*baseline_flags, "--config.optim.layer_decay=1.0"],
    out / "finetune" / "random_init",
    log,
  )
  summary = {
    "runs": runs,
    "random_init_top1": baseline["test_top1"],
    "commands": log["commands"],
    "wall_s": log["wall_s"],
  }
  (out / "summary.json").write_text(json.dumps(summary, indent=2))
  (out / "results.md").write_text(_table(summary))
  _plot(summary, out / "data_scaling.png")
  print(_table(summary))
  loss = [r["best_val_loss"] for r in runs]
  top1 = [r["test_top1"] for r in runs]
  print(f"Pearson r(lowest val loss, top-1) = {np.corrcoef(loss, top1)[0, 1]:.3f}")
  sys.stdout.flush()


if __name__ == "__main__":
  main()
