"""Where a run's scalars and pictures go: TensorBoard event files, the log, and
`metrics.jsonl`, in a local or remote (`gs://`) workdir.

Only process 0 writes. `metrics.jsonl` holds one JSON object per logged step
(`{"step": ..., "loss": ..., ...}`), easy to read back without TensorBoard. A
process killed at any moment leaves it readable: records are appended one line
at a time, a line cut short by the kill is ignored, and rewrites are atomic.

Every file goes through `etils.epath`, so a workdir may be a bucket. Object stores
have no append: there, `metrics.jsonl` is rewritten whole at each write (an
object write is atomic), and TensorBoard records are written as a new event file
per flush, at most one a minute (TensorBoard reads every event file of a folder).

The event files and the progress reports are written here, not by TensorFlow or clu
(whose writers and periodic actions import TensorFlow, 1,600 modules, into every
run, and write through TensorFlow's own filesystems rather than epath):
tensorboard's protos and record framing, TF2's summary layout (scalars and images
as tensors with their plugin's metadata), so TensorBoard and
`tf.compat.v1.train.summary_iterator` read them as TF's own.
"""

from __future__ import annotations

import io
import json
import math
import os
import socket
import time
from collections.abc import Mapping

import jax
import numpy as np
from absl import logging
from etils import epath
from PIL import Image
from tensorboard.compat.proto import event_pb2
from tensorboard.compat.proto import summary_pb2
from tensorboard.compat.proto import tensor_pb2
from tensorboard.compat.proto import tensor_shape_pb2
from tensorboard.plugins.image import metadata as image_metadata
from tensorboard.plugins.scalar import summary_v2 as scalar_summary
from tensorboard.summary.writer import record_writer

from splitmask_jax.runtime import workdir as workdir_lib

METRICS_FILE = "metrics.jsonl"
# Remote event files: a new one at most this often (seconds), and at close.
_REMOTE_FLUSH_SECONDS = 60.0


class EventWriter:
  """TensorBoard scalars and images in a folder, written through epath."""

  def __init__(self, directory):
    self._directory = epath.Path(directory)
    self._remote = workdir_lib.is_remote(directory)
    self._pending: list[bytes] = []
    self._segments = 0
    self._last_flush = time.monotonic()
    self._file = None
    self._name = f"events.out.tfevents.{time.time():.0f}.{socket.gethostname()}.{os.getpid()}.v2"
    self._append(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

  def _append(self, event: event_pb2.Event) -> None:
    self._pending.append(event.SerializeToString())

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    summary = summary_pb2.Summary()
    for name, value in scalars.items():
      summary.MergeFrom(scalar_summary.scalar_pb(name, float(value)))
    self._append(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))
    self.flush(force=False)

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    """`images`: {name: uint8 [N, H, W, C] or [H, W, C]}, C in (1, 3, 4)."""
    summary = summary_pb2.Summary()
    for name, batch in images.items():
      batch = np.asarray(batch, np.uint8)
      batch = batch[None] if batch.ndim == 3 else batch
      pngs = []
      for image in batch:
        buffer = io.BytesIO()
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, "PNG")
        pngs.append(buffer.getvalue())
      height, width = batch.shape[1:3]
      # TF2's image summary: a string tensor [width, height, png, png, ...].
      tensor = tensor_pb2.TensorProto(
        dtype=7,  # DT_STRING
        tensor_shape=tensor_shape_pb2.TensorShapeProto(
          dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=len(pngs) + 2)]
        ),
        string_val=[str(width).encode(), str(height).encode(), *pngs],
      )
      metadata = image_metadata.create_summary_metadata(display_name=name, description="")
      summary.value.add(tag=name, tensor=tensor, metadata=metadata)
    self._append(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))
    self.flush(force=False)

  def flush(self, force: bool = True) -> None:
    """Writes pending records: appended to one file locally; remotely a new event
    file, when forced or a minute after the last."""
    if not self._pending:
      return
    if self._remote:
      if not force and time.monotonic() - self._last_flush < _REMOTE_FLUSH_SECONDS:
        return
      self._directory.mkdir(parents=True, exist_ok=True)
      path = self._directory / f"{self._name}.{self._segments:06d}"
      with path.open("wb") as f:
        self._write_records(f)
      self._segments += 1
    else:
      if self._file is None:
        self._directory.mkdir(parents=True, exist_ok=True)
        self._file = (self._directory / self._name).open("ab")
      self._write_records(self._file)
      self._file.flush()
    self._pending = []
    self._last_flush = time.monotonic()

  def _write_records(self, f) -> None:
    writer = record_writer.RecordWriter(f)
    for record in self._pending:
      writer.write(record)

  def close(self) -> None:
    self.flush()
    if self._file is not None:
      self._file.close()
      self._file = None


