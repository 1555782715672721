"""Tests for splitmask_jax.masking."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from scipy import ndimage

from splitmask_jax import masking

GRID = (14, 14)
N = 196


def reference_beit(
  uniform, randint, height, width, target, min_num, max_num, min_aspect=0.3, initial=None
):
  """BEiT's MaskingGenerator, written out literally.

  `uniform(a, b)` and `randint(a, b)` follow Python's `random` semantics
  (randint inclusive of b). `initial` extends it with pre-masked cells.
  """
  log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
  mask = np.zeros((height, width), dtype=int)
  if initial is not None:
    mask[initial] = 1
  count = int(mask.sum())
  while count < target:
    max_mask = min(target - count, max_num)
    delta = 0
    for _ in range(10):
      area = uniform(min_num, max_mask)
      aspect = math.exp(uniform(*log_aspect))
      h = int(round(math.sqrt(area * aspect)))
      w = int(round(math.sqrt(area / aspect)))
      if w < width and h < height:
        top = randint(0, height - h)
        left = randint(0, width - w)
        already = mask[top : top + h, left : left + w].sum()
        if 0 < h * w - already <= max_mask:
          for i in range(top, top + h):
            for j in range(left, left + w):
              if mask[i, j] == 0:
                mask[i, j] = 1
                delta += 1
        if delta > 0:
          break
    if delta == 0:
      break
    count += delta
  return mask.astype(bool)


def python_reference_masks(seed, draws, target):
  rand = random.Random(seed)
  return np.stack(
    [reference_beit(rand.uniform, rand.randint, 14, 14, target, 16, 75) for _ in range(draws)]
  )


def block_masks(seed, draws, target, **kwargs):
  rng = np.random.default_rng(seed)
  return np.stack(
    [
      masking.block_mask(rng, GRID, target, min_block=16, max_block=75, **kwargs)
      for _ in range(draws)
    ]
  )


def test_default_block_sizes():
  assert masking.default_block_sizes(196) == (16, 75)
  assert masking.default_block_sizes(256) == (21, 98)
  assert masking.default_block_sizes(49) == (4, 19)
  assert masking.default_block_sizes(1) == (1, 1)


def test_block_mask_follows_beit_draw_for_draw():
  # Fed the same stream, the reference and block_mask must agree exactly,
  # including budgets below min_block and an initial mask.
  for seed, (grid, target, lo, hi, initial_count) in enumerate(
    [
      ((14, 14), 75, 16, 75, 0),
      ((14, 14), 98, 16, 75, 0),
      ((14, 14), 98, 16, 75, 49),
      ((5, 7), 20, 3, 8, 5),
      ((1, 9), 4, 1, 3, 0),
    ]
  ):
    ref_rng = np.random.default_rng(seed)
    rng = np.random.default_rng(seed)
    init_rng = np.random.default_rng(100 + seed)
    for _ in range(50):
      initial = masking.uniform_mask(init_rng, grid[0] * grid[1], initial_count).reshape(grid)
      expected = reference_beit(
        lambda a, b: a + (b - a) * ref_rng.random(),
        # masking's randint: one float draw, floor(U * (b - a + 1)).
        lambda a, b: a + int(ref_rng.random() * (b - a + 1)),
        *grid,
        target,
        lo,
        hi,
        initial=initial,
      )
      got = masking.block_mask(rng, grid, target, min_block=lo, max_block=hi, initial=initial)
      assert got.dtype == np.bool_ and got.shape == grid
      np.testing.assert_array_equal(got, expected)
      assert not (initial & ~got).any()
      assert initial.sum() == initial_count  # not modified in place


@pytest.mark.parametrize("target", [75, 98])
def test_block_mask_distribution_matches_python_beit(target):
  draws = 2000
  ref = python_reference_masks(0, draws, target)
  ours = block_masks(1, draws, target)
  ref_counts = ref.reshape(draws, -1).sum(1)
  counts = ours.reshape(draws, -1).sum(1)
  assert counts.max() == target  # never overshoots
  # Standard errors: ~0.015 on the difference of fractions, ~0.03 on means,
  # ~0.016 per cell frequency (max over 196 cells ~0.055).
  assert abs((counts == target).mean() - (ref_counts == target).mean()) < 0.06
  assert abs(counts.mean() - ref_counts.mean()) < 0.3
  assert np.abs(ours.mean(0) - ref.mean(0)).max() < 0.08


@pytest.mark.parametrize(
  "target,exact_fraction,mean",
  [
    (75, 2 / 3, 74.5),
    (98, 0.70, 97.6),
  ],
)
def test_block_mask_known_figures(target, exact_fraction, mean):
  counts = block_masks(2, 2000, target).reshape(2000, -1).sum(1)
  assert abs((counts == target).mean() - exact_fraction) < 0.05
  assert abs(counts.mean() - mean) < 0.15


def test_block_mask_is_blocky():
  # Block masks have far more masked 4-neighbour pairs than uniform ones.
  rng = np.random.default_rng(0)
  for _ in range(20):
    block = masking.beit_mask(rng, GRID, 75, min_block=16, max_block=75)
    uniform = masking.uniform_mask(rng, N, 75)
    pairs = lambda m: (m[1:] & m[:-1]).sum() + (m[:, 1:] & m[:, :-1]).sum()
    assert pairs(block.reshape(GRID)) > 1.5 * pairs(uniform.reshape(GRID))


def num_blocks(masks, grid):
  """4-connected blocks of each mask: bool [D, H * W] or [D, H, W] -> int [D]."""
  return np.array([ndimage.label(m.reshape(grid))[1] for m in masks])


def histogram_distance(a, b):
  """Total variation distance between the empirical distributions of two int samples."""
  size = max(a.max(), b.max()) + 1
  share = lambda x: np.bincount(x, minlength=size) / len(x)
  return 0.5 * np.abs(share(a) - share(b)).sum()


@pytest.mark.parametrize(
  "grid,target,min_block,max_block",
  [
    (GRID, 75, 16, 75),  # BEiT's pre-training masks
    ((4, 4), 6, 1, 6),  # the demo's BEiT masks (75/196 of 16), default block sizes
    ((4, 4), 8, 1, 6),  # the demo's SplitMask A (half of 16)
  ],
)
def test_exact_count_block_masks_keep_beit_block_shapes(grid, target, min_block, max_block):
  # BEiT's own generator (its count not exact) against ours (exact): the number of
  # 4-connected blocks per mask must match. On 14x14 at 75, topping short draws up
  # with single cells (the former rule) gives 1.79 blocks per mask against BEiT's
  # 1.43 (1.48 among its draws of exactly 75) and a histogram distance ~0.2.
  draws = 2000
  rand = random.Random(0)
  ref = np.stack(
    [
      reference_beit(rand.uniform, rand.randint, *grid, target, min_block, max_block)
      for _ in range(draws)
    ]
  )
  rng = np.random.default_rng(1)
  ours = np.stack(
    [
      masking.beit_mask(rng, grid, target, min_block=min_block, max_block=max_block)
      for _ in range(draws)
    ]
  )
  assert (ours.sum(1) == target).all()
  ref_blocks, our_blocks = num_blocks(ref, grid), num_blocks(ours, grid)
  # Ours are BEiT's masks of exactly `target` cells: compared with its exact draws
  # (standard errors: ~0.02 on a mean, ~0.015 on a bin's share), and, looser, with
  # all its draws.
  exact = ref.reshape(draws, -1).sum(1) == target
  assert abs(our_blocks.mean() - ref_blocks[exact].mean()) < 0.1
  assert histogram_distance(our_blocks, ref_blocks[exact]) < 0.08
  assert abs(our_blocks.mean() - ref_blocks.mean()) < 0.12


def test_split_block_subsets_keep_beit_block_shapes():
  # At 0.75 on 14x14, A is BEiT's mask of 49 cells and B what BEiT's loop adds
  # around A up to 98: both compared with the reference generator's draws that
  # hit those counts.
  draws = 2000
  rand = random.Random(0)
  ref_a, ref_b = [], []
  for _ in range(draws):
    a = reference_beit(rand.uniform, rand.randint, 14, 14, 49, 16, 75)
    grown = reference_beit(rand.uniform, rand.randint, 14, 14, 98, 16, 75, initial=a)
    if a.sum() == 49 and grown.sum() == 98:
      ref_a.append(a)
      ref_b.append(grown & ~a)
  rng = np.random.default_rng(2)
  ours_a, ours_b = [], []
  for _ in range(len(ref_a)):
    split = masking.split_patches(rng, GRID, 0.75, kind="block")
    for subset, out in (("visible_a", ours_a), ("visible_b", ours_b)):
      mask = np.zeros(N, dtype=bool)
      mask[split[subset]] = True
      out.append(mask)
  for ref, ours in ((ref_a, ours_a), (ref_b, ours_b)):
    ref_blocks, our_blocks = num_blocks(ref, GRID), num_blocks(ours, GRID)
    assert abs(our_blocks.mean() - ref_blocks.mean()) < 0.15
    assert histogram_distance(our_blocks, ref_blocks) < 0.1


def test_beit_mask_falls_back_to_a_top_up_when_blocks_cannot_reach_the_count(monkeypatch):
  # On a 1x9 grid no rectangle fits BEiT's h < H: every draw is empty, so after
  # MAX_BLOCK_DRAWS the count is reached by uniform single cells.
  monkeypatch.setattr(masking, "MAX_BLOCK_DRAWS", 3)
  rng = np.random.default_rng(0)
  counts = np.zeros(9)
  for _ in range(300):
    mask = masking.beit_mask(rng, (1, 9), 4, min_block=1, max_block=3)
    assert mask.sum() == 4
    counts += mask
  assert np.abs(counts / 300 - 4 / 9).max() < 0.1  # standard error ~0.03


def test_exact_count_top_up_is_uniform_and_respects_allowed():
  rng = np.random.default_rng(0)
  mask = np.zeros(12, dtype=bool)
  mask[[0, 1]] = True
  allowed = np.ones(12, dtype=bool)
  allowed[[2, 3]] = False
  draws = 4000
  added = np.zeros(12)
  for _ in range(draws):
    out = masking.exact_count(rng, mask, 5, allowed)
    assert out.sum() == 5 and out[[0, 1]].all() and not out[[2, 3]].any()
    added += out & ~mask
  freq = added[4:] / draws  # 3 cells drawn among 8 candidates
  assert np.abs(freq - 3 / 8).max() < 0.04  # standard error ~0.008
  assert masking.exact_count(rng, mask, 2, allowed) is not mask


def test_exact_count_trim_is_uniform_and_protects_disallowed():
  rng = np.random.default_rng(1)
  mask = np.ones(10, dtype=bool)
  mask[9] = False
  allowed = np.arange(10) < 6
  draws = 4000
  cleared = np.zeros(10)
  for _ in range(draws):
    out = masking.exact_count(rng, mask, 6, allowed)
    assert out.sum() == 6 and out[6:9].all() and not out[9]
    cleared += mask & ~out
  assert np.abs(cleared[:6] / draws - 0.5).max() < 0.05  # s.e. ~0.008
  assert not cleared[6:].any()


def test_beit_and_uniform_masks_exact_counts():
  rng = np.random.default_rng(0)
  for _ in range(200):
    for grid, count in [(GRID, 75), (GRID, 98), ((3, 5), 7)]:
      mask = masking.beit_mask(rng, grid, count, min_block=2, max_block=count)
      assert mask.dtype == np.bool_ and mask.shape == (grid[0] * grid[1],)
      assert mask.sum() == count
    mask = masking.uniform_mask(rng, N, 147)
    assert mask.dtype == np.bool_ and mask.shape == (N,) and mask.sum() == 147


def check_split(split, num_patches, num_visible):
  assert set(split) == {"visible_a", "visible_b", "masked_a", "masked_b"}
  for key, value in split.items():
    assert value.dtype == np.int32, key
    assert np.all(np.diff(value) > 0), key
  assert split["visible_a"].shape == split["visible_b"].shape == (num_visible,)
  everything = np.arange(num_patches)
  for branch in "ab":
    np.testing.assert_array_equal(
      split[f"masked_{branch}"], np.setdiff1d(everything, split[f"visible_{branch}"])
    )
  assert not np.intersect1d(split["visible_a"], split["visible_b"]).size


@pytest.mark.parametrize("kind", ["block", "uniform"])
def test_split_patches(kind):
  rng = np.random.default_rng(0)
  for _ in range(100):
    half = masking.split_patches(rng, GRID, 0.5, kind=kind)
    check_split(half, N, 98)
    # A mask and its complement.
    np.testing.assert_array_equal(half["visible_b"], half["masked_a"])
    check_split(masking.split_patches(rng, GRID, 0.75, kind=kind), N, 49)
    # Odd grid: one patch is in neither subset.
    check_split(masking.split_patches(rng, (3, 5), 0.5, kind=kind), 15, 7)
    check_split(masking.split_patches(rng, (4, 4), 0.8, kind=kind, min_block=1, max_block=2), 16, 3)


def test_split_block_second_subset_is_topped_up_outside_a():
  # At 0.75 B is grown by blocks around A; it must still hold exactly 49 cells
  # and be spatially clustered (blocks, not only top-up cells).
  rng = np.random.default_rng(3)
  pairs = []
  for _ in range(50):
    split = masking.split_patches(rng, GRID, 0.75, kind="block")
    b = np.zeros(N, dtype=bool)
    b[split["visible_b"]] = True
    b = b.reshape(GRID)
    pairs.append((b[1:] & b[:-1]).sum() + (b[:, 1:] & b[:, :-1]).sum())
  # Uniform 49 of 196 cells: ~364 pairs * (49/196)^2 ~ 22 adjacent pairs.
  assert np.mean(pairs) > 40


@pytest.mark.parametrize("kind", ["block", "uniform"])
def test_make_mask_fn(kind):
  beit = masking.make_mask_fn("beit", GRID, 75 / 196, kind=kind)
  split = masking.make_mask_fn("splitmask", GRID, 0.75, kind=kind)
  rng = np.random.default_rng(0)
  for _ in range(50):
    out = beit(rng)
    assert set(out) == {"mask", "masked"}
    assert out["mask"].dtype == np.bool_ and out["mask"].shape == (N,)
    assert out["mask"].sum() == 75
    assert out["masked"].dtype == np.int32
    np.testing.assert_array_equal(out["masked"], np.flatnonzero(out["mask"]))
    check_split(split(rng), N, 49)
  assert masking.make_mask_fn("beit", GRID, 0.4)(rng)["mask"].sum() == 78


@pytest.mark.parametrize(
  "objective,kind",
  [("beit", "block"), ("beit", "uniform"), ("splitmask", "block"), ("splitmask", "uniform")],
)
def test_reproducible_from_seed(objective, kind):
  fn = masking.make_mask_fn(objective, GRID, 0.5, kind=kind)
  draw = lambda seed: fn(np.random.default_rng(seed))
  first, again, other = draw(7), draw(7), draw(8)
  for key in first:
    np.testing.assert_array_equal(first[key], again[key])
  assert any(not np.array_equal(first[k], other[k]) for k in first)


def raises(name, fn, *args, **kwargs):
  with pytest.raises(ValueError, match=name):
    fn(*args, **kwargs)


def test_value_errors_name_the_argument():
  rng = np.random.default_rng(0)
  bools = lambda n: np.zeros(n, dtype=bool)
  raises("num_patches", masking.default_block_sizes, 0)
  raises("num_patches", masking.default_block_sizes, 1.5)

  block = lambda **kw: masking.block_mask(
    **{"rng": rng, "grid": (4, 4), "num_masked": 4, "min_block": 2, "max_block": 4, **kw}
  )
  raises("rng", block, rng=random.Random(0))
  raises("grid", block, grid=(0, 4))
  raises("grid", block, grid=(4,))
  raises("grid", block, grid=(4.0, 4))
  raises("num_masked", block, num_masked=17)
  raises("num_masked", block, num_masked=-1)
  raises("min_block", block, min_block=0)
  raises("min_block", block, min_block=5)  # > max_block
  raises("max_block", block, max_block=True)
  raises("min_aspect", block, min_aspect=0.0)
  raises("min_aspect", block, min_aspect=1.5)
  raises("initial", block, initial=bools(16))
  raises("initial", block, initial=np.zeros((4, 4), dtype=int))

  raises("mask", masking.exact_count, rng, np.zeros(4, dtype=int), 1)
  raises("mask", masking.exact_count, rng, bools((2, 2)), 1)
  raises("count", masking.exact_count, rng, bools(4), 5)
  raises("allowed", masking.exact_count, rng, bools(4), 1, bools(3))
  raises("count", masking.exact_count, rng, bools(4), 3, np.array([True, True, False, False]))
  raises("rng", masking.exact_count, None, bools(4), 1)

  raises("num_masked", masking.beit_mask, rng, (4, 4), 20, min_block=1, max_block=4)
  raises("num_masked", masking.uniform_mask, rng, 4, 5)
  raises("num_patches", masking.uniform_mask, rng, 0, 0)

  raises("ratio", masking.split_patches, rng, GRID, 0.4, kind="block")
  raises("ratio", masking.split_patches, rng, GRID, 1.0, kind="uniform")
  raises("ratio", masking.split_patches, rng, (2, 2), 0.9, kind="uniform")
  raises("kind", masking.split_patches, rng, GRID, 0.5, kind="grid")
  raises("grid", masking.split_patches, rng, (14, -1), 0.5, kind="block")
  raises(
    "min_block", masking.split_patches, rng, GRID, 0.5, kind="block", min_block=80, max_block=75
  )

  make = masking.make_mask_fn
  raises("objective", make, "mae", GRID, 0.5)
  raises("kind", make, "beit", GRID, 0.5, kind="random")
  raises("grid", make, "beit", (14, 0), 0.5)
  raises("ratio", make, "beit", GRID, 0.0)
  raises("ratio", make, "beit", GRID, 1.0)
  raises("ratio", make, "beit", GRID, "0.5")
  raises("ratio", make, "beit", (2, 2), 0.1)  # masks no patch
  raises("ratio", make, "splitmask", GRID, 0.4)
  raises("ratio", make, "splitmask", (1, 1), 0.5)  # no visible patch
  raises("min_block", make, "splitmask", GRID, 0.5, min_block=0)
  raises("min_block", make, "beit", GRID, 0.4, min_block=20, max_block=10)
