"""Test-session setup and shared fixtures.

8 fake CPU devices, so sharded code paths run on a laptop: XLA reads its flags
once, when its first backend starts, so they are set before anything initialises
JAX's backends. The same goes for the flag a deviceless GPU compile needs
(`plan.GPU_COMPILE_FLAG`). Every test runs on the CPU: the TPU and CUDA
compilers installed for the planner's tests are not asked to find devices.
"""

import gzip
import os
import struct

import numpy as np
import pytest

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "")
  + " --xla_force_host_platform_device_count=8 --xla_gpu_enable_triton_gemm=false"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


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
