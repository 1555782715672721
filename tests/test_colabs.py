"""The notebooks of colabs/, executed headless end to end at tiny settings.

Each runs in a kernel of this interpreter (ipykernel's built-in 'python3' spec:
nothing is registered), from the repository root, with its `parameters` cell
followed by a cell of overrides: the tiny test configs, the fake Fashion-MNIST
files, and workdirs and figures in the test's temporary folder.
"""

import ast

import nbformat
import pytest
from nbclient import NotebookClient
from PIL import Image

from helpers import ROOT

COLABS = ROOT / "colabs"
NOTEBOOKS = ("quickstart", "finetune_and_probe", "tokenizers")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _read(name):
  return nbformat.read(COLABS / f"{name}.ipynb", as_version=4)


def _parameters_index(notebook):
  tagged = [
    i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", [])
  ]
  assert len(tagged) == 1, "exactly one cell tagged 'parameters'"
  return tagged[0]


def _execute(name, overrides, timeout=600):
  """Runs a notebook with `overrides` assigned after its parameters cell."""
  notebook = _read(name)
  index = _parameters_index(notebook)
  defined = {
    target.id
    for node in ast.parse(notebook.cells[index].source).body
    if isinstance(node, ast.Assign)
    for target in node.targets
  }
  assert set(overrides) <= defined, f"not parameters of {name}: {set(overrides) - defined}"
  source = "\n".join(f"{key} = {value!r}" for key, value in overrides.items())
  notebook.cells.insert(index + 1, nbformat.v4.new_code_cell(source))
  NotebookClient(
    notebook, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
  ).execute()
  return notebook


def _assert_pngs(folder, names):
  for name in names:
    path = folder / name
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    with Image.open(path) as image:
      image.verify()
    with Image.open(path) as image:
      assert image.format == "PNG" and min(image.size) >= 100, (path, image.size)


def _data(fake_fashion_mnist, tmp_path_factory):
  return {
    "manual_dir": str(fake_fashion_mnist),
    "data_dir": str(tmp_path_factory.getbasetemp() / "colabs_tfds"),
  }


@pytest.fixture(scope="module")
def quickstart(fake_fashion_mnist, tmp_path_factory):
  """The quickstart at the tiny settings: (its pre-training workdir, figures folder)."""
  root = tmp_path_factory.mktemp("quickstart")
  _execute(
    "quickstart",
    {
      "config_arg": "test",
      "workdir": str(root / "run"),
      "num_images": 3,
      "figures_dir": str(root / "figures"),
      **_data(fake_fashion_mnist, tmp_path_factory),
    },
  )
  return root / "run", root / "figures"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebooks_have_no_outputs(name):
  notebook = _read(name)
  nbformat.validate(notebook)
  _parameters_index(notebook)
  for cell in notebook.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]


@pytest.mark.slow
def test_quickstart(quickstart):
  workdir, figures = quickstart
  _assert_pngs(figures, ["quickstart_curves.png", "quickstart_reconstructions.png"])
  assert (workdir / "checkpoints" / "4").is_dir()


@pytest.mark.slow
def test_finetune_and_probe(quickstart, fake_fashion_mnist, tmp_path, tmp_path_factory):
  pretrain_workdir, _ = quickstart
  figures = tmp_path / "figures"
  notebook = _execute(
    "finetune_and_probe",
    {
      "pretrain_workdir": str(pretrain_workdir),
      "config_arg": "test",
      "finetune_workdir": str(tmp_path / "ft"),
      "baseline_workdir": str(tmp_path / "ft0"),
      "probe_workdir": str(tmp_path / "probe"),
      "figures_dir": str(figures),
      **_data(fake_fashion_mnist, tmp_path_factory),
    },
  )
  _assert_pngs(figures, ["finetune_curves.png", "finetune_probe.png"])
  printed = "".join(
    output.get("text", "") for cell in notebook.cells for output in cell.get("outputs", [])
  )
  assert "pre-trained: test top-1" in printed and "random init: test top-1" in printed
  assert (tmp_path / "probe" / "probe.json").exists()


def test_tokenizers(fake_fashion_mnist, tmp_path, tmp_path_factory):
  figures = tmp_path / "figures"
  _execute(
    "tokenizers",
    {
      "config_arg": "test",
      "num_images": 3,
      "num_usage_images": 40,
      "num_atoms": 16,
      "figures_dir": str(figures),
      **_data(fake_fashion_mnist, tmp_path_factory),
    },
  )
  _assert_pngs(figures, ["tokenizers_atoms.png", "tokenizers_token_maps.png"])
