r"""The paper's Figure 2 in miniature: which objectives keep their quality when the
pre-training data shrinks?

On Fashion-MNIST, every objective (DINO, BEiT, SplitMask, MAE, SimMIM) is pre-trained
on 1%, 10% and 100% of the 60k training images (class-balanced, the same subset for
every objective and seed) with the same number of updates, so a smaller share is seen
for more epochs: the paper's constant-updates protocol (DINO's schedules are shares of
the updates in configs/fashion_mnist.py, the same at every share). DINO takes 600
updates where the others take 300: at this scale it learns nothing in 300 (its
held-out loss stays flat; experiments/RESULTS.md), and the figure compares how each
objective fares across shares at a constant number of updates. Each encoder is
then judged with the labels of a class-balanced 10% of the training images (6,000):

- k-NN top-1 of the pooled features of the last block (20 neighbours),
- a linear probe of every block's pooled features (the last block's and the best),
- fine-tuning (the light recipe of experiments/data_scaling.py: no RandAugment,
  mixup or cutmix; layer decay 0.65; a fixed number of updates),

beside a random-init encoder judged the same way. Top-1 on the 10k test images.

  python experiments/figure2.py --out=workdirs/figure2
  python experiments/figure2.py --out=workdirs/figure2 --objectives=dino,splitmask --seeds=0

Every stage is a run of the entry point, resumed when interrupted (see
experiments/fashion_mnist_finetune.py). Each finished cell (an objective, share and
seed: pre-training, k-NN, probe and fine-tuning) is added to `--record`
(experiments/figure2.json, kept with the code) at once, and a later invocation skips
the cells found there, so the study can be run a few cells at a time, on several
machines, and the workdirs deleted in between. The table and the plot cover each
objective with a seed recorded at every share, averaged over its seeds so recorded
(the table's seeds column says how many): beside the record (experiments/figure2.md)
and in figures/ beside it (experiments/figures/figure2.png).
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
from data_scaling import FINETUNE_FLAGS
from fashion_mnist_finetune import FINETUNE_CONFIG
from fashion_mnist_finetune import PRETRAIN_CONFIG
from fashion_mnist_finetune import ROOT
from fashion_mnist_finetune import run_stage

OBJECTIVES = ("dino", "beit", "splitmask", "mae", "simmim")
NAMES = {
  "dino": "DINO",
  "beit": "BEiT",
  "splitmask": "SplitMask",
  "mae": "MAE",
  "simmim": "SimMIM",
  "random_init": "random init",
}
# The share of labelled training images every evaluation uses.
LABEL_SHARE = 0.1
METRICS = {
  "knn": "k-NN top-1",
  "probe_last": "linear probe, last block",
  "probe_best": "linear probe, best block",
  "finetune": "fine-tuned top-1",
}
BATCH_SIZE = 256  # configs/fashion_mnist.py's


def _steps(objective: str, args) -> int:
  """Pre-training updates of `objective`, the same at every share."""
  return args.dino_steps if objective == "dino" else args.steps


def _pretrain_flags(objective: str, share: float, seed: int, args) -> list[str]:
  option = "" if objective == "splitmask" else f":{objective}"
  steps = _steps(objective, args)
  return [
    f"--config={PRETRAIN_CONFIG}{option}",
    f"--config.seed={seed}",
    f"--config.data.train_fraction={share}",
    f"--config.num_steps={steps}",
    f"--config.eval_every={max(1, steps // 4)}",
    f"--config.checkpoint_every={steps}",
    "--config.optim.warmup_fraction=0.1",
    f"--config.tokenizer.kmeans_num_patches={args.kmeans_patches}",
    # k-NN against as many labelled training images as the other evaluations use.
    f"--config.knn.num_train={round(60_000 * LABEL_SHARE)}",
    f"--config.knn.num_test={args.num_test}",
  ]


def _evaluate(init: str, seed: int, pre_dir: pathlib.Path | None, out, log, args) -> dict:
  """Probe and fine-tune one encoder (`pre_dir` None: the random-init encoder)."""
  label_share = [f"--config.data.train_fraction={LABEL_SHARE}", f"--config.seed={seed}"]
  init_flags = [] if pre_dir is None else [f"--config.init.workdir={pre_dir}"]
  probe = run_stage(
    f"probe/{init}/seed{seed}",
    [
      f"--config={FINETUNE_CONFIG}:probe",
      *label_share,
      *init_flags,
      f"--config.probe.random_init_baseline={pre_dir is None}",
      f"--config.probe.num_test={args.num_test}",
    ],
    out / "probe" / init / f"seed{seed}",
    log,
  )
  finetune_flags = list(FINETUNE_FLAGS)
  if pre_dir is None:
    # Layer decay keeps the lower blocks near their initialisation, which only
    # makes sense for a learned one (as in experiments/fashion_mnist_finetune.py).
    finetune_flags = [f for f in finetune_flags if "layer_decay" not in f]
    finetune_flags.append("--config.optim.layer_decay=1.0")
  tuned = run_stage(
    f"finetune/{init}/seed{seed}",
    [
      f"--config={FINETUNE_CONFIG}",
      f"--config.num_steps={args.finetune_steps}",
      *finetune_flags,
      f"--config.seed={seed}",
      *init_flags,
    ],
    out / "finetune" / init / f"seed{seed}",
    log,
  )
  name = "random_init" if pre_dir is None else "pretrained"
  blocks = sorted(
    (int(k.rsplit("_", 1)[1]), v)
    for k, v in probe.items()
    if k.startswith(f"probe_top1_{name}_block_")
  )
  return {
    "probe_last": blocks[-1][1],
    "probe_best": max(v for _, v in blocks),
    "probe_best_block": max(blocks, key=lambda b: b[1])[0],
    "finetune": tuned["test_top1"],
  }


def _mean_std(values: list[float]) -> tuple[float, float]:
  a = 100 * np.asarray(values)
  return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def _cells(values: dict, seeds: list[int]) -> list[str]:
  """`values[seed][metric]` as 'mean' (one seed) or 'mean ± std' cells, one a metric."""
  cells = []
  for metric in METRICS:
    mean, std = _mean_std([values[str(s)][metric] for s in seeds])
    cells.append(f"{mean:.1f}" + (f" ± {std:.1f}" if len(seeds) > 1 else ""))
  return cells


def _table(summary: dict) -> str:
  head = " | ".join(f"{METRICS[m]} (%)" for m in METRICS)
  lines = [f"| objective | images | seeds | {head} |", "|---|---|---|" + "---|" * len(METRICS)]
  for objective in summary["objectives"]:
    seeds = summary["seeds"][objective]
    for share in summary["shares"]:
      cells = _cells(summary["runs"][objective][str(share)], seeds)
      images = round(60_000 * share)
      lines.append(
        f"| {NAMES[objective]} | {share:.0%} ({images:,}) | {len(seeds)} | {' | '.join(cells)} |"
      )
  seeds = summary["seeds"]["random_init"]
  cells = _cells(summary["random_init"], seeds)
  lines.append(f"| random init | | {len(seeds)} | {' | '.join(cells)} |")
  note = "Mean ± standard deviation over the seeds where there are several."
  return "\n".join(lines) + "\n\n" + note + "\n"


def _plot(summary: dict, path: pathlib.Path) -> None:
  shares = summary["shares"]
  fig, axes = plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS), 4.2))
  for ax, (metric, title) in zip(axes, METRICS.items()):
    for objective in summary["objectives"]:
      runs, seeds = summary["runs"][objective], summary["seeds"][objective]
      stats = [_mean_std([runs[str(s)][str(seed)][metric] for seed in seeds]) for s in shares]
      ax.errorbar(
        [100 * s for s in shares],
        [m for m, _ in stats],
        yerr=[d for _, d in stats],
        marker="o",
        capsize=3,
        label=NAMES[objective],
      )
    seeds = summary["seeds"]["random_init"]
    mean, _ = _mean_std([summary["random_init"][str(seed)][metric] for seed in seeds])
    ax.axhline(mean, color="grey", ls="--", label="random init")
    ax.set(
      xscale="log",
      xlabel="% of the 60k training images pre-trained on",
      ylabel=f"{title} (%)",
      title=f"{title}, {LABEL_SHARE:.0%} of the labels",
    )
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


# What a record's cells must share to be compared.
PROTOCOL_KEYS = ("steps", "dino_steps", "finetune_steps", "kmeans_patches", "num_test")


def _load_record(path: pathlib.Path, args) -> dict:
  """The record at `path` (a new one if absent); fails if it was made with another
  protocol than `args`'."""
  protocol = {k: getattr(args, k) for k in PROTOCOL_KEYS}
  if not path.exists():
    return {"protocol": protocol, "runs": {}, "random_init": {}, "commands": [], "wall_s": {}}
  record = json.loads(path.read_text())
  if record["protocol"] != protocol:
    raise SystemExit(
      f"{path} holds cells of another protocol ({record['protocol']}, these flags give "
      f"{protocol}): pass the same flags, or another --record."
    )
  return record


