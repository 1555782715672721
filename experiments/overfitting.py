r"""Overfitting, shown: a larger model pre-trained on a tiny share for long enough that
the held-out MIM loss turns up while the training loss still falls (after seed 002,
"On Data Scaling in Masked Image Modeling").

An objective of `configs/fashion_mnist.py` (SplitMask unless `--objective` says
otherwise; the data-scaling paper's is SimMIM) with a larger encoder than the demo's
on a class-balanced share of the training images, evaluated on held-out test images
(`val_loss`) every `steps / evals` updates; the checkpoint of the lowest held-out loss
is kept (`best_checkpoint/`). The lowest-loss checkpoint and the last one are then
fine-tuned the same way (the light recipe on 10% of the labels, as
experiments/data_scaling.py), to see whether the held-out loss picked the better one.

  python experiments/overfitting.py --out=workdirs/overfitting
  python experiments/overfitting.py --out=workdirs/overfitting_simmim --objective=simmim \
      --config_flag=--config.optim.min_lr=1.0   # any config flag; this one: no decay

Writes <out>/summary.json, <out>/results.md and <out>/overfitting.png.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
from data_scaling import FINETUNE_FLAGS
from fashion_mnist_finetune import FINETUNE_CONFIG
from fashion_mnist_finetune import PRETRAIN_CONFIG
from fashion_mnist_finetune import ROOT
from fashion_mnist_finetune import run_stage

LOSS_NAMES = {
  "splitmask": "SplitMask (inpaint + match)",
  "beit": "BEiT (inpaint)",
  "mae": "MAE (normalised-pixel MSE)",
  "simmim": "SimMIM (masked-pixel L1)",
}


def _curves(workdir: pathlib.Path) -> dict[str, list[tuple[int, float]]]:
  """{'train': [(step, loss)], 'val': [(step, val_loss)]} from metrics.jsonl."""
  curves = {"train": {}, "val": {}}
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    record = json.loads(line)
    if "loss" in record:
      curves["train"][record["step"]] = record["loss"]
    if "val_loss" in record:
      curves["val"][record["step"]] = record["val_loss"]
  return {k: sorted(v.items()) for k, v in curves.items()}


def _plot(summary: dict, path: pathlib.Path) -> None:
  fig, ax = plt.subplots(figsize=(7, 4.2))
  for key, label in (("train", "training loss"), ("val", "held-out loss")):
    steps, values = zip(*summary["curves"][key])
    ax.plot(steps, values, marker="." if key == "val" else None, label=label)
  ax.axvline(summary["best_step"], color="grey", ls="--", label="lowest held-out loss")
  ax.set(
    xlabel="update",
    ylabel=f"{LOSS_NAMES[summary['objective']]} loss",
    title=f"{summary['variant']} on {summary['images']} images",
  )
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main() -> None:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--out", default="workdirs/overfitting", type=pathlib.Path)
  parser.add_argument("--objective", default="splitmask", choices=sorted(LOSS_NAMES))
  parser.add_argument("--variant", default="Ti/8", help="a larger encoder than the demo's")
  parser.add_argument("--share", type=float, default=0.002, help="of the 60k training images")
  parser.add_argument("--steps", type=int, default=2000)
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--evals", type=int, default=20, help="held-out evaluations in the run")
  parser.add_argument("--finetune_steps", type=int, default=150)
  parser.add_argument(
    "--crop_scale",
    default="0.67,1.0",
    help="min,max area of the random resized crops: SimMIM's, the data-scaling paper's own",
  )
  parser.add_argument(
    "--config_flag",
    action="append",
    default=[],
    help="a further flag of the pre-training run, e.g. --config_flag=--config.optim.min_lr=1.0"
    " (the learning rate stays at its peak after warmup); repeatable",
  )
  args = parser.parse_args()
  option = "" if args.objective == "splitmask" else f":{args.objective}"
  out = args.out if args.out.is_absolute() else ROOT / args.out
  log = {"commands": [], "wall_s": {}}
  images = round(60_000 * args.share)
  pre_dir = out / "pretrain"
  every = max(1, args.steps // args.evals)
  final = run_stage(
    "pretrain",
    [
      f"--config={PRETRAIN_CONFIG}{option}",
      f"--config.model.variant={args.variant}",
      f"--config.data.train_fraction={args.share}",
      f"--config.batch_size={args.batch_size}",
      f"--config.data.crop_scale=({args.crop_scale})",
      f"--config.num_steps={args.steps}",
      f"--config.eval_every={every}",
      f"--config.checkpoint_every={args.steps}",
      f"--config.log_every={every}",
      "--config.optim.warmup_fraction=0.05",
      f"--config.tokenizer.kmeans_num_patches={16 * images}",
      "--config.knn.enabled=False",
      *args.config_flag,
    ],
    pre_dir,
    log,
  )
  tuned = {}
  # When the lowest held-out loss is the last one, both are the same weights.
  kept = ("latest",) if final["best_step"] == args.steps else ("best", "latest")
  for checkpoint in kept:
    tuned[checkpoint] = run_stage(
      f"finetune/{checkpoint}",
      [
        f"--config={FINETUNE_CONFIG}",
        f"--config.num_steps={args.finetune_steps}",
        f"--config.model.variant={args.variant}",
        *FINETUNE_FLAGS,
        f"--config.init.workdir={pre_dir}",
        f"--config.init.checkpoint={checkpoint}",
      ],
      out / "finetune" / checkpoint,
      log,
    )["test_top1"]
  tuned.setdefault("best", tuned["latest"])
  curves = _curves(pre_dir)
  summary = {
    "objective": args.objective,
    "variant": args.variant,
    "images": images,
    "crop_scale": args.crop_scale,
    "steps": args.steps,
    "epochs": args.steps * args.batch_size / images,
    "best_step": final["best_step"],
    "best_val_loss": final["best_val_loss"],
    "last_val_loss": curves["val"][-1][1],
    "finetune_top1_best": tuned["best"],
    "finetune_top1_last": tuned["latest"],
    "curves": curves,
    "commands": log["commands"],
    "wall_s": log["wall_s"],
  }
  out.mkdir(parents=True, exist_ok=True)
  (out / "summary.json").write_text(json.dumps(summary, indent=2))
  table = (
    "| checkpoint | step | held-out loss | fine-tuned top-1 (%) |\n|---|---|---|---|\n"
    f"| lowest held-out loss | {summary['best_step']} | {summary['best_val_loss']:.3f} | "
    f"{100 * tuned['best']:.1f} |\n"
    f"| last | {args.steps} | {summary['last_val_loss']:.3f} | {100 * tuned['latest']:.1f} |\n"
  )
  (out / "results.md").write_text(table)
  _plot(summary, out / "overfitting.png")
  print(table)


if __name__ == "__main__":
  main()
