"""What a run prints: one line per log step, evaluation and save, and a summary.

The libraries a run uses log much at INFO through the same Python logging as this
package (orbax alone writes some 200 lines of checkpoint-manager internals per run,
TFDS a line per dataset opened). `setup` keeps their records below WARNING off the
console unless `--verbosity=1` (absl's flag) asks for everything, and prints each
record as `HH:MM:SS message`: the level is named only for warnings and errors.
Everything a line summarises is also in `metrics.jsonl` and TensorBoard, in full.

Written here rather than with a library: absl's handler owns the console in an
absl app, and what it needs is a filter and a formatter on that handler.
"""

from __future__ import annotations

import logging as std_logging
import math
import os
import shlex
import time
from collections.abc import Mapping

from absl import logging

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Third-party warnings that are advice, not trouble, for a run here.
_QUIET_WARNINGS = (
  "OpenCV is not installed",  # TFDS decodes with PIL, fast enough at these sizes
  "has no dataset_info.json",  # TFDS, about a dataset it is about to prepare
)


class _Filter(std_logging.Filter):
  """Keeps this package's records, and others' from WARNING up."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    if record.pathname.startswith(_PACKAGE_DIR):
      return record.levelno >= std_logging.INFO
    if record.levelno >= std_logging.ERROR:
      return True
    return record.levelno >= std_logging.WARNING and not any(
      quiet in record.getMessage() for quiet in _QUIET_WARNINGS
    )


class _Formatter(std_logging.Formatter):
  def format(self, record: std_logging.LogRecord) -> str:
    stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
    level = "" if record.levelno < std_logging.WARNING else f"{record.levelname} "
    text = f"{stamp} {level}{record.getMessage()}"
    if record.exc_info:
      text += "\n" + self.formatException(record.exc_info)
    return text


def setup() -> None:
  """Makes absl's console handler print the short form and drop third-party INFO.

  Call once the flags are parsed (in `main`). `--verbosity=1` (or `-v 1`) keeps
  every record, in absl's long form with file and line.
  """
  handler = logging.get_absl_handler()
  if logging.get_verbosity() >= logging.DEBUG:
    return
  if not any(isinstance(f, _Filter) for f in handler.filters):
    handler.addFilter(_Filter())
  handler.setFormatter(_Formatter())


def duration(seconds: float) -> str:
  """'42s', '8m12s', '3h05m'; '?' when not finite."""
  if not math.isfinite(seconds):
    return "?"
  minutes, secs = divmod(int(round(seconds)), 60)
  hours, minutes = divmod(minutes, 60)
  if hours:
    return f"{hours}h{minutes:02d}m"
  return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def number(value: float) -> str:
  """A metric at a readable precision: 4 significant digits."""
  if not math.isfinite(value):
    return str(value)
  if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
    return f"{value:.3g}"
  return f"{value:.4g}"


def _loss_parts(values: Mapping[str, float], prefix: str = "") -> list[str]:
  """'loss 6.38 (inpaint 3.42, match 2.70)' from loss, <part>_loss, ..."""
  total = values.get(f"{prefix}loss")
  parts = [
    f"{k[len(prefix) : -len('_loss')]} {number(v)}"
    for k, v in sorted(values.items())
    if k.startswith(prefix) and k.endswith("_loss") and k != f"{prefix}loss"
  ]
  if total is None:
    return parts
  return [f"{prefix}loss {number(total)}" + (f" ({', '.join(parts)})" if parts else "")]


def step_line(
  step: int, total: int, values: Mapping[str, float], steps_per_sec: float | None
) -> str:
  """The log step's line: step/total, loss and its parts, images/s, time left.

  Args:
    values: the logged means of the window (loss, <part>_loss, images_per_sec,
      skipped_images, skipped_updates, ...).
    steps_per_sec: the rate since the last log step; None before there is one
      (the first window holds the compile).
  """
  width = len(str(total))
  fields = [f"step {step:>{width}}/{total}"] + _loss_parts(values)
  if "images_per_sec" in values:
    fields.append(f"{values['images_per_sec']:,.0f} img/s")
  for key in ("skipped_images", "skipped_updates"):
    if values.get(key):
      fields.append(f"{key.replace('_', ' ')} {values[key]:.0f}")
  if steps_per_sec is not None and step < total:
    fields.append(f"{duration((total - step) / steps_per_sec)} left")
  return "  ".join(fields)


def values_line(what: str, step: int, values: Mapping[str, float]) -> str:
  """'eval @ 250: val_loss 6.38 (inpaint 3.42, match 2.70), ...': every value, losses first."""
  losses = _loss_parts(values, "val_") if "val_loss" in values else []
  shown = {k for k in values if k.endswith("loss")} if losses else set()
  rest = [f"{k} {number(v)}" for k, v in sorted(values.items()) if k not in shown]
  if losses and "best_val_loss" in values:
    rest = [r for r in rest if not r.startswith("best_val_loss")]
    losses[-1] += f", best {number(values['best_val_loss'])}"
  return f"{what} @ {step}: " + ", ".join(losses + rest)


class Progress:
  """Counts the items of a long stage and logs how far it is, at most every
  `every_seconds` seconds and once at the end: 'k-NN features: 8,192/20,000 (41%)'."""

  def __init__(self, what: str, total: int | None, every_seconds: float = 10.0):
    self._what, self._total, self._every = what, total, every_seconds
    self._count = 0
    self._start = self._last = time.monotonic()

  def update(self, count: int) -> None:
    """Adds `count` items done."""
    self._count += count
    now = time.monotonic()
    if now - self._last >= self._every:
      self._last = now
      logging.info("%s: %s", self._what, self._done())

  def close(self) -> None:
    """Logs the count and the time the stage took."""
    logging.info("%s: %s in %s", self._what, self._done(), duration(time.monotonic() - self._start))

  def _done(self) -> str:
    if self._total:
      return f"{self._count:,}/{self._total:,} ({100 * self._count / self._total:.0f}%)"
    return f"{self._count:,}"


def _percent(value: float) -> str:
  return f"{100 * value:.1f}%"


def _headline(results: Mapping[str, float]) -> list[str]:
  """The few figures a run is read by, as phrases."""
  lines = []
  if "knn_top1" in results:
    line = f"k-NN top-1 {_percent(results['knn_top1'])}"
    if "knn_top1_random_init" in results:
      line += f" (random init {_percent(results['knn_top1_random_init'])})"
    lines.append(line)
  if "test_top1" in results:
    lines.append(f"test top-1 {_percent(results['test_top1'])}")
  probes = {k: v for k, v in results.items() if k.startswith("probe_top1_")}
  for name in sorted({k[len("probe_top1_") :].rsplit("_block_", 1)[0] for k in probes}):
    blocks = {
      int(k.rsplit("_", 1)[1]): v for k, v in probes.items() if k.startswith(f"probe_top1_{name}_")
    }
    block = max(blocks, key=blocks.get)
    lines.append(f"linear probe ({name}): best block {block}, top-1 {_percent(blocks[block])}")
  if "val_loss" in results:
    line = f"val_loss {number(results['val_loss'])}"
    if "best_val_loss" in results and "best_step" in results:
      line += f" (best {number(results['best_val_loss'])} at step {int(results['best_step'])})"
    lines.append(line)
  if not lines and "loss" in results:
    lines.append(f"loss {number(results['loss'])}")
  return lines


def summary(
  task: str, workdir: str, results: Mapping[str, float], seconds: float, argv: list[str]
) -> str:
  """The lines a finished run ends with: what it reached, where its outputs are,
  and the commands to go on.

  Args:
    task: config.task ('pretrain', 'finetune', 'probe').
    results: the run's final values.
    argv: the command line the run was started with (sys.argv).
  """
  command = "python -m splitmask_jax.main " + " ".join(shlex.quote(a) for a in argv[1:])
  lines = [f"Done: {task} in {duration(seconds)}. " + "; ".join(_headline(results))]
  outputs = "final_metrics.json, metrics.jsonl, TensorBoard files"
  if task == "probe":
    outputs += ", probe report"
  else:
    outputs += ", checkpoints/"
  if "best_val_loss" in results:
    outputs += ", best_checkpoint/"
  lines.append(f"  outputs in {workdir}: {outputs} (tensorboard --logdir {workdir})")
  if task != "probe":
    lines.append(f"  resume (after a stop): {command}")
  if task == "pretrain":
    config = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "")
    path = config.split(":", 1)[0]
    sibling = path[: -len(".py")] + "_finetune.py" if path.endswith(".py") else ""
    downstream = sibling if sibling and os.path.exists(sibling) else f"{path}:finetune"
    lines.append(
      f"  fine-tune: python -m splitmask_jax.main --config={downstream} "
      f"--config.init.workdir={workdir} --workdir={workdir.rstrip('/')}_finetune"
    )
  return "\n".join(lines)