def _save_record(record: dict, path: pathlib.Path, log: dict) -> None:
  record["commands"] = sorted(set(record["commands"]) | set(log["commands"]))
  record["wall_s"].update(log["wall_s"])
  path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def _summary(record: dict) -> dict:
  """The record's cells as `_table` and `_plot` read them: the objectives with at least
  one seed recorded at every share, in the usual order, and each objective's seeds
  (those with every share), so a second seed shows as soon as its cells are in."""
  runs = record["runs"]
  shares = sorted({float(share) for cells in runs.values() for share in cells})
  measured = {s for cells in runs.values() for by_seed in cells.values() for s in by_seed}
  # The random init's k-NN comes with the pre-training cells (below): its seeds are
  # those with at least one.
  seeds = {"random_init": sorted(int(s) for s in record["random_init"] if s in measured)}
  for o in OBJECTIVES:
    cells = runs.get(o, {})
    complete = [
      s for s in seeds["random_init"] if all(str(s) in cells.get(str(sh), {}) for sh in shares)
    ]
    if complete:
      seeds[o] = complete
  random_init = dict(record["random_init"])
  for seed in seeds["random_init"]:
    # Every pre-training run measures the same random-init encoder's k-NN (its seed's
    # initialisation): their mean is the baseline's k-NN.
    knn = [
      c[str(seed)]["knn_random_init"] for o in runs for c in runs[o].values() if str(seed) in c
    ]
    random_init[str(seed)] = dict(random_init[str(seed)], knn=float(np.mean(knn)))
  return {
    "objectives": [o for o in OBJECTIVES if o in seeds],
    "shares": shares,
    "seeds": seeds,
    "runs": runs,
    "random_init": random_init,
  }


