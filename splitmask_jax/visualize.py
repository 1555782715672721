"""Pictures of what a pre-training run sees, tokenizes and predicts.

The image functions return uint8 arrays [B, H, W, C], so the same pictures go to
TensorBoard (`make_summary_fn`, one jitted call per evaluation) and to matplotlib
(the notebooks in `colabs/`). They are jax-traceable and take numpy arrays as well.
Patch positions are row-major over the ViT patch grid, as in `masking.py`.

Rendering a visual word. A token stands for a codebook atom e, a unit vector of
d = token_patch**2 * C pixel values (the tokenizer's patch space, pixels in
[-1, 1]). Its picture is sqrt(d) * e clipped to [-1, 1]: the atom scaled to a
root-mean-square pixel value of 1. The tokenizer compares directions (cosine),
so a token carries no brightness scale and no picture of it can; this one keeps
the atom's sign, so the flat atoms of black background and of bright fabric come
out black and white, where a per-atom min-max would make every flat atom the same
grey. The picture depends on the token alone, never on the patch it replaces, so
the target tokens of an image and a model's predicted tokens compare directly.
Atoms are resized (nearest) from the tokenizer's patch to the ViT patch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure

from splitmask_jax import objectives
from splitmask_jax import tokenizers
from splitmask_jax.data import input_pipeline
from splitmask_jax.models import pretrain
from splitmask_jax.objectives import pixels as pixel_targets
from splitmask_jax.runtime import checkpointing
from splitmask_jax.runtime import sharding

# The uint8 value of hidden patches: mid-grey, apart from both the black
# background and the bright objects of Fashion-MNIST.
HIDDEN = 128
# Summary tiles are enlarged (by an integer factor) to at least this many pixels.
SUMMARY_MIN_SIDE = 64
SUMMARY_TAG = "val_images"
# The objectives `reconstructions` pictures; the summary is off for others.
PICTURED_OBJECTIVES = ("splitmask", "beit", "mae", "simmim")


def to_uint8(pixels: jax.Array) -> jax.Array:
  """Pixels in [-1, 1] (the model's scale) -> uint8, the inverse of
  `objectives.images_to_float`; values outside are clipped."""
  return jnp.round(jnp.clip((pixels + 1.0) * 127.5, 0, 255)).astype(jnp.uint8)


def _patch_side(images, grid) -> int:
  height, width = images.shape[1:3]
  if height % grid[0] or width % grid[1] or height // grid[0] != width // grid[1]:
    raise ValueError(
      f"images of {height}x{width} pixels do not split into the {grid} grid of square patches"
    )
  return height // grid[0]


def _pixel_mask(where: jax.Array, grid, patch: int) -> jax.Array:
  """bool [B, N] per patch -> bool [B, H, W, 1] per pixel."""
  cells = where.reshape(-1, grid[0], grid[1])
  return jnp.repeat(jnp.repeat(cells, patch, axis=1), patch, axis=2)[..., None]


def _assemble(tiles: jax.Array, grid) -> jax.Array:
  """Patch tiles [B, N, P, P, C] (row-major) -> images [B, gh * P, gw * P, C]."""
  b, _, p, _, c = tiles.shape
  x = tiles.reshape(b, grid[0], grid[1], p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, grid[0] * p, grid[1] * p, c)


def indices_to_mask(indices: jax.Array, num_patches: int) -> jax.Array:
  """int [B, n] patch indices -> bool [B, num_patches], True at those patches."""
  indices = jnp.asarray(indices)
  rows = jnp.arange(indices.shape[0])[:, None]
  return jnp.zeros((indices.shape[0], num_patches), bool).at[rows, indices].set(True)


def hide_patches(images: jax.Array, visible: jax.Array, grid, fill: int = HIDDEN) -> jax.Array:
  """What a branch sees: the `visible` patches, the others a flat `fill`.

  Args:
    images: uint8 [B, H, W, C], H = gh * P and W = gw * P.
    visible: bool [B, gh * gw].
    grid: (gh, gw), the ViT patch grid.

  Returns:
    uint8 [B, H, W, C].
  """
  mask = _pixel_mask(jnp.asarray(visible, bool), grid, _patch_side(images, grid))
  return jnp.where(mask, jnp.asarray(images, jnp.uint8), jnp.uint8(fill))


def render_atoms(
  atoms: jax.Array, *, token_patch: int, channels: int, patch_size: int | None = None
) -> jax.Array:
  """Pictures of codebook atoms: sqrt(d) * atom, clipped (see the module docstring).

  Args:
    atoms: float [..., d], d = token_patch**2 * channels, in the (row, col,
      channel) order of `tokenizers.tokenizer_patches`.
    patch_size: side of the output tiles (nearest resizing); None keeps token_patch.

  Returns:
    uint8 [..., patch_size, patch_size, channels].
  """
  atoms = jnp.asarray(atoms, jnp.float32)
  dim = tokenizers.codebook_dim(token_patch, channels)
  if atoms.shape[-1] != dim:
    raise ValueError(
      f"atoms must end in d = token_patch**2 * channels = {dim}, got shape {atoms.shape}"
    )
  lead = atoms.shape[:-1]
  pixels = (atoms * math.sqrt(dim)).reshape(-1, token_patch, token_patch, channels)
  side = patch_size or token_patch
  if side != token_patch:
    pixels = jax.image.resize(pixels, (pixels.shape[0], side, side, channels), "nearest")
  return to_uint8(pixels).reshape(*lead, side, side, channels)


def image_tokens(images: jax.Array, codebook: jax.Array, *, grid, token_patch: int) -> jax.Array:
  """The visual words of uint8 images [B, H, W, C]: int32 [B, gh * gw], as the
  pre-training objectives compute them."""
  patches = tokenizers.tokenizer_patches(
    objectives.images_to_float(jnp.asarray(images)), grid, token_patch
  )
  return tokenizers.tokenize(patches, codebook)


def paint_tokens(
  images: jax.Array,
  tokens: jax.Array,
  where: jax.Array,
  codebook: jax.Array,
  *,
  grid,
  token_patch: int,
) -> jax.Array:
  """`images` with the patches at `where` replaced by the pictures of their `tokens`.

  Args:
    images: uint8 [B, H, W, C].
    tokens: int [B, gh * gw] (read only where `where` is True).
    where: bool [B, gh * gw].
    codebook: float [V, d] unit rows.

  Returns:
    uint8 [B, H, W, C].
  """
  images = jnp.asarray(images, jnp.uint8)
  patch = _patch_side(images, grid)
  tiles = render_atoms(
    jnp.asarray(codebook)[tokens],
    token_patch=token_patch,
    channels=images.shape[-1],
    patch_size=patch,
  )
  return jnp.where(
    _pixel_mask(jnp.asarray(where, bool), grid, patch), _assemble(tiles, grid), images
  )


def token_map(images: jax.Array, codebook: jax.Array, *, grid, token_patch: int) -> jax.Array:
  """Every patch of uint8 images [B, H, W, C] replaced by the picture of its visual
  word; uint8 [B, H, W, C]."""
  tokens = image_tokens(images, codebook, grid=grid, token_patch=token_patch)
  return paint_tokens(
    images, tokens, jnp.ones(tokens.shape, bool), codebook, grid=grid, token_patch=token_patch
  )


def _predicted(images, tokens, masked, codebook, grid, token_patch):
  """`images` with the predicted `tokens` [B, m] painted at the `masked` positions."""
  num_patches = grid[0] * grid[1]
  rows = jnp.arange(masked.shape[0])[:, None]
  full = jnp.zeros((masked.shape[0], num_patches), jnp.int32).at[rows, masked].set(tokens)
  return paint_tokens(
    images, full, indices_to_mask(masked, num_patches), codebook, grid=grid, token_patch=token_patch
  )


def paint_pixels(images: jax.Array, predicted: jax.Array, masked: jax.Array, *, grid) -> jax.Array:
  """`images` with predicted pixels painted over the patches at `masked`.

  Args:
    images: uint8 [B, H, W, C].
    predicted: float [B, m, P * P * C] in [-1, 1] (clipped), each patch in
      `vit.patchify`'s (row, col, channel) order.
    masked: int [B, m], the patches they replace.

  Returns:
    uint8 [B, H, W, C].
  """
  images = jnp.asarray(images, jnp.uint8)
  b, m = masked.shape
  patch, channels = _patch_side(images, grid), images.shape[-1]
  num_patches = grid[0] * grid[1]
  tiles = to_uint8(jnp.asarray(predicted)).reshape(b, m, patch, patch, channels)
  rows = jnp.arange(b)[:, None]
  full = jnp.zeros((b, num_patches, patch, patch, channels), jnp.uint8).at[rows, masked].set(tiles)
  where = _pixel_mask(indices_to_mask(masked, num_patches), grid, patch)
  return jnp.where(where, _assemble(full, grid), images)


def reconstructions(
  model,
  variables,
  codebook: jax.Array,
  batch: Mapping[str, jax.Array],
  *,
  grid,
  token_patch: int,
  norm_pix_loss: bool = False,
) -> dict[str, jax.Array]:
  """What the model sees and predicts for a batch, as columns of pictures.

  The predictions are those of the model in evaluation mode (no stochastic
  depth), painted over the patches it does not see; the patches it sees keep
  their pixels. SplitMask and BEiT predict visual words (their argmax word's
  picture is painted), MAE and SimMIM pixels.

  Args:
    model: `objectives.build_model`'s SplitMask, BEiT, MAE or SimMIM model.
    variables: its variables {'params': ...}.
    codebook: float [V, d], the run's codebook (unread for MAE and SimMIM).
    batch: uint8 'image' [B, H, W, C] and the masks of the objective's
      `make_mask_fn`, with a leading batch axis.
    norm_pix_loss: MAE only: its predictions are of normalised patches
      (`config.mae.norm_pix_loss`), drawn with each true patch's mean and
      variance (objectives.pixels.denormalize_patches): the model predicts the shape of a
      patch, not its brightness.

  Returns:
    uint8 [B, H, W, C] pictures, in display order. SplitMask: 'original',
    'A sees', 'A predicts', 'B sees', 'B predicts', 'tokens' (the target
    visual words of every patch); BEiT: 'original', 'BEiT sees', 'BEiT
    predicts', 'tokens'; MAE and SimMIM: 'original', '<name> sees',
    '<name> predicts'.
  """
  images = jnp.asarray(batch["image"], jnp.uint8)
  x = objectives.images_to_float(images)
  num_patches = grid[0] * grid[1]
  common = dict(codebook=codebook, grid=grid, token_patch=token_patch)
  columns = {"original": images}
  if isinstance(model, pretrain.MAEModel):
    out = model.apply(variables, x, batch["visible"], batch["masked"], train=False)
    predicted = out["pixels"]
    if norm_pix_loss:
      true = pixel_targets.patch_pixels(x, model.patch_size, batch["masked"])
      predicted = pixel_targets.denormalize_patches(predicted, true)
    columns["MAE sees"] = hide_patches(images, indices_to_mask(batch["visible"], num_patches), grid)
    columns["MAE predicts"] = paint_pixels(images, predicted, batch["masked"], grid=grid)
    return columns
  if isinstance(model, pretrain.SimMIMModel):
    out = model.apply(variables, x, batch["mask"], batch["masked"], train=False)
    columns["SimMIM sees"] = hide_patches(images, ~jnp.asarray(batch["mask"], bool), grid)
    columns["SimMIM predicts"] = paint_pixels(images, out["pixels"], batch["masked"], grid=grid)
    return columns
  if "visible_a" in batch:
    out = model.apply(
      variables,
      x,
      batch["visible_a"],
      batch["visible_b"],
      batch["masked_a"],
      batch["masked_b"],
      train=False,
    )
    for branch in ("a", "b"):
      name = branch.upper()
      columns[f"{name} sees"] = hide_patches(
        images, indices_to_mask(batch[f"visible_{branch}"], num_patches), grid
      )
      columns[f"{name} predicts"] = _predicted(
        images, jnp.argmax(out[f"logits_{branch}"], axis=-1), batch[f"masked_{branch}"], **common
      )
  else:
    out = model.apply(variables, x, batch["mask"], batch["masked"], train=False)
    columns["BEiT sees"] = hide_patches(images, ~jnp.asarray(batch["mask"], bool), grid)
    columns["BEiT predicts"] = _predicted(
      images, jnp.argmax(out["logits"], axis=-1), batch["masked"], **common
    )
  columns["tokens"] = token_map(images, **common)
  return columns


def montage(tiles: jax.Array, columns: int, *, gap: int = 2, fill: int = 255) -> jax.Array:
  """Tiles uint8 [K, H, W, C] laid out row by row, `columns` per row, `gap` pixels of
  `fill` between them; missing tiles of the last row are `fill`.

  Returns:
    uint8 [rows * (H + gap) - gap, columns * (W + gap) - gap, C].
  """
  tiles = jnp.asarray(tiles, jnp.uint8)
  k, h, w, c = tiles.shape
  rows = -(-k // columns)
  tiles = jnp.pad(
    tiles, ((0, rows * columns - k), (0, gap), (0, gap), (0, 0)), constant_values=fill
  )
  grid = tiles.reshape(rows, columns, h + gap, w + gap, c).transpose(0, 2, 1, 3, 4)
  return grid.reshape(rows * (h + gap), columns * (w + gap), c)[: -gap or None, : -gap or None]


def summary_strips(columns: Mapping[str, jax.Array], min_side: int = SUMMARY_MIN_SIDE) -> jax.Array:
  """One strip per example: its pictures side by side, enlarged to `min_side` pixels.

  Args:
    columns: {name: uint8 [B, H, W, C]}, all of one shape.

  Returns:
    uint8 [B, s * H, K * (s * W + 2) - 2, C] for K columns, s = ceil(min_side / H).
  """
  stacked = jnp.stack(list(columns.values()), axis=1)  # [B, K, H, W, C]
  scale = max(1, -(-min_side // stacked.shape[2]))
  stacked = jnp.repeat(jnp.repeat(stacked, scale, axis=2), scale, axis=3)
  return jax.vmap(lambda tiles: montage(tiles, tiles.shape[0]))(stacked)


def summary_batch(
  source: Sequence[Mapping],
  *,
  num_images: int,
  image_size: int,
  mask_fn: input_pipeline.MaskFn | None = None,
  seed: int = 0,
) -> dict[str, np.ndarray]:
  """The first `num_images` records of `source` as one evaluation batch, on the host.

  The images are resized without augmentation and the masks drawn as
  validation draws them (`input_pipeline.eval_dataset` with `seed`), so every
  call, every process and every evaluation of a run sees the same batch.

  Returns:
    'image' uint8 [n, image_size, image_size, C], n = min(num_images, len(source)),
    and the masks of `mask_fn` (none when it is None).
  """
  num = min(num_images, len(source))
  data = input_pipeline.eval_dataset(
    source,
    batch_size=num,
    image_size=image_size,
    mask_fn=mask_fn,
    seed=seed,
    num_examples=num,
    with_labels=False,
  )
  batch = next(iter(data))
  return {k: v for k, v in batch.items() if k != "valid"}


def make_summary_fn(
  config, model, source: Sequence[Mapping], mask_fn: input_pipeline.MaskFn, mesh
) -> Callable[[object], dict[str, np.ndarray]] | None:
  """The image summaries of a pre-training run's evaluations, or None when off
  (`config.summary_images` = 0, or an objective outside PICTURED_OBJECTIVES).

  The first `config.summary_images` records of `source` (the validation split)
  with the validation masks of the run's seed: the same images and masks at
  every evaluation, so that the predictions can be watched as they sharpen.

  Returns:
    `state -> {SUMMARY_TAG + '/' + column names: uint8 strips}` (see
    `summary_strips` and `reconstructions` for the columns), one jitted call;
    every process must call it, its result is the same on all.
  """
  if not config.summary_images or config.objective not in PICTURED_OBJECTIVES:
    return None
  batch = summary_batch(
    source,
    num_images=config.summary_images,
    image_size=config.model.image_size,
    mask_fn=mask_fn,
    seed=config.seed,
  )
  grid = model.grid
  token_patch = config.tokenizer.patch_size
  norm_pix_loss = config.objective == "mae" and config.mae.norm_pix_loss

  def strips(variables, codebook):
    # The few images and masks are constants of the compiled function.
    columns = reconstructions(
      model,
      variables,
      codebook,
      batch,
      grid=grid,
      token_patch=token_patch,
      norm_pix_loss=norm_pix_loss,
    )
    return {f"{SUMMARY_TAG}/{', '.join(columns)}": summary_strips(columns)}

  compiled = jax.jit(strips, out_shardings=sharding.replicated(mesh))
  return lambda state: jax.device_get(compiled(state.params, state.codebook))


def load_run(workdir: str, step: int | None = None) -> tuple[dict, np.ndarray, int]:
  """A pre-training run's (variables, codebook float32 [V, d], step) as numpy, from
  its checkpoint of `step` (None: the latest)."""
  arrays, step = checkpointing.load_arrays(workdir, ("params", "codebook"), step)
  return arrays["params"], arrays["codebook"], step


def image_table(columns: Mapping[str, np.ndarray], *, tile_inches: float = 1.3) -> Figure:
  """A matplotlib figure of pictures: one titled column per entry, one row per image.

  Args:
    columns: {title: uint8 [B, H, W, C]} with the same B for all, C in (1, 3).
    tile_inches: the side of one picture in the figure.

  Returns:
    A Figure with its own canvas (no pyplot state): `figure.savefig(path)`.
  """
  arrays = [np.asarray(v) for v in columns.values()]
  num_rows, num_cols = arrays[0].shape[0], len(arrays)
  figure = Figure(
    figsize=(tile_inches * num_cols, tile_inches * num_rows + 0.3), layout="constrained"
  )
  axes = figure.subplots(num_rows, num_cols, squeeze=False)
  for j, (title, images) in enumerate(zip(columns, arrays)):
    axes[0, j].set_title(title, fontsize=9)
    for i in range(num_rows):
      image = images[i]
      axes[i, j].imshow(
        image[..., 0] if image.shape[-1] == 1 else image,
        cmap="gray",
        vmin=0,
        vmax=255,
        interpolation="nearest",
      )
      axes[i, j].set_xticks([])
      axes[i, j].set_yticks([])
  return figure


def metric_curves(
  runs: Mapping[str, Sequence[Mapping]],
  panels: Mapping[str, Sequence[str]],
  *,
  title: str | None = None,
) -> Figure:
  """Line plots of runs' `metric_log.read_metrics` records against the step.

  Args:
    runs: {run label: its records}, each record {'step': int, name: value, ...};
      a name absent from a record (or a non-finite value, saved as a string)
      leaves no point there. With one run the label may be ''.
    panels: {panel title: names plotted in it}, one panel per entry, side by side.

  Returns:
    A Figure with its own canvas.
  """
  figure = Figure(figsize=(4.5 * len(panels), 3.5), layout="constrained")
  axes = figure.subplots(1, len(panels), squeeze=False)[0]
  for ax, (panel, names) in zip(axes, panels.items()):
    for label, records in runs.items():
      for name in names:
        points = [(r["step"], r[name]) for r in records if isinstance(r.get(name), (int, float))]
        if points:
          steps, values = zip(*points)
          ax.plot(
            steps,
            values,
            marker="o" if len(points) < 20 else None,
            label=f"{label}: {name}" if label else name,
          )
    ax.set_title(panel)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=8)
  if title:
    figure.suptitle(title)
  return figure
