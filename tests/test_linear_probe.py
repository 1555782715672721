"""Tests for splitmask_jax.linear_probe (per-block linear probes and their report)."""

import json
import os

import numpy as np
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression

from splitmask_jax import probe as linear_probe

_NUM_CLASSES = 4
_DIM = 16
# Every call on _blocks() data shares these, so the training compiles once.
_PROBE_ARGS = dict(num_classes=_NUM_CLASSES, epochs=30, batch_size=256, learning_rate=1e-2)


def _blocks(seed, n):
  """Features [n, 3, D] and labels [n]: block 0 is noise, block 1 is separable
  Gaussian blobs, block 2 is overlapping blobs (about 68% reachable)."""
  rng = np.random.default_rng(seed)
  centres = np.random.default_rng(123).normal(size=(2, _NUM_CLASSES, _DIM))
  centres /= np.linalg.norm(centres, axis=-1, keepdims=True)
  labels = rng.integers(0, _NUM_CLASSES, n)
  features = rng.normal(size=(n, 3, _DIM))
  features[:, 1] += 8.0 * centres[0, labels]
  features[:, 2] += 1.5 * centres[1, labels]
  return features.astype(np.float32), labels


@pytest.fixture(scope="module")
def data():
  train_x, train_y = _blocks(0, 3000)
  test_x, test_y = _blocks(1, 2000)
  return train_x, train_y, test_x, test_y


@pytest.fixture(scope="module")
def probe_accuracy(data):
  return linear_probe.train_linear_probes(*data, **_PROBE_ARGS, seed=0)


def _sklearn_accuracy(train_x, train_y, test_x, test_y):
  """Per-block top-1 of scikit-learn's logistic regression on standardised features."""
  mean = train_x.mean(0, dtype=np.float64)
  std = train_x.std(0, dtype=np.float64)
  accuracy = []
  for block in range(train_x.shape[1]):
    model = LogisticRegression(C=10.0, max_iter=2000)
    model.fit((train_x[:, block] - mean[block]) / std[block], train_y)
    accuracy.append(model.score((test_x[:, block] - mean[block]) / std[block], test_y))
  return np.array(accuracy)


def test_noise_block_is_chance_and_separable_block_is_perfect(probe_accuracy):
  assert probe_accuracy.dtype == np.float64 and probe_accuracy.shape == (3,)
  chance = 1 / _NUM_CLASSES
  assert abs(probe_accuracy[0] - chance) < 0.05
  assert probe_accuracy[1] > 0.995
  assert 0.55 < probe_accuracy[2] < 0.9


def test_matches_sklearn_logistic_regression(data, probe_accuracy):
  want = _sklearn_accuracy(*data)
  # The overlapping block is where an under-trained probe would show.
  np.testing.assert_allclose(probe_accuracy[1:], want[1:], atol=0.02)
  # On noise both are chance, each with its own +-1% sampling error.
  np.testing.assert_allclose(probe_accuracy[0], want[0], atol=0.05)


def test_same_seed_same_result(data, probe_accuracy):
  again = linear_probe.train_linear_probes(*data, **_PROBE_ARGS, seed=0)
  np.testing.assert_array_equal(again, probe_accuracy)


def test_invariant_to_per_dimension_scale_and_offset(data, probe_accuracy):
  train_x, train_y, test_x, test_y = data
  rng = np.random.default_rng(5)
  scale = np.exp(rng.uniform(-4, 4, size=train_x.shape[1:])).astype(np.float32)
  offset = rng.uniform(-100, 100, size=train_x.shape[1:]).astype(np.float32)
  got = linear_probe.train_linear_probes(
    train_x * scale + offset, train_y, test_x * scale + offset, test_y, **_PROBE_ARGS
  )
  np.testing.assert_allclose(got, probe_accuracy, atol=0.005)


def test_batch_larger_than_train_set_and_partial_last_test_batch(data):
  train_x, train_y, test_x, test_y = data
  # Training runs one batch of all 40; the test set is read as 64 + 64 + 22.
  got = linear_probe.train_linear_probes(
    train_x[:40],
    train_y[:40],
    test_x[:150],
    test_y[:150],
    num_classes=_NUM_CLASSES,
    epochs=100,
    batch_size=64,
    learning_rate=0.05,
  )
  want = _sklearn_accuracy(train_x[:40], train_y[:40], test_x[:150], test_y[:150])
  assert got[1] == want[1] == 1.0
  # Accuracies are counts over all 150 test examples, padding excluded.
  assert np.all(np.round(got * 150) == got * 150)