def main() -> None:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--out", default="workdirs/figure2", type=pathlib.Path)
  parser.add_argument("--record", default=ROOT / "experiments" / "figure2.json", type=pathlib.Path)
  parser.add_argument("--objectives", default=",".join(OBJECTIVES))
  parser.add_argument("--shares", default="0.01,0.1,1.0")
  parser.add_argument("--seeds", default="0,1")
  parser.add_argument("--steps", type=int, default=300, help="pre-training updates of 256")
  parser.add_argument("--dino_steps", type=int, default=600, help="DINO's pre-training updates")
  parser.add_argument("--finetune_steps", type=int, default=150)
  parser.add_argument("--kmeans_patches", type=int, default=50_000)
  parser.add_argument("--num_test", type=int, default=10_000, help="test images evaluated")
  args = parser.parse_args()
  objectives = args.objectives.split(",")
  if set(objectives) - set(OBJECTIVES):
    parser.error(f"--objectives must name some of {OBJECTIVES}, got {args.objectives}")
  out = args.out if args.out.is_absolute() else ROOT / args.out
  shares = [float(s) for s in args.shares.split(",")]
  seeds = [int(s) for s in args.seeds.split(",")]
  record = _load_record(args.record, args)
  log = {"commands": [], "wall_s": {}}
  for seed in seeds:
    # The baseline first: with it, the table covers the objectives done so far.
    if str(seed) not in record["random_init"]:
      record["random_init"][str(seed)] = _evaluate("random_init", seed, None, out, log, args)
      _save_record(record, args.record, log)
    for objective in objectives:
      for share in shares:
        cells = record["runs"].setdefault(objective, {}).setdefault(str(share), {})
        if str(seed) in cells:
          continue
        name = f"{objective}/share{share:g}"
        pre_dir = out / "pretrain" / name / f"seed{seed}"
        final = run_stage(
          f"pretrain/{name}/seed{seed}", _pretrain_flags(objective, share, seed, args), pre_dir, log
        )
        values = _evaluate(f"{name}", seed, pre_dir, out, log, args)
        values.update(
          knn=final["knn_top1"],
          knn_random_init=final["knn_top1_random_init"],
          val_loss=final.get("val_loss"),
          epochs=_steps(objective, args) * BATCH_SIZE / round(60_000 * share),
        )
        cells[str(seed)] = values
        _save_record(record, args.record, log)
  summary = _summary(record)
  if not summary["objectives"]:
    print(f"{args.record}: no objective has all its cells yet.")
    return
  table = _table(summary)
  args.record.with_suffix(".md").write_text(table)
  figures = args.record.parent / "figures"
  figures.mkdir(exist_ok=True)
  _plot(summary, figures / f"{args.record.stem}.png")
  print(table)
  print(f"Wall time of the stages run now: {sum(log['wall_s'].values()) / 60:.1f} min")
  sys.stdout.flush()


if __name__ == "__main__":
  main()
