"""Where a run's scalars go: clu's writers (TensorBoard + log) and `metrics.jsonl`.

Only process 0 writes. `metrics.jsonl` holds one JSON object per logged step
(`{"step": ..., "loss": ..., ...}`), easy to read back without TensorBoard. A
process killed at any moment leaves it readable: records are appended one line
at a time, a line cut short by the kill is ignored, and rewrites are atomic.
"""

from __future__ import annotations

import json
import math
import os

import jax
from clu import metric_writers

METRICS_FILE = "metrics.jsonl"


class MetricLog:
  """Writes scalars for a step to TensorBoard, the log, and `metrics.jsonl`."""

  def __init__(self, workdir: str):
    self._is_writer = jax.process_index() == 0
    self.writer = metric_writers.create_default_writer(
      workdir, just_logging=not self._is_writer, asynchronous=False
    )
    self._path = os.path.join(workdir, METRICS_FILE)

  def truncate_after(self, step: int) -> None:
    """Drops records past `step`: a resumed run rewrites the steps it repeats."""
    if not self._is_writer or not os.path.exists(self._path):
      return
    records = read_metrics(self._path)
    write_atomically(
      self._path, "".join(json.dumps(r) + "\n" for r in records if r["step"] <= step)
    )

  def write(self, step: int, scalars: dict[str, float]) -> None:
    scalars = {k: float(v) for k, v in scalars.items()}
    self.writer.write_scalars(step, scalars)
    if self._is_writer:
      record = {"step": int(step)}
      # JSON has no NaN/inf: keep them readable as strings rather than fail.
      record.update({k: v if math.isfinite(v) else str(v) for k, v in scalars.items()})
      with open(self._path, "a") as f:
        f.write(json.dumps(record) + "\n")

  def close(self) -> None:
    self.writer.flush()
    self.writer.close()


def write_atomically(path: str, text: str) -> None:
  """Replaces the file `path` by `text`: a crash leaves the old or the new file."""
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def read_metrics(path: str) -> list[dict]:
  """The records of a `metrics.jsonl` file (a file path or a workdir).

  A last line without its newline, cut short by a killed writer, is ignored.
  """
  if os.path.isdir(path):
    path = os.path.join(path, METRICS_FILE)
  with open(path) as f:
    lines = f.read().split("\n")
  # Every complete record ends with a newline, so the last piece is either ''
  # or an interrupted write.
  return [json.loads(line) for line in lines[:-1] if line.strip()]
