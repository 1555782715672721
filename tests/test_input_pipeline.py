"""Tests of splitmask_jax.data.input_pipeline (grain pre-training and evaluation batches)."""

import functools
import itertools

import numpy as np
import pytest
from absl import flags
from PIL import Image

from splitmask_jax.data import input_pipeline as ip
from splitmask_jax.data import photometric

N = 24  # Examples of the test source.


def _constant_source(n=N, size=8, channels=1):
  """Example i is a constant image of value 10 * i + 5 (survives crop + resize)."""
  return [
    {"image": np.full((size, size, channels), 10 * i + 5, np.uint8), "label": i % 7}
    for i in range(n)
  ]


def _ids(images):
  """Example index of each constant image of a batch [b, H, W, C]."""
  values = images.reshape(len(images), -1)
  assert (values == values[:, :1]).all(), "a constant image did not stay constant"
  assert ((values[:, 0] - 5) % 10 == 0).all()
  return [int(v - 5) // 10 for v in values[:, 0]]


def _mask_fn(rng):
  return {"mask": rng.random(5) < 0.5, "ids": rng.integers(0, 100, (2, 3))}


def _take(ds, num_batches):
  it = iter(ds)
  return [next(it) for _ in range(num_batches)]


def _assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


def _pretrain(source=None, **kwargs):
  args = dict(batch_size=4, image_size=6, mask_fn=_mask_fn, seed=0)
  args.update(kwargs)
  return ip.pretrain_dataset(_constant_source() if source is None else source, **args)


def test_pretrain_shapes_and_dtypes():
  batch = _take(_pretrain(), 1)[0]
  assert set(batch) == {"image", "mask", "ids"}
  assert batch["image"].shape == (4, 6, 6, 1) and batch["image"].dtype == np.uint8
  assert batch["mask"].shape == (4, 5) and batch["mask"].dtype == bool
  assert batch["ids"].shape == (4, 2, 3)
  rgb = _take(_pretrain(_constant_source(channels=3), mask_fn=None), 1)[0]
  assert set(rgb) == {"image"} and rgb["image"].shape == (4, 6, 6, 3)


def test_pretrain_epochs_cover_every_example_once_and_reshuffle():
  batches = _take(_pretrain(), 2 * N // 4)
  ids = [_ids(b["image"]) for b in batches]
  epoch1 = list(itertools.chain(*ids[: N // 4]))
  epoch2 = list(itertools.chain(*ids[N // 4 :]))
  assert sorted(epoch1) == list(range(N))
  assert sorted(epoch2) == list(range(N))
  assert epoch1 != epoch2
  assert epoch1 != list(range(N))


def test_pretrain_is_deterministic_per_seed():
  first = _take(_pretrain(seed=7), 3)
  _assert_same_batches(first, _take(_pretrain(seed=7), 3))
  other = _take(_pretrain(seed=8), 3)
  assert [_ids(b["image"]) for b in first] != [_ids(b["image"]) for b in other]
  assert not all(np.array_equal(a["mask"], b["mask"]) for a, b in zip(first, other))


def test_masks_vary_across_examples():
  masks = np.concatenate([b["ids"] for b in _take(_pretrain(), 3)])
  assert len({m.tobytes() for m in masks}) == len(masks)


def test_augment_fn_follows_the_crop_and_flip_and_leaves_the_masks():
  solarize = functools.partial(
    photometric.small_data_augment,
    color_jitter_prob=0.0,
    grayscale_prob=0.0,
    blur_prob=0.0,
    solarize_prob=1.0,
  )
  plain = _take(_pretrain(), 3)
  solarized = _take(_pretrain(augment_fn=solarize), 3)
  for a, b in zip(plain, solarized):
    assert a.keys() == b.keys()
    np.testing.assert_array_equal(
      b["image"], np.where(a["image"] >= 128, 255 - a["image"], a["image"])
    )
    assert not np.array_equal(a["image"], b["image"])
    for key in ("mask", "ids"):
      np.testing.assert_array_equal(a[key], b[key])
  # The default augmentation draws a varying number of values per image.
  rgb = _constant_source(channels=3)
  plain = _take(_pretrain(rgb), 3)
  augmented = _take(_pretrain(rgb, augment_fn=photometric.small_data_augment), 3)
  assert not all(np.array_equal(a["image"], b["image"]) for a, b in zip(plain, augmented))
  for a, b in zip(plain, augmented):
    assert b["image"].shape == a["image"].shape and b["image"].dtype == np.uint8
    for key in ("mask", "ids"):
      np.testing.assert_array_equal(a[key], b[key])


def test_sharding_is_disjoint_and_matches_one_process_global_batches():
  steps = N // 8  # One epoch at a global batch of 8.
  per_process = [_take(_pretrain(process_index=p, process_count=2), steps) for p in range(2)]
  ids = [[_ids(b["image"]) for b in batches] for batches in per_process]
  seen = [set(itertools.chain(*i)) for i in ids]
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == set(range(N))
  # Together the processes' batches of a step are one process's batch of 8.
  single = _take(_pretrain(batch_size=8), steps)
  for step in range(steps):
    merged = {}
    for p in range(2):
      for k, i in enumerate(ids[p][step]):
        merged[i] = {key: v[k] for key, v in per_process[p][step].items()}
    alone = {
      i: {key: v[k] for key, v in single[step].items()}
      for k, i in enumerate(_ids(single[step]["image"]))
    }
    assert merged.keys() == alone.keys()
    for i in merged:
      for key in merged[i]:
        np.testing.assert_array_equal(merged[i][key], alone[i][key])


def test_state_restores_the_following_batches():
  it = iter(_pretrain())
  for _ in range(7):  # Past the first epoch (6 batches).
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(4)]
  restored = iter(_pretrain())
  restored.set_state(state)
  _assert_same_batches(expected, [next(restored) for _ in range(4)])


@pytest.fixture
def parsed_flags():
  """Worker processes read grain's absl flags, parsed by absl.app in a program."""
  was_parsed = flags.FLAGS.is_parsed()
  if not was_parsed:
    flags.FLAGS.mark_as_parsed()
  yield
  if not was_parsed:
    flags.FLAGS.unparse_flags()


def test_worker_processes_give_the_same_batches_and_resume(parsed_flags):
  expected = _take(_pretrain(), 5)
  ds = _pretrain(num_workers=2)
  it = iter(ds)
  try:
    got = [next(it) for _ in range(3)]
    state = it.get_state()
    got += [next(it) for _ in range(2)]
  finally:
    it.close()
  _assert_same_batches(expected, got)
  resumed = iter(ds)
  try:
    resumed.set_state(state)
    _assert_same_batches(expected[3:], [next(resumed) for _ in range(2)])
  finally:
    resumed.close()


def test_flip_happens_about_half_the_time():
  image = np.zeros((6, 6, 1), np.uint8)
  image[:, 3:] = 255  # Left half dark, right half bright.
  source = [{"image": image}] * 8
  batches = _take(
    _pretrain(source, batch_size=8, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), mask_fn=None), 50
  )
  images = np.concatenate([b["image"] for b in batches])
  flipped = images[:, :, ::-1]
  is_original = (images == image).all(axis=(1, 2, 3))
  is_flipped = (flipped == image).all(axis=(1, 2, 3))
  assert (is_original ^ is_flipped).all()
  assert 0.4 < is_flipped.mean() < 0.6


def test_crop_box_sampling_follows_the_rule():
  rng = np.random.default_rng(0)
  scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
  for _ in range(1000):
    top, left, h, w = ip.sample_crop_box(40, 60, rng, scale, ratio)
    assert 0 < h and 0 < w and top >= 0 and left >= 0
    assert top + h <= 40 and left + w <= 60
    # Rounding h and w to pixels moves area and aspect ratio by at most ~1 pixel.
    assert scale[0] * 2400 - 60 <= h * w <= 2400
    assert (w - 0.5) / (h + 0.5) <= ratio[1] and (w + 0.5) / (h - 0.5) >= ratio[0]
  # Areas of at most half a square image always fit at the first try, so the area
  # fraction is U(scale) and log(w / h) is U(log ratio), symmetric about 0.
  fractions, log_aspects, tops = [], [], []
  for _ in range(2000):
    top, _, h, w = ip.sample_crop_box(400, 400, rng, (0.1, 0.5), ratio)
    fractions.append(h * w / 400**2)
    log_aspects.append(np.log(w / h))
    tops.append(top / (400 - h))
  assert abs(np.mean(fractions) - 0.3) < 0.01
  assert abs(np.std(fractions) - 0.4 / np.sqrt(12)) < 0.01
  assert abs(np.mean(log_aspects)) < 0.01
  assert np.max(np.abs(log_aspects)) < np.log(4 / 3) + 0.01
  assert abs(np.mean(tops) - 0.5) < 0.02  # Uniform position.
  # A full-area square crop of a square image is the whole image.
  assert ip.sample_crop_box(9, 9, rng, (1.0, 1.0), (1.0, 1.0)) == (0, 0, 9, 9)


def test_crop_box_falls_back_to_a_centre_crop():
  # No box of >= 90% of a 2x100 image has an aspect ratio in [3/4, 4/3]: the
  # fallback keeps the full height and a width of round(2 * 4/3) = 3, centred;
  # likewise for the transposed image with a height of round(2 / (3/4)) = 3.
  rng = np.random.default_rng(0)
  assert ip.sample_crop_box(2, 100, rng, (0.9, 1.0)) == (0, 48, 2, 3)
  assert ip.sample_crop_box(100, 2, rng, (0.9, 1.0)) == (48, 0, 3, 2)


def test_augment_crops_the_sampled_box():
  # Reference: NumPy crop of the box drawn by the same generator, resized by
  # Pillow; resizing within the full image may differ at the crop's border.
  yy, xx = np.mgrid[0:32, 0:32]
  image = (4 * yy + 3 * xx).astype(np.uint8)[..., None]
  for seed in range(5):
    box_rng, aug_rng = np.random.default_rng(seed), np.random.default_rng(seed)
    top, left, h, w = ip.sample_crop_box(32, 32, box_rng, (0.2, 0.6))
    flip = box_rng.random() < 0.5
    crop = Image.fromarray(image[top : top + h, left : left + w, 0])
    want = np.asarray(crop.resize((16, 16), Image.Resampling.BICUBIC), np.float64)[..., None]
    if flip:
      want = want[:, ::-1]
    got = ip.augment(image, aug_rng, image_size=16, crop_scale=(0.2, 0.6))
    assert got.shape == (16, 16, 1) and got.dtype == np.uint8
    assert np.abs(got[2:-2, 2:-2] - want[2:-2, 2:-2]).max() <= 2


def test_eval_padding_labels_and_validity():
  source = _constant_source(n=10)
  batches = list(ip.eval_dataset(source, batch_size=4, image_size=6))
  assert len(batches) == 3
  images = np.concatenate([b["image"] for b in batches])
  labels = np.concatenate([b["label"] for b in batches])
  valid = np.concatenate([b["valid"] for b in batches])
  assert images.shape == (12, 6, 6, 1) and images.dtype == np.uint8
  assert labels.dtype == np.int32 and valid.dtype == bool
  np.testing.assert_array_equal(valid, [True] * 10 + [False] * 2)
  np.testing.assert_array_equal(labels[:10], [i % 7 for i in range(10)])
  assert _ids(images[:10]) == list(range(10))
  assert (images[10:] == 0).all() and (labels[10:] == 0).all()


def test_eval_sharding_and_subset():
  source = _constant_source(n=10)
  shards = [
    list(
      ip.eval_dataset(
        source, batch_size=2, image_size=8, process_index=p, process_count=2, num_examples=7
      )
    )
    for p in range(2)
  ]
  assert [len(s) for s in shards] == [2, 2]  # ceil(ceil(7 / 2) / 2)
  ids = []
  for shard in shards:
    images = np.concatenate([b["image"] for b in shard])
    valid = np.concatenate([b["valid"] for b in shard])
    ids.append(_ids(images[valid]))
  assert ids == [[0, 2, 4, 6], [1, 3, 5]]


def test_eval_masks_are_the_same_every_pass_and_per_example():
  source = _constant_source(n=10)
  ds = ip.eval_dataset(source, batch_size=4, image_size=8, mask_fn=_mask_fn, seed=3)
  first, second = list(ds), list(ds)
  _assert_same_batches(first, second)
  # Masks follow the example, not the batching or sharding.
  other = list(
    ip.eval_dataset(
      source, batch_size=3, image_size=8, mask_fn=_mask_fn, seed=3, process_index=1, process_count=2
    )
  )
  by_example = np.concatenate([b["ids"] for b in first])[:10]
  np.testing.assert_array_equal(np.concatenate([b["ids"] for b in other])[:5], by_example[1::2])
  assert len({m.tobytes() for m in by_example}) == 10
  shifted = list(ip.eval_dataset(source, batch_size=4, image_size=8, mask_fn=_mask_fn, seed=4))
  assert not np.array_equal(shifted[0]["ids"], first[0]["ids"])


def test_eval_without_labels():
  source = [{"image": np.zeros((8, 8, 3), np.uint8)}] * 3
  with pytest.raises(ValueError, match="with_labels=True needs records holding"):
    ip.eval_dataset(source, batch_size=2, image_size=4)
  batches = list(ip.eval_dataset(source, batch_size=2, image_size=4, with_labels=False))
  assert set(batches[0]) == {"image", "valid"}
  assert batches[0]["image"].shape == (2, 4, 4, 3)


@pytest.mark.parametrize(
  "kwargs, pattern",
  [
    (dict(batch_size=0), "batch_size"),
    (dict(image_size=0), "image_size"),
    (dict(process_index=2, process_count=2), "process_index"),
    (dict(seed=-1), "seed"),
    (dict(crop_scale=(0.5, 0.2)), "crop_scale"),
    (dict(crop_ratio=(0.0, 1.0)), "crop_ratio"),
    (dict(num_workers=-1), "num_workers"),
    (dict(prefetch_buffer=0), "prefetch_buffer"),
  ],
)
def test_pretrain_rejects_bad_arguments(kwargs, pattern):
  with pytest.raises(ValueError, match=pattern):
    _pretrain(**kwargs)


def test_rejects_bad_sources_and_masks():
  with pytest.raises(ValueError, match="empty"):
    _pretrain(source=[])
  with pytest.raises(ValueError, match="num_examples"):
    ip.eval_dataset(_constant_source(n=3), batch_size=2, image_size=4, num_examples=4)
  with pytest.raises(ValueError, match="uint8"):
    _take(_pretrain(source=[{"image": np.zeros((8, 8, 1), np.float32)}]), 1)
  with pytest.raises(ValueError, match="mask_fn must return"):
    _take(_pretrain(mask_fn=lambda rng: {"image": np.zeros(2)}), 1)
