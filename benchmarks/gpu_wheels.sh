#!/usr/bin/env bash
# Fetches, into .whl/, the wheels that benchmarks/gpu_check.sh installs on a GPU
# machine without internet: the packages this project imports that a CUDA image
# with JAX, PyTorch and timm usually lacks (TFDS, grain, ml_collections and what
# they need), for its Python (3.12 by default) on x86-64 Linux.
#   bash benchmarks/gpu_wheels.sh [PYTHON_VERSION]
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:-3.12}
mkdir -p .whl
platforms=()
for n in 28 27 17; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
# With --no-deps each one is named: these are what TFDS, grain and ml_collections
# need beyond such an image (jax, flax, optax, orbax, etils, numpy, protobuf, ...).
# Compiled ones, for the target's Python and platform:
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$version" \
  --implementation cp "${platforms[@]}" -d .whl grain array-record dm-tree
# Pure-Python ones (one of them, promise, is published as a source archive only):
python3 -m pip wheel -q --no-deps -w .whl tensorflow-datasets ml-collections immutabledict \
  promise simple-parsing docstring-parser tensorflow-metadata googleapis-common-protos toml \
  termcolor portpicker
ls -la .whl