@pytest.mark.parametrize(
  "change, argument",
  [
    (lambda a: a.update(train_features=a["train_features"][:, 0]), "train_features"),
    (lambda a: a.update(train_features=a["train_features"].astype(np.int32)), "train_features"),
    (lambda a: a.update(test_features=a["test_features"][:, :2]), "test_features"),
    (lambda a: a.update(test_features=a["test_features"][..., :5]), "test_features"),
    (lambda a: a.update(train_labels=a["train_labels"][:-1]), "train_labels"),
    (lambda a: a.update(train_labels=a["train_labels"].astype(np.float32)), "train_labels"),
    (lambda a: a.update(test_labels=a["test_labels"] + 1), "test_labels"),
    (lambda a: a.update(test_labels=a["test_labels"] - 1), "test_labels"),
    (lambda a: a.update(num_classes=1), "num_classes"),
    (lambda a: a.update(batch_size=0), "batch_size"),
  ],
)
def test_bad_inputs_raise_naming_the_argument(data, change, argument):
  train_x, train_y, test_x, test_y = data
  args = dict(
    train_features=train_x[:8],
    train_labels=train_y[:8],
    test_features=test_x[:8],
    test_labels=np.arange(8) % _NUM_CLASSES,
    num_classes=_NUM_CLASSES,
  )
  change(args)
  with pytest.raises(ValueError, match=argument):
    linear_probe.train_linear_probes(**args)


def test_nan_features_raise(data):
  train_x, train_y, test_x, test_y = data
  test_x = test_x[:8].copy()
  test_x[3, 1, 2] = np.nan
  with pytest.raises(ValueError, match="test_features"):
    linear_probe.train_linear_probes(
      train_x[:8], train_y[:8], test_x, test_y[:8], num_classes=_NUM_CLASSES
    )


def _table_rows(markdown):
  """The data rows of the one Markdown table: lists of cell strings."""
  rows = [
    [c.strip() for c in line.strip("|").split("|")]
    for line in markdown.splitlines()
    if line.startswith("|")
  ]
  return rows[0], rows[2:]


def test_report_writes_numbers_table_and_plot(tmp_path):
  accuracies = {
    "pretrained": [0.1234, 0.5, 0.87654, 0.999],
    "random_init": np.array([0.25, 0.3049, 0.33, 0.3]),
  }
  folder = tmp_path / "probe"
  paths = linear_probe.write_probe_report(str(folder), accuracies, title="Fashion-MNIST")
  assert set(paths) == {"json", "markdown", "plot"}
  assert sorted(os.listdir(folder)) == ["probe.json", "probe.md", "probe.png"]

  with open(paths["json"]) as f:
    record = json.load(f)
  assert record["title"] == "Fashion-MNIST" and record["num_blocks"] == 4
  assert record["top1"] == {name: [float(v) for v in values] for name, values in accuracies.items()}

  with open(paths["markdown"]) as f:
    header, rows = _table_rows(f.read())
  assert header == ["block", "pretrained", "random_init"]
  assert rows == [
    ["1", "12.3", "25.0"],
    ["2", "50.0", "30.5"],
    ["3", "87.7", "33.0"],
    ["4", "99.9", "30.0"],
  ]

  with Image.open(paths["plot"]) as image:
    image.verify()
  with Image.open(paths["plot"]) as image:
    assert image.format == "PNG" and image.size[0] > 100 and image.size[1] > 100
    # Not a blank canvas: the lines and labels leave several colours.
    assert len(image.convert("RGB").getcolors(maxcolors=1 << 16) or range(1 << 16)) > 10


def test_report_replaces_previous_files(tmp_path):
  linear_probe.write_probe_report(str(tmp_path), {"a": [0.1, 0.2]}, title="t")
  paths = linear_probe.write_probe_report(
    str(tmp_path), {"a": [0.3, 0.4], "b": [0.5, 0.6]}, title="t"
  )
  with open(paths["json"]) as f:
    assert json.load(f)["top1"] == {"a": [0.3, 0.4], "b": [0.5, 0.6]}
  with open(paths["markdown"]) as f:
    assert _table_rows(f.read())[1] == [["1", "30.0", "50.0"], ["2", "40.0", "60.0"]]
  assert sorted(os.listdir(tmp_path)) == ["probe.json", "probe.md", "probe.png"]


@pytest.mark.parametrize(
  "accuracies", [{}, {"a": []}, {"a": [0.1, 0.2], "b": [0.3]}, {"a": [1.5]}, {"a": [float("nan")]}]
)
def test_report_rejects_bad_accuracies(tmp_path, accuracies):
  with pytest.raises(ValueError, match="accuracies"):
    linear_probe.write_probe_report(str(tmp_path), accuracies, title="t")
  assert not os.listdir(tmp_path)
