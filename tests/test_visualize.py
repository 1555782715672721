"""Pictures of masks, tokens and predictions, and the TensorBoard image summaries."""

import io
import math

import jax
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from splitmask_jax import config_base
from splitmask_jax import masking
from splitmask_jax import objectives
from splitmask_jax import train
from splitmask_jax import visualize
from splitmask_jax.data import datasets

from helpers import load_config


def _unit_rows(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _reference_picture(atom, token_patch, channels, patch_size):
  """An atom's picture by the rule of the module docstring, in plain numpy."""
  pixels = np.clip(atom * math.sqrt(atom.size), -1, 1).reshape(token_patch, token_patch, channels)
  pixels = np.round((pixels + 1) * 127.5).astype(np.uint8)
  factor = patch_size // token_patch
  return pixels.repeat(factor, axis=0).repeat(factor, axis=1)


def _image_of_tiles(tiles, grid):
  """[B, gh * gw, P, P, C] tiles, row-major -> [B, gh * P, gw * P, C]."""
  rows = [
    np.concatenate([tiles[:, r * grid[1] + c] for c in range(grid[1])], axis=2)
    for r in range(grid[0])
  ]
  return np.concatenate(rows, axis=1)


def _tiles_of_image(image, patch):
  """[H, W, C] -> [N, P, P, C], row-major."""
  h, w, c = image.shape
  return (
    image.reshape(h // patch, patch, w // patch, patch, c)
    .swapaxes(1, 2)
    .reshape(-1, patch, patch, c)
  )


@pytest.mark.parametrize("token_patch, patch_size, channels", [(8, 8, 1), (4, 8, 3)])
def test_token_map_of_an_image_made_of_atoms_reproduces_them(token_patch, patch_size, channels):
  grid, vocab = (3, 4), 12
  rng = np.random.default_rng(0)
  codebook = _unit_rows(rng.normal(size=(vocab, token_patch**2 * channels)).astype(np.float32))
  tokens = rng.integers(0, vocab, size=(2, grid[0] * grid[1]))
  tiles = np.stack(
    [
      [_reference_picture(codebook[t], token_patch, channels, patch_size) for t in row]
      for row in tokens
    ]
  )
  images = _image_of_tiles(tiles, grid)

  found = visualize.image_tokens(images, codebook, grid=grid, token_patch=token_patch)
  np.testing.assert_array_equal(found, tokens)
  token_map = visualize.token_map(images, codebook, grid=grid, token_patch=token_patch)
  assert token_map.dtype == np.uint8 and token_map.shape == images.shape
  np.testing.assert_array_equal(token_map, images)


def test_flat_atoms_render_black_and_white():
  """The sign of a flat atom survives: background black, bright fabric white."""
  flat = _unit_rows(np.stack([-np.ones(64), np.ones(64)]).astype(np.float32))
  pictures = np.asarray(visualize.render_atoms(flat, token_patch=8, channels=1, patch_size=16))
  assert pictures.shape == (2, 16, 16, 1) and pictures.dtype == np.uint8
  assert (pictures[0] == 0).all() and (pictures[1] == 255).all()


@pytest.mark.parametrize("objective", ["splitmask", "beit"])
def test_subsets_show_exactly_the_visible_patches(objective):
  grid, patch = (4, 4), 8
  mask_fn = masking.make_mask_fn(objective, grid, 0.5 if objective == "splitmask" else 0.4)
  rng = np.random.default_rng(1)
  masks = [mask_fn(rng) for _ in range(3)]
  # No pixel has the hidden grey's value, so a hidden patch is told from a seen one.
  images = rng.choice(np.setdiff1d(np.arange(256), [visualize.HIDDEN]), size=(3, 32, 32, 1)).astype(
    np.uint8
  )
  if objective == "splitmask":
    visible = {
      name: np.stack([m[f"visible_{b}"] for m in masks]) for name, b in (("A", "a"), ("B", "b"))
    }
    visible = {k: np.asarray(visualize.indices_to_mask(v, 16)) for k, v in visible.items()}
  else:
    visible = {"BEiT": ~np.stack([m["mask"] for m in masks])}
  for name, where in visible.items():
    shown = np.asarray(visualize.hide_patches(images, where, grid))
    assert shown.dtype == np.uint8 and shown.shape == images.shape
    for i in range(3):
      shown_tiles, tiles = _tiles_of_image(shown[i], patch), _tiles_of_image(images[i], patch)
      for k in range(16):
        if where[i, k]:
          np.testing.assert_array_equal(shown_tiles[k], tiles[k], err_msg=f"{name} {i} {k}")
        else:
          assert (shown_tiles[k] == visualize.HIDDEN).all(), (name, i, k)
  if objective == "splitmask":  # at 50% the two subsets are complements
    np.testing.assert_array_equal(visible["A"], ~visible["B"])


@pytest.mark.parametrize(
  "arg, columns",
  [
    ("test", ["original", "A sees", "A predicts", "B sees", "B predicts", "tokens"]),
    ("beit,test", ["original", "BEiT sees", "BEiT predicts", "tokens"]),
  ],
)
def test_reconstructions_of_both_objectives(arg, columns):
  """Seen patches keep their pixels; predicted ones are pictures of the argmax words."""
  config = load_config(arg)
  grid = config_base.grid_size(config)
  rng = np.random.default_rng(2)
  mask_fn = objectives.make_mask_fn(config, grid)
  masks = [mask_fn(rng) for _ in range(2)]
  batch = {k: np.stack([m[k] for m in masks]) for k in masks[0]}
  batch["image"] = rng.integers(0, 256, (2, 32, 32, 1), dtype=np.uint8)
  model = objectives.build_model(config, grid)
  example = objectives.example_inputs(config, masks[0])
  variables = model.init(jax.random.PRNGKey(0), *example, train=False)
  codebook = _unit_rows(rng.normal(size=(config.tokenizer.vocab_size, 64)).astype(np.float32))
  out = visualize.reconstructions(model, variables, codebook, batch, grid=grid, token_patch=8)
  assert list(out) == columns
  for picture in out.values():
    assert picture.shape == (2, 32, 32, 1) and picture.dtype == np.uint8

  name, x = columns[2], objectives.images_to_float(batch["image"])
  if config.objective == "splitmask":
    seen = visualize.indices_to_mask(batch["visible_a"], 16)
    logits = model.apply(
      variables,
      x,
      batch["visible_a"],
      batch["visible_b"],
      batch["masked_a"],
      batch["masked_b"],
      train=False,
    )["logits_a"]
    hidden = batch["masked_a"]
  else:
    seen = ~batch["mask"]
    logits = model.apply(variables, x, batch["mask"], batch["masked"], train=False)["logits"]
    hidden = batch["masked"]
  np.testing.assert_array_equal(visualize.hide_patches(out[name], seen, grid), out[columns[1]])
  words = np.argmax(np.asarray(logits), axis=-1)
  for i in range(2):
    tiles = _tiles_of_image(np.asarray(out[name][i]), 8)
    for word, k in zip(words[i], hidden[i]):
      np.testing.assert_array_equal(tiles[k], _reference_picture(codebook[word], 8, 1, 8))


def test_montage_and_strip_shapes():
  tiles = np.arange(5 * 4 * 3 * 2, dtype=np.uint8).reshape(5, 4, 3, 2)
  sheet = np.asarray(visualize.montage(tiles, 3, gap=1, fill=7))
  assert sheet.shape == (2 * 4 + 1, 3 * 3 + 2, 2) and sheet.dtype == np.uint8
  np.testing.assert_array_equal(sheet[5:9, 4:7], tiles[4])  # row 1, column 1
  assert (sheet[5:9, 8:] == 7).all()  # the missing sixth tile
  strips = np.asarray(
    visualize.summary_strips({"x": tiles[:2, :3, :3], "y": tiles[2:4, :3, :3]}, min_side=7)
  )
  # ceil(7 / 3) = 3 times larger, two tiles and a 2-pixel gap.
  assert strips.shape == (2, 9, 2 * 9 + 2, 2)
  np.testing.assert_array_equal(strips[1, :, 11:], tiles[3, :3, :3].repeat(3, 0).repeat(3, 1))


def test_summary_images_is_checked():
  config = load_config("test")
  config.summary_images = -1
  with pytest.raises(ValueError, match=r"config.summary_images=-1 .* >= 0"):
    config_base.validate_config(config)


def _summary_images(workdir):
  """{(tag, step): uint8 [n, H, W, C]} from the run's TensorBoard event file."""
  found = {}
  for path in workdir.glob("events.out.tfevents.*"):
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      for value in event.summary.value:
        if value.metadata.plugin_data.plugin_name == "images":
          # [width, height, png, png, ...]
          encoded = tf.make_ndarray(value.tensor)[2:]
          found[value.tag, event.step] = np.stack(
            [np.asarray(Image.open(io.BytesIO(png))) for png in encoded]
          )
  return found


def test_pretraining_writes_image_summaries(fake_fashion_mnist, tmp_path):
  """A real run's TensorBoard file holds the fixed validation images, their masks
  and the predictions of the saved model."""
  config = load_config("test")
  config.data.manual_dir = str(fake_fashion_mnist)
  config.data.data_dir = str(tmp_path / "tfds")
  config.knn.enabled = False
  config.num_steps, config.eval_every, config.summary_images = 4, 2, 3
  workdir = tmp_path / "run"
  train.train_and_evaluate(config, str(workdir))

  found = _summary_images(workdir)
  columns = ["original", "A sees", "A predicts", "B sees", "B predicts", "tokens"]
  tag = f"{visualize.SUMMARY_TAG}/{', '.join(columns)}"
  assert sorted(found) == [(tag, 2), (tag, 4)]
  strips = found[tag, 4]
  scale = visualize.SUMMARY_MIN_SIDE // 32  # 32 px images, enlarged to 64 px
  side = 32 * scale
  assert strips.shape[:3] == (3, side, len(columns) * (side + 2) - 2)
  strips = strips.reshape(*strips.shape[:3], -1)[..., :1]  # PNGs of one channel
  tiles = {
    name: strips[:, :, j * (side + 2) : j * (side + 2) + side][:, ::scale, ::scale]
    for j, name in enumerate(columns)
  }

  # The first validation images, resized to 32 px, with the masks that validation
  # draws for them from the run's seed.
  grid = config_base.grid_size(config)
  data_dir = str(tmp_path / "tfds")
  val = datasets.load_source("fashion_mnist", config.data.val_split, data_dir)
  images = np.stack(
    [
      np.asarray(
        Image.fromarray(val[i]["image"][..., 0]).resize((32, 32), Image.Resampling.BICUBIC)
      )[..., None]
      for i in range(3)
    ]
  )
  np.testing.assert_array_equal(tiles["original"], images)
  mask_fn = masking.make_mask_fn("splitmask", grid, objectives.mask_ratio(config))
  masks = [mask_fn(np.random.default_rng((config.seed, i))) for i in range(3)]
  for name, branch in (("A sees", "a"), ("B sees", "b")):
    visible = visualize.indices_to_mask(np.stack([m[f"visible_{branch}"] for m in masks]), 16)
    np.testing.assert_array_equal(tiles[name], visualize.hide_patches(images, visible, grid))

  # The saved model and codebook: the codebook is the one the run built, and they
  # predict on the host what the summary shows.
  variables, codebook, step = visualize.load_run(str(workdir))
  assert step == 4
  key = jax.random.split(jax.random.PRNGKey(config.seed))[1]
  train_source = datasets.load_source("fashion_mnist", "train", data_dir)
  np.testing.assert_array_equal(codebook, train.build_codebook(config, train_source, grid, key))
  batch = {k: np.stack([m[k] for m in masks]) for k in masks[0]}
  batch["image"] = images
  expected = visualize.reconstructions(
    objectives.build_model(config, grid),
    variables,
    codebook,
    batch,
    grid=grid,
    token_patch=config.tokenizer.patch_size,
  )
  assert list(expected) == columns
  for name in columns:
    np.testing.assert_array_equal(tiles[name], expected[name], err_msg=name)
  # The patches that A sees keep their pixels in its prediction.
  seen = np.asarray(visualize.indices_to_mask(batch["visible_a"], 16))
  predicted = tiles["A predicts"]
  np.testing.assert_array_equal(visualize.hide_patches(predicted, seen, grid), tiles["A sees"])
