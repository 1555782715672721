"""Test-session setup and shared fixtures.

8 fake CPU devices, so sharded code paths run on a laptop: XLA reads its flags
once, when its first backend starts, so they are set before anything initialises
JAX's backends. The same goes for the flag a deviceless GPU compile needs
(`plan.GPU_COMPILE_FLAG`). Every test runs on the CPU: the TPU and CUDA
compilers installed for the planner's tests are not asked to find devices.
"""

import atexit
import gzip
import os
import shutil
import struct
import tempfile

import numpy as np
import pytest

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "")
  + " --xla_force_host_platform_device_count=8 --xla_gpu_enable_triton_gemm=false"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# One persistent XLA compilation cache for the session, read by this process and by
# the runs the tests start (they inherit the environment): dozens of tests compile
# the same tiny programs (the test config's steps, evaluations, k-NN), and a cache hit
# loads an executable in milliseconds where compiling takes seconds. A cache the
# caller's environment already names is kept.
_XLA_CACHE = tempfile.mkdtemp(prefix="splitmask_jax_xla_cache_")
atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _XLA_CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def _write_idx(path, array):
  header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(
    f">{array.ndim}I", *array.shape
  )
  with gzip.open(path, "wb") as f:
    f.write(header + array.astype(np.uint8).tobytes())


def _class_images(rng, labels):
  """28x28 images whose class decides a bright horizontal band's position."""
  images = rng.integers(0, 60, size=(len(labels), 28, 28), dtype=np.uint8)
  for image, label in zip(images, labels):
    image[2 + 2 * label : 6 + 2 * label, 4:24] = 230
  return images


@pytest.fixture(scope="session")
def fake_fashion_mnist(tmp_path_factory):
  """Four Fashion-MNIST-format IDX files (160 train, 80 test images) in a folder."""
  folder = tmp_path_factory.mktemp("idx")
  rng = np.random.default_rng(0)
  for prefix, count in (("train", 160), ("t10k", 80)):
    labels = np.arange(count) % 10
    _write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", _class_images(rng, labels))
    _write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
  return folder


@pytest.fixture(scope="session")
def pretrained_run(fake_fashion_mnist, tmp_path_factory):
  """A 4-step SplitMask run of the tiny test config at 32 px, on the fake
  Fashion-MNIST files, for the downstream tests: (workdir, TFDS data_dir)."""
  from splitmask_jax import train  # pylint: disable=import-outside-toplevel

  from helpers import load_config  # pylint: disable=import-outside-toplevel

  root = tmp_path_factory.mktemp("pretrained")
  config = load_config("test")
  config.data.manual_dir = str(fake_fashion_mnist)
  config.data.data_dir = str(root / "tfds")
  config.knn.enabled = False
  config.summary_images = 0
  train.train_and_evaluate(config, str(root / "run"))
  return root / "run", root / "tfds"


@pytest.fixture(scope="session")
def cli_run(fake_fashion_mnist, tmp_path_factory):
  """`python -m splitmask_jax.main` with the demo's config at test settings, for 6 steps,
  from unprepared fake Fashion-MNIST: (the finished process, its workdir). Its stdout
  ends with whether the run imported TensorFlow ('tensorflow imported: False')."""
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  import textwrap  # pylint: disable=import-outside-toplevel

  from helpers import CONFIG_FILE  # pylint: disable=import-outside-toplevel
  from helpers import ROOT  # pylint: disable=import-outside-toplevel

  tmp = tmp_path_factory.mktemp("cli")
  code = textwrap.dedent("""
    import atexit, runpy, sys
    atexit.register(lambda: print("tensorflow imported:", "tensorflow" in sys.modules))
    sys.argv = ["splitmask_jax.main"] + sys.argv[1:]
    runpy.run_module("splitmask_jax.main", run_name="__main__", alter_sys=True)
  """)
  command = [
    sys.executable,
    "-c",
    code,
    f"--config={CONFIG_FILE}:test",
    f"--workdir={tmp / 'run'}",
    f"--config.data.manual_dir={fake_fashion_mnist}",
    f"--config.data.data_dir={tmp / 'tfds'}",
    "--config.num_steps=6",
  ]
  result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-4000:]
  return result, tmp / "run"