class _LoggingWriter:
  """What the processes other than 0 do with scalars: log them."""

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    del step, scalars

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    del step, images

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass


class StepRate:
  """Steps per second, written to TensorBoard every `every_steps` steps and kept in
  `steps_per_sec` for the console. Reads the clock only (no device synchronisation)."""

  def __init__(self, total_steps: int, writer, every_steps: int):
    self._total, self._writer, self._every = total_steps, writer, every_steps
    self._last: tuple[int, float] | None = None
    self.steps_per_sec: float | None = None  # None until a window past the compile

  def __call__(self, step: int) -> None:
    now = time.monotonic()
    if self._last is None:  # the first step compiles: measure from its end
      self._last = (step, now)
      return
    if step % self._every and step != self._total:
      return
    first, then = self._last
    self.steps_per_sec = (step - first) / max(now - then, 1e-9)
    self._writer.write_scalars(step, {"steps_per_sec": self.steps_per_sec})
    self._last = (step, now)


class MetricLog:
  """Writes scalars for a step to TensorBoard, the log, and `metrics.jsonl`.

  `writer` takes scalars and images for TensorBoard alone (progress reports,
  image summaries).
  """

  def __init__(self, directory):
    self._is_writer = jax.process_index() == 0
    self._workdir = workdir_lib.path(directory)
    self.writer = EventWriter(self._workdir) if self._is_writer else _LoggingWriter()
    self._path = self._workdir / METRICS_FILE
    self._records: list[dict] | None = None  # remote: the file's records, kept here

  def truncate_after(self, step: int) -> None:
    """Drops records past `step`: a resumed run rewrites the steps it repeats."""
    if not self._is_writer or not self._path.exists():
      return
    records = [r for r in read_metrics(self._path) if r["step"] <= step]
    workdir_lib.write_atomically(self._path, "".join(json.dumps(r) + "\n" for r in records))
    self._records = records if workdir_lib.is_remote(self._path) else None

  def write(self, step: int, scalars: dict[str, float]) -> None:
    scalars = {k: float(v) for k, v in scalars.items()}
    # The console shows a line per log step (console.py); the full record is
    # here with --verbosity=1, and in TensorBoard and metrics.jsonl.
    logging.debug("[%d] %s", step, ", ".join(f"{k}={v:.6g}" for k, v in sorted(scalars.items())))
    if not self._is_writer:
      return
    self.writer.write_scalars(step, scalars)
    record = {"step": int(step)}
    # JSON has no NaN/inf: keep them readable as strings rather than fail.
    record.update({k: v if math.isfinite(v) else str(v) for k, v in scalars.items()})
    line = json.dumps(record) + "\n"
    if workdir_lib.is_remote(self._path):
      if self._records is None:
        self._records = read_metrics(self._path) if self._path.exists() else []
      self._records.append(record)
      workdir_lib.write_atomically(self._path, "".join(json.dumps(r) + "\n" for r in self._records))
    else:
      with self._path.open("a") as f:
        f.write(line)

  def close(self) -> None:
    self.writer.close()


def read_metrics(path) -> list[dict]:
  """The records of a `metrics.jsonl` file (a file path or a workdir, local or remote).

  A last line without its newline, cut short by a killed writer, is ignored.
  """
  path = epath.Path(path)
  if path.is_dir():
    path = path / METRICS_FILE
  lines = path.read_text().split("\n")
  # Every complete record ends with a newline, so the last piece is either ''
  # or an interrupted write.
  return [json.loads(line) for line in lines[:-1] if line.strip()]
