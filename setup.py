"""splitmask_jax: SplitMask and BEiT masked-image-modeling pre-training in JAX/Flax."""

import setuptools

INSTALL_REQUIRES = [
  "absl-py",
  "array-record>=0.5",
  "clu>=0.0.12",
  "etils[epath]",
  "flax>=0.10",
  "grain>=0.2.10",
  "jax>=0.6",
  "matplotlib>=3.7",
  "ml-collections>=1.0",
  "numpy>=1.26",
  "optax>=0.2.4",
  "orbax-checkpoint>=0.11",
  "pillow>=10",
  "safetensors>=0.4",
  # Preparing a TFDS dataset (PNG-encoding its images) and clu's TensorBoard
  # writer both need TensorFlow; reading prepared ArrayRecord data does not.
  "tensorboard",
  "tensorflow-cpu>=2.16",
  "tensorflow-datasets>=4.9.6",
]

setuptools.setup(
  name="splitmask_jax",
  version="0.1.0",
  description=__doc__,
  packages=setuptools.find_packages(include=["splitmask_jax", "splitmask_jax.*"]),
  python_requires=">=3.10",
  install_requires=INSTALL_REQUIRES,
  extras_require={
    "test": [
      "pytest>=8",
      "pytest-xdist",
      "chex",
      "scikit-learn",
      "nbclient>=0.10",
      "nbformat>=5.9",
      "ipykernel",
      "ruff>=0.15",
    ],
  },
)
