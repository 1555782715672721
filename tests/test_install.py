"""What an install gives a user, checked in the environments users have.

- A run on prepared data imports no TensorFlow, and its console is a page.
- In an environment without TensorFlow (the package's default install), Fashion-MNIST
  and image folders are prepared, and a TFDS builder that needs TensorFlow stops with
  the package to install.
- Installed by the notebooks' setup cell into an environment that has TensorFlow
  already, as Colab has, the package keeps that TensorFlow working.
"""

import importlib.metadata
import json
import os
import re
import subprocess
import sys
import sysconfig
import textwrap

import nbformat
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from PIL import Image

from splitmask_jax.runtime import metric_log

from helpers import ROOT

# Colab's TensorFlow in 2025-2026, older than the newest release, so that an install
# that replaced it would show.
COLAB_TENSORFLOW = "2.19.0"


def _python(code: str, *args, python=sys.executable, timeout=900, **kwargs):
  return subprocess.run(
    [str(python), "-c", code, *map(str, args)],
    cwd=kwargs.pop("cwd", ROOT),
    capture_output=True,
    text=True,
    timeout=timeout,
    **kwargs,
  )


def test_a_run_imports_no_tensorflow(cli_run):
  # Installed here (the test extra has it), so only the run can keep it out.
  assert _python("import tensorflow").returncode == 0
  result, _ = cli_run
  assert "tensorflow imported: False" in result.stdout


def test_the_console_is_a_page(cli_run):
  result, workdir = cli_run
  lines = result.stderr.splitlines()
  console = [ln for ln in lines if re.match(r"\d\d:\d\d:\d\d ", ln)]
  records = metric_log.read_metrics(workdir)
  logged = [r["step"] for r in records if "loss" in r]
  evaluated = [r["step"] for r in records if "val_loss" in r]
  steps = [ln for ln in console if re.search(r" step +\d+/6 ", ln)]
  assert [int(re.search(r"step +(\d+)/", ln)[1]) for ln in steps] == logged
  assert all(
    re.search(r"loss [\d.]+ \(inpaint [\d.]+, match [\d.]+\)  [\d,]+ img/s", s) for s in steps
  )
  assert len([ln for ln in console if " eval @ " in ln]) == len(evaluated)
  saves = {kind: [] for kind in ("checkpoint", "best checkpoint")}
  for line in console:
    match = re.match(r"\S+ (checkpoint|best checkpoint) @ (\d+):", line)
    if match:
      saves[match[1]].append(int(match[2]))
  config = json.loads((workdir / "config.json").read_text())
  every, total = config["checkpoint_every"], config["num_steps"]
  assert saves["checkpoint"] == [s for s in range(1, total + 1) if s % every == 0 or s == total]
  [best] = [int(p.name) for p in (workdir / "best_checkpoint").iterdir() if p.name.isdigit()]
  assert saves["best checkpoint"][-1] == best and set(saves["best checkpoint"]) <= set(evaluated)
  done = [i for i, ln in enumerate(lines) if " Done: pretrain in " in ln]
  assert len(done) == 1 and "k-NN top-1 " in lines[done[0]]
  assert f"outputs in {workdir}" in lines[done[0] + 1]
  assert f"fashion_mnist_finetune.py --config.init.workdir={workdir} " in lines[done[0] + 3]
  # Nothing of orbax's or TFDS's INFO logs; what is left is a page.
  assert not [ln for ln in lines if re.search(r"orbax|CheckpointManager|dataset_info", ln)]
  assert len(console) <= 30, "\n".join(console)


def _environment_without_tensorflow(tmp_path):
  """A Python environment holding this one's packages but TensorFlow: a venv whose
  site-packages links to every entry of ours except TensorFlow's own."""
  venv = tmp_path / "no_tensorflow"
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
  ours = sysconfig.get_paths()["purelib"]
  site = venv / os.path.relpath(ours, sys.prefix)
  for name in os.listdir(ours):
    if re.fullmatch(r"tensorflow(_cpu)?(-[^/]*\.dist-info)?", name) is None:
      os.symlink(os.path.join(ours, name), site / name)
  return venv / "bin" / "python"


_TINY_BUILDER = '''
import numpy as np
import tensorflow_datasets as tfds


class TinyArrays(tfds.core.GeneratorBasedBuilder):
  """Hands TFDS image arrays, as TFDS's own MNIST and CIFAR builders do."""

  VERSION = tfds.core.Version("1.0.0")
  MANUAL_DOWNLOAD_INSTRUCTIONS = "Any folder."

  def _info(self):
    image = tfds.features.Image(shape=(4, 4, 1))
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({"image": image}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i in range(3):
      yield i, {"image": np.full((4, 4, 1), i, np.uint8)}
'''


