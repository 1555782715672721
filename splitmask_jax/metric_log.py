"""Where a run's scalars go: clu's writers (TensorBoard + log) and `metrics.jsonl`.

Only process 0 writes. `metrics.jsonl` holds one JSON object per logged step
(`{"step": ..., "loss": ..., ...}`), easy to read back without TensorBoard.
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
        workdir, just_logging=not self._is_writer, asynchronous=False)
    self._path = os.path.join(workdir, METRICS_FILE)

  def truncate_after(self, step: int) -> None:
    """Drops records past `step`: a resumed run rewrites the steps it repeats."""
    if not self._is_writer or not os.path.exists(self._path):
      return
    records = read_metrics(self._path)
    with open(self._path, "w") as f:
      for record in records:
        if record["step"] <= step:
          f.write(json.dumps(record) + "\n")

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


def read_metrics(path: str) -> list[dict]:
  """The records of a `metrics.jsonl` file (a file path or a workdir)."""
  if os.path.isdir(path):
    path = os.path.join(path, METRICS_FILE)
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
