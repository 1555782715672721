"""A run's workdir, local or on an object store (`gs://bucket/run`), through etils.epath.

Every file a run reads or writes in its workdir goes through the paths of this
module, so a TPU VM's run can keep its workdir in a bucket. Object stores have no
append and no atomic rename: `write_atomically` writes an object in one piece
there (an object write is atomic) and renames a synced temporary file locally.

A full disk is reported as one `DiskFull` error saying what could not be written,
how much space is free and which checkpoint is intact: `check_space` before a
checkpoint is written (so no save is left half done), `disk_full_error` for a
write that failed anyway (its ENOSPC may be buried in orbax's or TensorStore's
errors).

`RunLock` keeps a second run off a workdir in use (a double submit, a requeued
job that overlaps the first): both would write the same checkpoints and logs.
"""

from __future__ import annotations

import datetime
import errno
import importlib.util
import json
import os
import shutil
import socket
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

# Remote paths go through fsspec (gcsfs for gs://) whether or not TensorFlow is
# installed; epath would otherwise send them through TensorFlow's filesystems, a
# second route the tests do not cover. epath reads this once, at its first remote path.
os.environ.setdefault("EPATH_USE_TF", "0")
# The fsspec implementation each scheme needs, and the extra that installs it.
_REMOTE_PACKAGES = {"gs": ("gcsfs", "gcs"), "s3": ("s3fs", None)}


def is_remote(path) -> bool:
  """Whether `path` is on an object store (gs://, s3://, ...): no append, no rename."""
  return "://" in os.fspath(path)


def path(workdir, *parts: str) -> epath.Path:
  """`workdir / parts...` as an epath.Path: local paths absolute, remote ones as given.

  Raises:
    ValueError: a remote scheme whose filesystem package is not installed.
  """
  if is_remote(workdir):
    scheme = os.fspath(workdir).split("://", 1)[0]
    package, extra = _REMOTE_PACKAGES.get(scheme, (None, None))
    if package and importlib.util.find_spec(package) is None:
      how = f"pip install -e '.[{extra}]'" if extra else f"pip install {package}"
      raise ValueError(f"{workdir}: {scheme}:// paths need {package} ({how}).")
    root = epath.Path(workdir)
  else:
    root = epath.Path(os.path.abspath(os.path.expanduser(os.fspath(workdir))))
  return root.joinpath(*parts)


def write_atomically(file, text: str | bytes) -> None:
  """Replaces `file` by `text`: a crash leaves the old or the new file."""
  file = epath.Path(file)
  mode = "wb" if isinstance(text, bytes) else "w"
  if is_remote(file):
    with file.open(mode) as f:
      f.write(text)
    return
  tmp = file.parent / f"{file.name}.tmp"
  with tmp.open(mode) as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  tmp.replace(file)


class DiskFull(OSError):
  """The workdir's disk has no room for a write; the run can resume once it has."""

  def __init__(self, message: str):
    super().__init__(errno.ENOSPC, message)

  def __str__(self) -> str:
    return self.strerror


def free_bytes(directory) -> int | None:
  """Bytes free on the filesystem of a local `directory`; None on an object store."""
  if is_remote(directory):
    return None
  return shutil.disk_usage(os.fspath(directory)).free


def tree_bytes(directory) -> int:
  """Bytes in the files below a local `directory`."""
  return sum(
    os.path.getsize(os.path.join(root, name))
    for root, _, names in os.walk(os.fspath(directory))
    for name in names
  )


def _megabytes(n: int) -> str:
  return f"{n / 2**20:,.1f} MiB"


def _disk_full_message(workdir, what: str, needed: int | None) -> str:
  free = free_bytes(path(workdir))
  checkpoints = path(workdir, "checkpoints")
  steps = ocp.utils.checkpoint_steps(checkpoints) if checkpoints.is_dir() else []
  intact = (
    f"The latest intact checkpoint is step {max(steps)} in {checkpoints}."
    if steps
    else "No checkpoint was saved yet."
  )
  room = "" if free is None else f" ({_megabytes(free)} free"
  if room:
    room += f", about {_megabytes(needed)} needed)" if needed else ")"
  return (
    f"No space left on the disk of {workdir} for {what}{room}. {intact} "
    "Free space and run the same command to resume."
  )


def check_space(workdir, needed: int, what: str) -> None:
  """Raises DiskFull unless the workdir's disk has `needed` bytes free (and a margin).

  Object stores are not checked: they have no such limit to read.
  """
  free = free_bytes(path(workdir))
  # Room for the log lines and TensorBoard events written until the next save.
  margin = needed // 20 + 2**20
  if free is not None and free < needed + margin:
    raise DiskFull(_disk_full_message(workdir, what, needed + margin))