def test_datasets_are_prepared_without_tensorflow(tmp_path, fake_fashion_mnist):
  python = _environment_without_tensorflow(tmp_path)
  package = tmp_path / "tiny_arrays"
  package.mkdir()
  (package / "__init__.py").write_text(_TINY_BUILDER)
  for label, value in (("a", 40), ("b", 200)):
    (tmp_path / "images" / label).mkdir(parents=True)
    for i in range(3):  # one of each class is held out for validation
      Image.new("RGB", (20, 18), (value + i,) * 3).save(tmp_path / "images" / label / f"{i}.png")
  code = textwrap.dedent("""
    import json, sys
    import numpy as np
    sys.path.insert(0, sys.argv[3])
    import tiny_arrays  # registers the builder
    from splitmask_jax.data import datasets

    data_dir, idx = sys.argv[1], sys.argv[2]
    out = {"tensorflow found": __import__("importlib").util.find_spec("tensorflow") is not None}
    datasets.prepare_dataset("fashion_mnist", data_dir, idx)
    images, labels = datasets.read_fashion_mnist_split(idx, "train")
    source = datasets.load_source("fashion_mnist", "train", data_dir)
    # TFDS orders the records by a hash of their keys.
    read = sorted((int(r["label"]), r["image"].tobytes()) for r in source)
    out["fashion_mnist"] = read == sorted(zip(labels.tolist(), (i.tobytes() for i in images)))
    datasets.prepare_dataset(sys.argv[4], data_dir)
    out["image folder"] = len(datasets.load_source(sys.argv[4], "train", data_dir))
    try:
      datasets.prepare_dataset("tiny_arrays", data_dir, manual_dir=sys.argv[3])
    except datasets.DatasetNotPreparedError as e:
      out["error"] = str(e)
    out["tensorflow imported"] = "tensorflow" in sys.modules
    print(json.dumps(out))
  """)
  result = _python(
    code, tmp_path / "tfds", fake_fashion_mnist, tmp_path, tmp_path / "images", python=python
  )
  assert result.returncode == 0, result.stderr[-4000:]
  out = json.loads(result.stdout.splitlines()[-1])
  assert out["tensorflow found"] is False
  assert out["fashion_mnist"] is True  # every image and label
  assert out["image folder"] == 4
  assert "Preparing TFDS dataset 'tiny_arrays' needs TensorFlow" in out["error"]
  assert "pip install -e '.[tensorflow]'" in out["error"]
  assert out["tensorflow imported"] is False


def _setup_cells():
  cells = []
  for name in ("quickstart", "finetune_and_probe", "tokenizers"):
    notebook = nbformat.read(ROOT / "colabs" / f"{name}.ipynb", as_version=4)
    cells.append(next(c.source for c in notebook.cells if c.cell_type == "code"))
  return cells


@pytest.mark.slow
def test_colab_environment_keeps_its_tensorflow(tmp_path):
  """A venv with Colab's TensorFlow installed first, then the notebooks' setup cell."""
  cells = _setup_cells()
  assert len(set(cells)) == 1, "the notebooks' setup cells differ"
  venv = tmp_path / "colab"
  subprocess.run([sys.executable, "-m", "venv", venv], check=True)
  python = venv / "bin" / "python"
  install = _python(
    "import subprocess, sys; sys.exit(subprocess.call([sys.executable, '-m', 'pip', "
    f"'install', '-q', 'tensorflow=={COLAB_TENSORFLOW}']))",
    python=python,
  )
  assert install.returncode == 0, install.stderr[-3000:]
  before = _python(
    "import google.protobuf, numpy; print(google.protobuf.__version__, numpy.__version__)",
    python=python,
  )
  # The cell clones the repository into ./splitmask_jax_repo unless that exists.
  (tmp_path / "splitmask_jax_repo").symlink_to(ROOT)
  setup = _python(cells[0], python=python, cwd=tmp_path)
  assert setup.returncode == 0, setup.stderr[-4000:]
  check = _python(
    textwrap.dedent("""
      import importlib.metadata, json
      import google.protobuf, numpy
      import tensorflow as tf
      import splitmask_jax.main
      from splitmask_jax.data import datasets
      names = {d.metadata["Name"].lower() for d in importlib.metadata.distributions()}
      print(json.dumps({
        "tensorflow": tf.__version__,
        "works": float(tf.reduce_sum(tf.constant([1.0, 2.0]))),
        "tensorflow-cpu": "tensorflow-cpu" in names,
        "kept": f"{google.protobuf.__version__} {numpy.__version__}",
      }))
    """),
    python=python,
  )
  assert check.returncode == 0, check.stderr[-4000:]
  out = json.loads(check.stdout.splitlines()[-1])
  assert out == {
    "tensorflow": COLAB_TENSORFLOW,
    "works": 3.0,
    "tensorflow-cpu": False,
    "kept": before.stdout.strip(),
  }
  consistent = subprocess.run([python, "-m", "pip", "check"], capture_output=True, text=True)
  assert "tensorflow" not in consistent.stdout, consistent.stdout


def test_constraints_meet_every_requirement_of_setup_py():
  """constraints.txt (the tested versions) satisfies every requirement of the package,
  its extras' included, as installed from setup.py."""
  pins = {}
  for line in (ROOT / "constraints.txt").read_text().splitlines():
    if line.strip() and not line.startswith("#"):
      name, version = line.split("==")
      pins[canonicalize_name(name)] = version
  unmet = []
  for text in importlib.metadata.requires("splitmask_jax"):
    requirement = Requirement(text)
    name = canonicalize_name(requirement.name)
    if name == "splitmask-jax":  # an extra naming others
      continue
    if name not in pins or not requirement.specifier.contains(pins[name], prereleases=True):
      unmet.append(f"{text} (pinned: {pins.get(name)})")
  assert not unmet, unmet
