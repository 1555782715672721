"""A run's workdir, local or on an object store (`gs://bucket/run`), through etils.epath.

Every file a run reads or writes in its workdir goes through the paths of this
module, so a TPU VM's run can keep its workdir in a bucket. Object stores have no
append and no atomic rename: `write_atomically` writes an object in one piece
there (an object write is atomic) and renames a synced temporary file locally.
"""

from __future__ import annotations

import importlib.util
import os

from etils import epath

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
