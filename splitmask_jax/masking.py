"""Patch masks for BEiT and the SplitMask split, drawn on the host with NumPy.

Masks are drawn per example inside the input pipeline from a seeded
`np.random.Generator`. Patch positions are flattened row-major over the patch
grid: index = row * W + col.

Block masking (`block_mask`) reproduces BEiT's generator: blocks of random area
and aspect ratio are placed until the target count is reached or a placement
adds nothing. It often stops short of the target (on 14x14 with a target of 75
it returns ~74.5 cells on average, exactly 75 only ~2/3 of the time).

Exact-count rule (compiled steps need static shapes): every mask used for
training has exactly the requested count. Block masks reach it by redrawing:
`beit_mask` draws `block_mask` again until a draw hits the count, so its masks
are BEiT's own masks of that count, with BEiT's block shapes (about 1.5 draws on
average on 14x14 at 75, 1.48 blocks per mask against BEiT's 1.43 over all its
draws). Topping a short draw up with single cells instead would scatter 1-11
cells over a third of the masks (about 1.8 blocks per mask). Only when
`MAX_BLOCK_DRAWS` draws in a row miss the count (never seen with the default
block sizes; possible with a min_block large against the target) does the
closest draw get topped up by `exact_count`, which sets cells drawn uniformly
among the unset ones (or clears set ones) that `allowed` permits.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable

import numpy as np

# BEiT's block-size bounds on its 14x14 grid, rescaled on other grids.
_BEIT_NUM_PATCHES = 196
_BEIT_MIN_BLOCK = 16
_BEIT_MAX_BLOCK = 75
# Rectangle placements tried per block before giving up, as in BEiT.
_ATTEMPTS = 10
# Draws of a block mask that may miss the exact count before the closest is topped
# up. On 14x14 at 75 a draw hits it with probability ~2/3, so 100 misses in a row
# (~1e-48) do not happen; a setup where a miss is near certain costs 100 draws.
MAX_BLOCK_DRAWS = 100

OBJECTIVES = ("beit", "splitmask")
KINDS = ("block", "uniform")


def _check_int(name, value, low, high=None):
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise ValueError(f"{name} must be an integer, got {value!r}")
  if value < low or (high is not None and value > high):
    upper = "inf" if high is None else high
    raise ValueError(f"{name} must be in [{low}, {upper}], got {value!r}")
  return int(value)


def _check_grid(grid):
  if (
    not isinstance(grid, (tuple, list))
    or len(grid) != 2
    or any(isinstance(g, bool) or not isinstance(g, numbers.Integral) or g < 1 for g in grid)
  ):
    raise ValueError(f"grid must be a pair of positive integers (height, width), got {grid!r}")
  return int(grid[0]), int(grid[1])


def _check_rng(rng):
  if not isinstance(rng, np.random.Generator):
    raise ValueError(f"rng must be a numpy.random.Generator, got {type(rng)}")


def _check_bool_array(name, value, shape):
  value = np.asarray(value)
  if value.dtype != np.bool_ or value.shape != shape:
    raise ValueError(
      f"{name} must be a bool array of shape {shape}, got {value.dtype} {value.shape}"
    )
  return value


def _check_block_sizes(min_block, max_block):
  min_block = _check_int("min_block", min_block, 1)
  max_block = _check_int("max_block", max_block, 1)
  if min_block > max_block:
    raise ValueError(
      f"min_block must be <= max_block, got min_block={min_block} > max_block={max_block}"
    )
  return min_block, max_block


def _block_sizes(num_patches, min_block, max_block):
  """Fills in `default_block_sizes` for bounds left as None, then checks."""
  default_min, default_max = default_block_sizes(num_patches)
  return _check_block_sizes(
    default_min if min_block is None else min_block, default_max if max_block is None else max_block
  )


def _uniform(rng, a, b):
  # Python's random.uniform: a + (b - a) * U[0, 1), well defined for b < a.
  return a + (b - a) * rng.random()


def _randint(rng, a, b):
  # Python's random.randint: uniform in {a, ..., b}. From one float draw: a few
  # times faster than Generator.integers, and the masks are drawn per example.
  return a + int(rng.random() * (b - a + 1))


def default_block_sizes(num_patches: int) -> tuple[int, int]:
  """BEiT's block-size bounds (16 and 75 of 196 patches) scaled to a grid.

  Args:
    num_patches: number of patches in the grid, >= 1.

  Returns:
    (min_block, max_block): round(16 / 196 * num_patches) and
    round(75 / 196 * num_patches), each at least 1. (16, 75) for 196.
  """
  num_patches = _check_int("num_patches", num_patches, 1)
  scale = num_patches / _BEIT_NUM_PATCHES
  return (max(1, round(_BEIT_MIN_BLOCK * scale)), max(1, round(_BEIT_MAX_BLOCK * scale)))


def block_mask(
  rng: np.random.Generator,
  grid: tuple[int, int],
  num_masked: int,
  *,
  min_block: int,
  max_block: int,
  min_aspect: float = 0.3,
  initial: np.ndarray | None = None,
) -> np.ndarray:
  """BEiT's random block masking, with BEiT's (not exact) count.

  While fewer than `num_masked` cells are masked, one block is placed with a
  budget of min(num_masked - count, max_block) new cells; the loop stops early
  when a placement adds nothing. A placement makes up to 10 attempts: area ~
  uniform(min_block, budget) (Python semantics: in [budget, min_block] when
  budget < min_block), log aspect ~ uniform(log min_aspect, -log min_aspect),
  h = round(sqrt(area * aspect)), w = round(sqrt(area / aspect)); a geometry
  with h < H and w < W gets top in {0..H-h} and left in {0..W-w}; the rectangle
  is masked if the number of its not yet masked cells is in (0, budget]. The
  attempts stop once a rectangle was masked.

  Args:
    rng: the only source of randomness.
    grid: (H, W) patch grid.
    num_masked: target count in [0, H * W], cells of `initial` included.
    min_block: smallest block area drawn, >= 1.
    max_block: largest number of new cells one block may add, >= min_block.
    min_aspect: aspect ratios are drawn in [min_aspect, 1 / min_aspect];
      in (0, 1].
    initial: optional bool [H, W], cells counted as masked before the first
      block; they stay masked. If they already reach `num_masked`, no block is
      placed.

  Returns:
    bool [H, W] mask with at most max(num_masked, initial count) set cells.
  """
  _check_rng(rng)
  height, width = _check_grid(grid)
  num_masked = _check_int("num_masked", num_masked, 0, height * width)
  min_block, max_block = _check_block_sizes(min_block, max_block)
  if (
    isinstance(min_aspect, bool)
    or not isinstance(min_aspect, numbers.Real)
    or not 0 < min_aspect <= 1
  ):
    raise ValueError(f"min_aspect must be in (0, 1], got {min_aspect!r}")
  if initial is None:
    mask = np.zeros((height, width), dtype=bool)
  else:
    mask = _check_bool_array("initial", initial, (height, width)).copy()
  _place_blocks(rng, mask, num_masked, min_block, max_block, min_aspect)
  return mask


def _place_blocks(rng, mask, num_masked, min_block, max_block, min_aspect=0.3) -> int:
  """`block_mask`'s loop on `mask` (bool [H, W], set in place), unchecked; returns
  the number of set cells."""
  height, width = mask.shape
  log_aspect = (math.log(min_aspect), -math.log(min_aspect))
  count = np.count_nonzero(mask)
  while count < num_masked:
    budget = min(num_masked - count, max_block)
    added = 0
    for _ in range(_ATTEMPTS):
      area = _uniform(rng, min_block, budget)
      aspect = math.exp(_uniform(rng, *log_aspect))
      h = round(math.sqrt(area * aspect))
      w = round(math.sqrt(area / aspect))
      if h < height and w < width:
        top = _randint(rng, 0, height - h)
        left = _randint(rng, 0, width - w)
        block = mask[top : top + h, left : left + w]
        new = h * w - np.count_nonzero(block)
        if 0 < new <= budget:
          block[...] = True
          added = new
      if added:
        break
    if not added:
      break
    count += added
  return count


def _exact_blocks(rng, grid, num_masked, min_block, max_block, initial=None) -> np.ndarray:
  """A block mask of exactly `num_masked` cells: `block_mask` redrawn until a draw
  hits the count (the exact-count rule), unchecked.

  Args:
    initial: optional bool [H, W] cells set before every draw (kept).

  Returns:
    bool [H * W]. After MAX_BLOCK_DRAWS misses, the draw closest to the count
    topped up by `exact_count` outside `initial`.
  """
  closest, closest_count = None, -1
  for _ in range(MAX_BLOCK_DRAWS):
    mask = np.zeros(grid, dtype=bool) if initial is None else initial.copy()
    # Never above the target: BEiT's loop adds at most the budget left.
    count = _place_blocks(rng, mask, num_masked, min_block, max_block)
    if count == num_masked:
      return mask.reshape(-1)
    if count > closest_count:
      closest, closest_count = mask, count
  allowed = None if initial is None else ~initial.reshape(-1)
  return exact_count(rng, closest.reshape(-1), num_masked, allowed)


def exact_count(
  rng: np.random.Generator, mask: np.ndarray, count: int, allowed: np.ndarray | None = None
) -> np.ndarray:
  """Returns `mask` with exactly `count` cells set by uniform changes of single cells.

  Uniform masks, and the last resort of the exact-count rule for block masks.
  Too few set cells: cells drawn uniformly without replacement among the unset
  cells of `allowed` are set. Too many: cells drawn uniformly without
  replacement among the set cells of `allowed` are cleared. Cells outside
  `allowed` keep their value. Draws nothing when the count is already right.

  Args:
    rng: the only source of randomness.
    mask: bool [N].
    count: target number of set cells, in [0, N].
    allowed: optional bool [N], the cells that may change (default: all).

  Returns:
    bool [N], a new array.

  Raises:
    ValueError: if `count` cannot be reached by changing allowed cells only.
  """
  _check_rng(rng)
  mask = np.asarray(mask)
  if mask.dtype != np.bool_ or mask.ndim != 1:
    raise ValueError(f"mask must be a 1-D bool array, got {mask.dtype} {mask.shape}")
  size = mask.shape[0]
  count = _check_int("count", count, 0, size)
  if allowed is None:
    allowed = np.ones(size, dtype=bool)
  else:
    allowed = _check_bool_array("allowed", allowed, (size,))
  out = mask.copy()
  have = int(out.sum())
  if have == count:
    return out
  top_up = have < count
  # Topping up sets unset cells; trimming clears set ones.
  candidates = np.flatnonzero(allowed & (out != top_up))
  change = abs(count - have)
  if change > candidates.size:
    raise ValueError(
      f"count={count} is unreachable: {have} cells are set and only "
      f"{candidates.size} allowed cells can change"
    )
  out[rng.choice(candidates, size=change, replace=False)] = top_up
  return out


def beit_mask(
  rng: np.random.Generator,
  grid: tuple[int, int],
  num_masked: int,
  *,
  min_block: int,
  max_block: int,
) -> np.ndarray:
  """BEiT block mask with exactly `num_masked` cells set.

  `block_mask` redrawn until a draw sets exactly `num_masked` cells: BEiT's
  masks of that count, block shapes and all (see the module's exact-count rule).

  Args:
    rng: the only source of randomness.
    grid: (H, W) patch grid.
    num_masked: cells to mask, in [0, H * W].
    min_block, max_block: block-size bounds, as in `block_mask`.

  Returns:
    bool [H * W], row-major.
  """
  _check_rng(rng)
  height, width = _check_grid(grid)
  num_masked = _check_int("num_masked", num_masked, 0, height * width)
  min_block, max_block = _check_block_sizes(min_block, max_block)
  return _exact_blocks(rng, (height, width), num_masked, min_block, max_block)


def uniform_mask(rng: np.random.Generator, num_patches: int, num_masked: int) -> np.ndarray:
  """Uniformly random mask: `num_masked` cells drawn without replacement.

  Returns:
    bool [num_patches].
  """
  num_patches = _check_int("num_patches", num_patches, 1)
  num_masked = _check_int("num_masked", num_masked, 0, num_patches)
  return exact_count(rng, np.zeros(num_patches, dtype=bool), num_masked)


def _num_visible(num_patches, ratio):
  if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0.5 <= ratio < 1:
    raise ValueError(
      f"ratio must be in [0.5, 1) for a split, got {ratio!r}: two disjoint "
      "subsets of (1 - ratio) * N patches each need ratio >= 0.5"
    )
  # The epsilon keeps e.g. (1 - 0.75) * 196 = 48.99999... from losing a patch.
  num_visible = math.floor((1 - ratio) * num_patches + 1e-6)
  if num_visible < 1:
    raise ValueError(
      f"ratio={ratio} leaves no visible patch on a grid of {num_patches} "
      f"patches; ratio must be <= 1 - 1/{num_patches}"
    )
  return num_visible


def split_patches(
  rng: np.random.Generator,
  grid: tuple[int, int],
  ratio: float,
  *,
  kind: str,
  min_block: int | None = None,
  max_block: int | None = None,
) -> dict[str, np.ndarray]:
  """Splits the patches into two disjoint visible subsets A and B.

  Each branch sees n_vis = floor((1 - ratio) * N + 1e-6) patches and predicts
  the N - n_vis others.
  kind="uniform": A and B are the first and the next n_vis entries of a random
    permutation.
  kind="block": A is an exact-count BEiT block mask of n_vis cells (`beit_mask`);
    B is what a second run of `block_mask`, started from A with target 2 * n_vis,
    adds, redrawn until it adds exactly n_vis cells (the exact-count rule). At
    ratio 0.5 with N even, B is the complement of A.

  Args:
    rng: the only source of randomness.
    grid: (H, W) patch grid, N = H * W.
    ratio: share of patches each branch does not see, in [0.5, 1) (two
      disjoint subsets of n_vis cells each need n_vis <= N / 2), n_vis >= 1.
    kind: "block" or "uniform".
    min_block, max_block: block-size bounds for kind="block"; default
      `default_block_sizes(N)`. Ignored for kind="uniform".

  Returns:
    int32 arrays of patch indices, each sorted ascending: "visible_a" and
    "visible_b" [n_vis], "masked_a" and "masked_b" [N - n_vis] (the
    complements of "visible_a" and "visible_b").
  """
  _check_rng(rng)
  height, width = _check_grid(grid)
  num_patches = height * width
  num_visible = _num_visible(num_patches, ratio)
  if kind == "uniform":
    order = rng.permutation(num_patches)
    a = np.zeros(num_patches, dtype=bool)
    b = np.zeros(num_patches, dtype=bool)
    a[order[:num_visible]] = True
    b[order[num_visible : 2 * num_visible]] = True
  elif kind == "block":
    min_block, max_block = _block_sizes(num_patches, min_block, max_block)
    a = _exact_blocks(rng, (height, width), num_visible, min_block, max_block)
    if 2 * num_visible == num_patches:
      b = ~a  # what any growth to 2 * n_vis cells would give, without drawing it
    else:
      grown = _exact_blocks(
        rng, (height, width), 2 * num_visible, min_block, max_block, initial=a.reshape(grid)
      )
      b = grown & ~a
  else:
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
  return {
    "visible_a": np.flatnonzero(a).astype(np.int32),
    "visible_b": np.flatnonzero(b).astype(np.int32),
    "masked_a": np.flatnonzero(~a).astype(np.int32),
    "masked_b": np.flatnonzero(~b).astype(np.int32),
  }


def make_mask_fn(
  objective: str,
  grid: tuple[int, int],
  ratio: float,
  *,
  kind: str = "block",
  min_block: int | None = None,
  max_block: int | None = None,
) -> Callable[[np.random.Generator], dict[str, np.ndarray]]:
  """Validates a masking setup and returns the per-example mask function.

  Args:
    objective: "splitmask" or "beit".
    grid: (H, W) patch grid, N = H * W.
    ratio: masking ratio. "splitmask": share each branch does not see, in
      [0.5, 1) (see `split_patches`). "beit": share masked, in (0, 1); exactly
      round(ratio * N) patches are masked, which must be >= 1 (BEiT's 75 of
      196 is ratio=75/196).
    kind: "block" (BEiT block masking) or "uniform".
    min_block, max_block: block-size bounds for kind="block"; default
      `default_block_sizes(N)`.

  Returns:
    fn(rng) -> dict. "splitmask": `split_patches`'s dict. "beit": "mask" bool
    [N] with round(ratio * N) cells set and "masked" int32 [round(ratio * N)],
    the sorted indices of those cells.
  """
  if objective not in OBJECTIVES:
    raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
  if kind not in KINDS:
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
  height, width = _check_grid(grid)
  num_patches = height * width
  if kind == "block":
    min_block, max_block = _block_sizes(num_patches, min_block, max_block)

  if objective == "splitmask":
    _num_visible(num_patches, ratio)

    def split_fn(rng):
      return split_patches(rng, grid, ratio, kind=kind, min_block=min_block, max_block=max_block)

    return split_fn

  if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0 < ratio < 1:
    raise ValueError(f"ratio must be in (0, 1), got {ratio!r}")
  num_masked = round(ratio * num_patches)
  if num_masked < 1:
    raise ValueError(
      f"ratio={ratio} masks no patch on a grid of "
      f"{num_patches} patches; round(ratio * N) must be >= 1"
    )

  def beit_fn(rng):
    if kind == "block":
      mask = beit_mask(rng, grid, num_masked, min_block=min_block, max_block=max_block)
    else:
      mask = uniform_mask(rng, num_patches, num_masked)
    return {"mask": mask, "masked": np.flatnonzero(mask).astype(np.int32)}

  return beit_fn