def disk_full_error(error: BaseException, workdir) -> DiskFull | None:
  """The DiskFull error that explains `error`, if a full disk is behind it."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, DiskFull):
      return error
    text = str(error)
    if (
      (isinstance(error, OSError) and error.errno == errno.ENOSPC)
      or "No space left on device" in text
      # TensorStore's words for ENOSPC, as orbax passes them on.
      or ("RESOURCE_EXHAUSTED" in text and "writing" in text)
    ):
      return DiskFull(_disk_full_message(workdir, "what the run was writing", None))
    error = error.__cause__ or error.__context__
  return None


# The file of a workdir that says which process runs in it.
LOCK_FILE = "run.lock"


class WorkdirInUse(RuntimeError):
  """Another run holds the workdir's lock."""


def _process_start(pid: int) -> str | None:
  """The start time of process `pid` in clock ticks since boot (Linux), to tell a
  live process from a later one that was given the same pid."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _alive(holder: dict) -> bool:
  """Whether the process that wrote `holder` (on this host) still runs."""
  pid = int(holder.get("pid", -1))
  if pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # someone else's process: it exists
    pass
  started = holder.get("pid_start")
  return started is None or _process_start(pid) in (None, started)


class RunLock:
  """One run per workdir: `<workdir>/run.lock` names the host, pid and start time
  of the run in it, from start to end (a context manager).

  A second run is refused at once with the holder's details. A lock left by a
  process that died on this host is taken over with a warning; one from another
  host is not (its process cannot be checked from here), and the error says how
  to remove it. With several processes, process 0 holds the lock and every
  process gets its verdict. On an object store the lock is created only if absent
  (a conditional write), as locally; taking over a dead run's lock is a copy and a
  delete there, so two runs on one host taking over the same dead lock at once may
  still both pass.
  """

  def __init__(self, workdir):
    self.workdir = workdir
    self.path = path(workdir, LOCK_FILE)
    self._held = False

  def __enter__(self) -> RunLock:
    directory = path(self.workdir)
    if directory.exists() and not directory.is_dir():
      raise NotADirectoryError(
        f"The workdir {self.workdir} is a file, not a directory: pass a directory "
        "(it is created if it does not exist)."
      )
    error = None
    if jax.process_index() == 0:
      directory.mkdir(parents=True, exist_ok=True)
      try:
        self._acquire()
      except WorkdirInUse as e:
        error = e
    if jax.process_count() > 1:
      held = multihost_utils.broadcast_one_to_all(np.int32(error is None))
      if error is None and not held:
        error = WorkdirInUse(f"{self.workdir} is in use by another run (see {self.path}).")
    if error is not None:
      raise error
    return self

  def __exit__(self, *exc_info) -> None:
    if self._held:
      self.path.unlink(missing_ok=True)
      self._held = False

  def _acquire(self) -> None:
    me = {
      "host": socket.gethostname(),
      "pid": os.getpid(),
      "pid_start": _process_start(os.getpid()),
      "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
      "command": " ".join(sys.argv),
    }
    for _ in range(3):  # a stale lock is set aside, then the create is tried again
      if self._create(json.dumps(me, indent=2)):
        self._held = True
        return
      try:
        holder = json.loads(self.path.read_text())
      except FileNotFoundError:  # released meanwhile
        continue
      except ValueError:  # written by a process that died before it finished
        holder = {}
      if holder and (holder.get("host") != me["host"] or _alive(holder)):
        raise WorkdirInUse(
          f"{self.workdir} is in use by the run started {holder.get('started')} on "
          f"{holder.get('host')} (pid {holder.get('pid')}): {holder.get('command')}. Wait "
          f"for it to end, or use another workdir. If no run is using it (e.g. a machine "
          f"that crashed), delete {self.path} and start again."
        )
      logging.warning(
        "Taking over %s, left by a run that is no longer alive: %s", self.path, holder or "empty"
      )
      stale = self.path.parent / f"{LOCK_FILE}.stale.{os.getpid()}"
      try:
        self.path.rename(stale)  # one of two runs taking it over at once wins
      except FileNotFoundError:
        continue
      stale.unlink(missing_ok=True)
    raise WorkdirInUse(f"Could not take the lock {self.path}: other runs keep taking it.")

  def _create(self, text: str) -> bool:
    """Writes the lock file unless it exists; whether it did."""
    if is_remote(self.path):
      # The store creates the object only if it is absent (gcsfs sends GCS's
      # ifGenerationMatch=0), so two runs starting at once cannot both win; a
      # filesystem without conditional writes falls back to fsspec's check-then-write.
      import fsspec  # pylint: disable=import-outside-toplevel  # remote paths' extra has it

      fs, target = fsspec.core.url_to_fs(os.fspath(self.path))
      try:
        fs.pipe_file(target, text.encode(), mode="create")
      except FileExistsError:
        return False
      return True
    try:
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "w") as f:
      f.write(text)
    return True
