"""Vision Transformer encoder and shallow decoder for masked image modeling.

Initialisation (ViT / MAE / BEiT conventions):
  * every Dense kernel of the transformer (patch embedding, qkv, attention output,
    MLP, decoder input projection): Xavier-uniform, biases zero. The fused qkv kernel
    is initialised as three separate [D, D] Xavier matrices so that its fan-out is
    that of one projection, not three.
  * position embeddings and [MASK] embeddings: truncated normal, std 0.02.
  * vocabulary heads: truncated normal, std 0.02 (nothing is zero-initialised).
  * LayerNorm: scale 1, bias 0, epsilon 1e-6.

Computation runs in `dtype` (e.g. bfloat16) with parameters stored in `param_dtype`;
LayerNorm statistics and the attention softmax are always float32, and vocabulary
logits are accumulated and returned in float32 (`logits_head`).

`resample_pos_embedding` resizes the position embeddings to another patch grid
(fine-tuning at another image size than pre-training, bicubic as BEiT, MAE and timm).

The encoder's blocks run unrolled or under `nn.scan` (`Encoder.scan`: one compiled
body, the compile time of one block, parameters stacked on a leading axis);
`scan_blocks` / `unscan_blocks` convert parameters between the two layouts.
"""

import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

VARIANTS = {
  "Test": dict(width=32, depth=2, num_heads=2, mlp_dim=64),
  # A laptop-size ViT for small images (the Fashion-MNIST demo).
  "Mini": dict(width=128, depth=6, num_heads=4, mlp_dim=512),
  "Ti": dict(width=192, depth=12, num_heads=3, mlp_dim=768),
  "S": dict(width=384, depth=12, num_heads=6, mlp_dim=1536),
  "B": dict(width=768, depth=12, num_heads=12, mlp_dim=3072),
  "L": dict(width=1024, depth=24, num_heads=16, mlp_dim=4096),
}

_LN_EPS = 1e-6
_xavier = nn.initializers.xavier_uniform()
_trunc_normal = nn.initializers.truncated_normal(stddev=0.02)


def parse_variant(name: str) -> tuple[dict, int]:
  """Parses a variant string such as 'B/16'.

  Returns:
    (a copy of VARIANTS[size] with keys width, depth, num_heads, mlp_dim,
     patch_size as int).
  """
  allowed = f"'<size>/<patch>' with size in {sorted(VARIANTS)} (e.g. 'B/16')"
  if not isinstance(name, str) or name.count("/") != 1:
    raise ValueError(f"variant must be {allowed}, got {name!r}")
  size, patch = name.split("/")
  if size not in VARIANTS:
    raise ValueError(f"variant size must be one of {sorted(VARIANTS)}, got {size!r}")
  if not patch.isdigit() or int(patch) <= 0:
    raise ValueError(f"variant patch size must be a positive integer, got {patch!r}")
  return dict(VARIANTS[size]), int(patch)


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
  """Cuts images into non-overlapping square patches, row-major over the patch grid.

  Args:
    images: [B, H, W, C], H and W multiples of patch_size.
    patch_size: side p of a patch in pixels.
  Returns:
    [B, (H/p)*(W/p), p*p*C], same dtype; each patch flattened in (row, col, channel)
    order.
  """
  b, h, w, c = images.shape
  if h % patch_size or w % patch_size:
    raise ValueError(
      f"images height and width ({h}, {w}) must be multiples of patch_size={patch_size}"
    )
  gh, gw = h // patch_size, w // patch_size
  x = images.reshape(b, gh, patch_size, gw, patch_size, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, gh * gw, patch_size * patch_size * c)


def resample_pos_embedding(
  pos_embedding, grid: tuple[int, int], *, old_grid: tuple[int, int] | None = None
) -> np.ndarray:
  """Resamples an Encoder's position embeddings to another patch grid, bicubic.

  A model fine-tuned at another image size than it was pre-trained at, with
  the same patch size (BEiT and MAE: 224 -> 384 px), sees another patch grid;
  its embeddings are the pre-trained ones read as a [gh, gw] image of D
  channels and resized to the new grid. The Encoder has no class token, so
  every embedding is a grid position.

  The interpolation is `jax.image.resize(..., 'bicubic')`: Keys' cubic kernel
  with a = -0.5, half-pixel centres (torch's align_corners=False), weights
  renormalised over the grid at its borders, and antialiased (the kernel
  widened) when the grid shrinks. This is timm's `resample_abs_pos_embed` at
  its defaults (bicubic, antialias=True), which timm applies itself when it
  loads weights at another img_size: the two agree to float32 rounding (max
  difference 7e-7 on unit-variance values, 4x4 -> 6x6 and 14x14 -> 24x24).
  BEiT's and MAE's code calls torch's `F.interpolate(mode='bicubic',
  align_corners=False)`, whose kernel has a = -0.75 and whose borders repeat
  the edge embeddings: a slightly sharper interpolation of the same grid
  (on a smooth embedding, 14x14 -> 24x24, the two differ by 1.4% of its
  standard deviation, RMS; tests/test_resolution.py), which fine-tuning then
  adapts either way. jax.image.resize has no a = -0.75 kernel; rather than
  hand-write one, this keeps the library's, which is timm's default.

  Args:
    pos_embedding: [1, gh*gw, D], row-major over the grid (the Encoder's
      `pos_embedding` parameter), any float dtype.
    grid: (new_gh, new_gw), the grid to resample to.
    old_grid: (gh, gw) of `pos_embedding`; None: square, gh = gw = sqrt(gh*gw).

  Returns:
    numpy [1, new_gh*new_gw, D] in the dtype of `pos_embedding`, computed in
    float32; `pos_embedding` itself (as numpy) when the grids are equal.

  Raises:
    ValueError: `pos_embedding` is not [1, N, D] with N = gh*gw (a square N
      without `old_grid`), or `grid` is not two positive sizes.
  """
  pos_embedding = np.asarray(pos_embedding)
  if pos_embedding.ndim != 3 or pos_embedding.shape[0] != 1:
    raise ValueError(f"pos_embedding must be [1, N, D], got shape {pos_embedding.shape}")
  _, n, d = pos_embedding.shape
  if old_grid is None:
    side = int(round(np.sqrt(n)))
    if side * side != n:
      raise ValueError(
        f"pos_embedding holds {n} positions, not a square grid: pass old_grid=(gh, gw)"
      )
    old_grid = (side, side)
  old_grid, grid = tuple(int(s) for s in old_grid), tuple(int(s) for s in grid)
  if old_grid[0] * old_grid[1] != n:
    raise ValueError(f"pos_embedding holds {n} positions, not old_grid={old_grid}")
  if len(grid) != 2 or min(grid) <= 0:
    raise ValueError(f"grid must be two positive sizes (gh, gw), got {grid}")
  if grid == old_grid:
    return pos_embedding
  resized = resize_pos_embedding(jnp.asarray(pos_embedding), old_grid, grid)
  return np.asarray(resized, pos_embedding.dtype)


def resize_pos_embedding(
  pos_embedding: jax.Array, old_grid: tuple[int, int], grid: tuple[int, int]
) -> jax.Array:
  """`resample_pos_embedding`'s interpolation as a traceable (and differentiable)
  function: [1, gh*gw, D] on `old_grid` -> float32 [1, new_gh*new_gw, D] on `grid`."""
  d = pos_embedding.shape[-1]
  image = pos_embedding.astype(jnp.float32).reshape(*old_grid, d)
  resized = jax.image.resize(image, (*grid, d), method="bicubic", antialias=True)
  return resized.reshape(1, grid[0] * grid[1], d)


def gelu(x: jax.Array) -> jax.Array:
  """The exact GELU, x * Phi(x) = x * (1 + erf(x / sqrt 2)) / 2, elementwise.

  The same function as `nn.gelu(x, approximate=False)`, written with erf as PyTorch
  writes it: jax's form, erfc(-x / sqrt 2), compiles on XLA:CPU into both of erfc's
  branches and a select, and made the demo's step 4% slower (benchmarks/RESULTS.md).
  """
  return x * (0.5 + 0.5 * jax.lax.erf(x * np.float32(1 / np.sqrt(2))).astype(x.dtype))


def gather_tokens(x: jax.Array, indices: jax.Array) -> jax.Array:
  """Selects tokens per example: [B, N, D], int [B, n] -> [B, n, D]."""
  return jnp.take_along_axis(x, indices[..., None], axis=1)


def pooled_features(tokens: jax.Array) -> jax.Array:
  """Average-pools tokens [B, n, D] (any float dtype) into float32 features [B, D]."""
  return jnp.mean(tokens.astype(jnp.float32), axis=1)


def drop_path_rates(rate: float, depth: int) -> list[float]:
  """Stochastic-depth rate of each block: linear from 0 (first) to `rate` (last)."""
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"drop_path_rate must be in [0, 1), got {rate}")
  return [float(r) for r in np.linspace(0.0, rate, depth)]


def _qkv_init(key, shape, dtype=jnp.float32):
  d_in, d_out3 = shape
  per_projection = nn.initializers.xavier_uniform(in_axis=0, out_axis=2, batch_axis=(1,))
  return per_projection(key, (d_in, 3, d_out3 // 3), dtype).reshape(shape)


class DropPath(nn.Module):
  """Per-sample stochastic depth on a residual branch (needs the 'dropout' rng).

  `rate` is a Python float, or a float32 [] array inside scanned blocks (each
  block of a scan has its own rate); an array rate of 0 keeps every sample.
  """

  rate: float | jax.Array

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    if not train or (isinstance(self.rate, (int, float)) and self.rate == 0.0):
      return x
    keep = 1.0 - self.rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    kept = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
    return jnp.where(kept, x / jnp.asarray(keep, x.dtype), jnp.zeros_like(x))


class Attention(nn.Module):
  """Multi-head self-attention over [B, T, D] through jax.nn.dot_product_attention.

  Attributes:
    implementation: `jax.nn.dot_product_attention`'s: None (XLA's, any device) or
      'cudnn' (cuDNN's fused kernel: NVIDIA GPUs, bfloat16 or float16); see
      `resolve_attention`.
  """

  num_heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  implementation: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, d = x.shape
    if d % self.num_heads:
      raise ValueError(f"width {d} must be divisible by num_heads={self.num_heads}")
    qkv = nn.Dense(
      3 * d,
      use_bias=False,
      kernel_init=_qkv_init,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="qkv",
    )(x)
    # Query and value biases only, as in BEiT: a key bias adds the same amount
    # to every logit of a query, so the softmax cancels it and its gradient is
    # rounding noise, which Adam's normalisation would turn into full-size steps.
    q_bias = self.param("q_bias", nn.initializers.zeros, (d,), self.param_dtype)
    v_bias = self.param("v_bias", nn.initializers.zeros, (d,), self.param_dtype)
    qkv = qkv + jnp.concatenate([q_bias, jnp.zeros_like(q_bias), v_bias]).astype(qkv.dtype)
    qkv = qkv.reshape(b, t, 3, self.num_heads, d // self.num_heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    # Softmax is computed in float32 inside dot_product_attention (either kernel).
    out = jax.nn.dot_product_attention(q, k, v, implementation=self.implementation)
    out = out.reshape(b, t, d)
    return nn.Dense(
      d, kernel_init=_xavier, dtype=self.dtype, param_dtype=self.param_dtype, name="proj"
    )(out)


class Block(nn.Module):
  """Pre-norm transformer block on [B, T, D] -> [B, T, D]."""

  num_heads: int
  mlp_dim: int
  drop_path_rate: float | jax.Array = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention: str | None = None  # Attention.implementation

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    d = x.shape[-1]
    drop = DropPath(self.drop_path_rate)
    y = nn.LayerNorm(epsilon=_LN_EPS, name="norm1", **kw)(x)
    y = Attention(self.num_heads, name="attn", implementation=self.attention, **kw)(y)
    x = x + drop(y, train)
    y = nn.LayerNorm(epsilon=_LN_EPS, name="norm2", **kw)(x)
    y = nn.Dense(self.mlp_dim, kernel_init=_xavier, name="fc1", **kw)(y)
    y = gelu(y)
    y = nn.Dense(d, kernel_init=_xavier, name="fc2", **kw)(y)
    return x + drop(y, train)


def remat_policy(remat: str | bool):
  """(rematerialise?, jax.checkpoint policy) of a `model.remat` value.

  'none' (or False): keep every activation for the backward pass; 'full' (or
  True): keep only each block's input and recompute the rest; 'save_dots': keep
  the outputs of the matmuls without batch dimensions (the dense layers),
  recompute the rest (norms, GELU, attention).
  """
  if remat in ("none", False):
    return False, None
  if remat in ("full", True):
    return True, None
  if remat == "save_dots":
    return True, jax.checkpoint_policies.dots_with_no_batch_dims_saveable
  raise ValueError(f"remat must be one of {REMAT_POLICIES}, got {remat!r}")


REMAT_POLICIES = ("none", "full", "save_dots")


class _ScannedBlock(nn.Module):
  """One step of a scanned block stack: (x, drop-path rate) -> (x, x or None)."""

  num_heads: int
  mlp_dim: int
  train: bool
  collect: bool
  attention: str | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, rate: jax.Array):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, attention=self.attention)
    x = Block(self.num_heads, self.mlp_dim, rate, name="block", **kw)(x, self.train)
    return x, (x if self.collect else None)


def _run_blocks(
  x,
  *,
  depth,
  num_heads,
  mlp_dim,
  drop_path_rate,
  remat,
  train,
  kw,
  scan=False,
  unroll_scan=False,
  collect=True,
):
  """The block stack: (x, tuple of each block's output, or () when not `collect`ed).

  Unrolled, block i's parameters are `block_<i>`; scanned (`nn.scan`, one
  compiled body), they are `blocks/block` with a leading axis of `depth`.
  `unroll_scan`: the scanned stack's loop unrolled into `depth` copies of its
  body (the scanned parameters, the unrolled program).
  """
  rematerialise, policy = remat_policy(remat)
  rates = drop_path_rates(drop_path_rate, depth)
  if scan:
    cell = _ScannedBlock
    if rematerialise:
      cell = nn.remat(cell, policy=policy, prevent_cse=False)
    stack = nn.scan(
      cell,
      variable_axes={"params": 0},
      split_rngs={"params": True, "dropout": True},
      in_axes=0,
      length=depth,
      unroll=depth if unroll_scan else 1,
    )
    x, ys = stack(num_heads, mlp_dim, train, collect, name="blocks", **kw)(
      x, jnp.asarray(rates, jnp.float32)
    )
    return x, tuple(ys[i] for i in range(depth)) if collect else ()
  # Index 2 is `train` (index 0 is the module itself): it must stay a Python bool.
  block_cls = nn.remat(Block, static_argnums=(2,), policy=policy) if rematerialise else Block
  outputs = []
  for i, rate in enumerate(rates):
    x = block_cls(num_heads, mlp_dim, rate, name=f"block_{i}", **kw)(x, train)
    outputs.append(x)
  return x, tuple(outputs) if collect else ()


def is_scanned(encoder_params: dict) -> bool:
  """Whether an encoder's parameters hold scanned blocks (`blocks`) or unrolled ones."""
  return "blocks" in encoder_params


def scan_blocks(encoder_params: dict) -> dict:
  """Unrolled encoder parameters (`block_0` ... `block_<L-1>`) in the scanned layout
  (`blocks/block`, each leaf stacked on a leading axis of L); others unchanged."""
  if is_scanned(encoder_params):
    return encoder_params
  depth = sum(1 for k in encoder_params if _BLOCK_NAME.fullmatch(k))
  blocks = [encoder_params[f"block_{i}"] for i in range(depth)]
  rest = {k: v for k, v in encoder_params.items() if not _BLOCK_NAME.fullmatch(k)}
  return dict(rest, blocks={"block": jax.tree.map(lambda *xs: np.stack(xs), *blocks)})


def unscan_blocks(encoder_params: dict) -> dict:
  """The inverse of `scan_blocks`: scanned encoder parameters as `block_<i>`."""
  if not is_scanned(encoder_params):
    return encoder_params
  stacked = encoder_params["blocks"]["block"]
  depth = jax.tree.leaves(stacked)[0].shape[0]
  rest = {k: v for k, v in encoder_params.items() if k != "blocks"}
  blocks = {f"block_{i}": jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(depth)}
  return dict(rest, **blocks)


def match_block_layout(encoder_params: dict, like: dict) -> dict:
  """`encoder_params` in the block layout (scanned or not) of the encoder parameters `like`."""
  if is_scanned(like):
    return scan_blocks(encoder_params)
  return unscan_blocks(encoder_params)


def resolve_attention(choice: str, platform: str, dtype, head_dim: int) -> str | None:
  """The attention kernel of a `model.attention` value on `platform`'s devices.

  'auto' takes cuDNN's fused kernel where it applies (NVIDIA GPUs, bfloat16 or
  float16, head dimensions up to 128 in multiples of 8), XLA's otherwise; 'xla'
  and 'cudnn' force one. Returns `Attention.implementation`.

  Raises:
    ValueError: 'cudnn' where it cannot run.
  """
  usable = (
    platform == "gpu"
    and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
    and head_dim <= 128
    and head_dim % 8 == 0
  )
  if choice == "xla" or (choice == "auto" and not usable):
    return None
  if choice in ("cudnn", "auto"):
    if not usable:
      raise ValueError(
        f"config.model.attention='cudnn' needs NVIDIA GPUs, bfloat16 or float16 and a head "
        f"dimension up to 128 in multiples of 8 (here: {platform}, {jnp.dtype(dtype).name}, "
        f"{head_dim}); use 'auto' or 'xla'."
      )
    return "cudnn"
  raise ValueError(f"attention must be one of {ATTENTION_CHOICES}, got {choice!r}")


ATTENTION_CHOICES = ("auto", "xla", "cudnn")


def block_options(model, platform: str) -> dict:
  """The block keyword arguments (remat, scan, unroll_scan, the resolved attention
  kernel) of a config's model group (`config.model`) for devices of `platform`
  ('cpu', 'gpu', 'tpu').

  On CPUs a scanned stack is unrolled (`Encoder.unroll_scan`): XLA:CPU's loop
  slices each block's parameters out of the stack and writes its gradients and
  activations back, and made the SplitMask steps of the small models a CPU
  trains 1.07-1.26x slower (benchmarks/RESULTS.md). The parameters keep the
  scanned layout, so checkpoints move between CPUs and accelerators.
  """
  arch, _ = parse_variant(model.variant)
  head_dim = arch["width"] // arch["num_heads"]
  return dict(
    remat=model.remat,
    scan=model.scan,
    unroll_scan=bool(model.scan) and platform == "cpu",
    attention=resolve_attention(model.attention, platform, model.dtype, head_dim),
  )


_BLOCK_NAME = re.compile(r"block_\d+")


def _dot_general_f32(*args, **kwargs):
  """A dot_general whose products are summed and returned in float32 whatever the
  inputs' dtype: large vocabulary logits stay exact where bfloat16 would round them."""
  return jax.lax.dot_general(*args, **kwargs, preferred_element_type=jnp.float32)


def logits_dense(
  num_outputs: int, *, kernel_init, dtype, param_dtype, name: str | None = None
) -> nn.Dense:
  """A linear head whose logits are accumulated and returned in float32 whatever the
  compute dtype: [..., D] -> float32 [..., num_outputs]."""
  return nn.Dense(
    num_outputs,
    kernel_init=kernel_init,
    dtype=dtype,
    param_dtype=param_dtype,
    dot_general=_dot_general_f32,
    name=name,
  )


class Encoder(nn.Module):
  """ViT encoder with learned absolute position embeddings and no class token.

  Attributes:
    width, depth, num_heads, mlp_dim: transformer size (see VARIANTS).
    patch_size: side of the square patches in pixels.
    grid: (gh, gw) patch grid; images must be [B, gh*patch_size, gw*patch_size, C].
      The parameters of an encoder of another grid (another image size, the same
      patch size) fit once `resample_pos_embedding` has resized its `pos_embedding`.
    drop_path_rate: stochastic depth of the last block (linear from 0 over depth).
    use_mask_token: create a learned [MASK] embedding (BEiT), needed for `mask`.
    remat: what each block keeps for the backward pass (`remat_policy`).
    scan: run the blocks as one `nn.scan` (one compiled body, parameters stacked
      under `blocks/block`) instead of unrolled (`block_<i>`); the same function.
    unroll_scan: with `scan`, compile the scan's loop unrolled: the scanned
      parameters with the program of unrolled blocks (faster on CPUs).
    attention: `Attention.implementation`.
    any_grid: also take images of another patch grid (any multiple of the patch
      size), their position embeddings the `grid` ones resampled in the graph
      (`resize_pos_embedding`, so their gradient reaches the parameters): DINO's
      smaller local crops. The parameters are the same either way.
  """

  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  patch_size: int
  grid: tuple[int, int]
  drop_path_rate: float = 0.0
  use_mask_token: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: str | bool = "none"
  scan: bool = False
  unroll_scan: bool = False
  attention: str | None = None
  any_grid: bool = False

  @nn.compact
  def __call__(
    self,
    images: jax.Array,
    *,
    visible: jax.Array | None = None,
    mask: jax.Array | None = None,
    train: bool,
    with_block_outputs: bool = True,
  ):
    """Encodes all patches, only the `visible` ones, or all with `mask`ed ones hidden.

    Args:
      images: float [B, H, W, C] in [-1, 1], H = gh*patch_size, W = gw*patch_size.
      visible: optional int32 [B, n], indices (row-major over the grid) of the only
        patches to embed and process; the others are never read.
      mask: optional bool [B, N] (N = gh*gw); True patches are replaced by the
        [MASK] embedding before position embeddings are added. Needs
        use_mask_token=True; exclusive with `visible`.
      train: enables stochastic depth (uses the 'dropout' rng).
      with_block_outputs: return every block's output; scanned blocks would
        otherwise keep them all in memory, so pre-training asks for none.
    Returns:
      tokens: [B, n or N, width] in `dtype`, after the final LayerNorm.
      aux: {'block_outputs': tuple of `depth` arrays [B, n or N, width], each
        block's raw output (before the final LayerNorm); () without
        `with_block_outputs`. 'last_block_output': [B, n or N, width], the
        last block's raw output, with or without `with_block_outputs`}.
    """
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    gh, gw = self.grid
    expected = (gh * self.patch_size, gw * self.patch_size)
    if self.any_grid and images.ndim == 4:
      # Another grid's images are checked by patchify (whole patches); their
      # position embeddings are resampled below.
      gh, gw = images.shape[1] // self.patch_size, images.shape[2] // self.patch_size
    elif images.ndim != 4 or tuple(images.shape[1:3]) != expected:
      raise ValueError(
        f"images must be [B, {expected[0]}, {expected[1]}, C] for grid={self.grid} and "
        f"patch_size={self.patch_size}, got shape {images.shape}"
      )
    num_patches = gh * gw
    if visible is not None and mask is not None:
      raise ValueError("pass at most one of visible and mask")
    if mask is not None and not self.use_mask_token:
      raise ValueError("mask requires use_mask_token=True")
    if mask is not None and mask.shape != (images.shape[0], num_patches):
      raise ValueError(f"mask must be [B, {num_patches}], got shape {mask.shape}")
    if visible is not None and (visible.ndim != 2 or visible.shape[0] != images.shape[0]):
      raise ValueError(f"visible must be [B, n] with B={images.shape[0]}, got {visible.shape}")

    patches = patchify(images, self.patch_size)
    pos = self.param(
      "pos_embedding", _trunc_normal, (1, self.grid[0] * self.grid[1], self.width), self.param_dtype
    )
    if (gh, gw) != tuple(self.grid):
      pos = resize_pos_embedding(pos, self.grid, (gh, gw)).astype(pos.dtype)
    pos = jnp.broadcast_to(pos, (images.shape[0],) + pos.shape[1:])
    if visible is not None:
      # Selecting before the embedding keeps the hidden pixels out of the graph.
      patches = gather_tokens(patches, visible)
      pos = gather_tokens(pos, visible)
    x = nn.Dense(self.width, kernel_init=_xavier, name="embedding", **kw)(patches)
    if self.use_mask_token:
      mask_token = self.param("mask_token", _trunc_normal, (1, 1, self.width), self.param_dtype)
      if mask is not None:
        x = jnp.where(mask[..., None], mask_token.astype(x.dtype), x)
    x = x + pos.astype(x.dtype)

    x, block_outputs = _run_blocks(
      x,
      depth=self.depth,
      num_heads=self.num_heads,
      mlp_dim=self.mlp_dim,
      drop_path_rate=self.drop_path_rate,
      remat=self.remat,
      train=train,
      kw=dict(kw, attention=self.attention),
      scan=self.scan,
      unroll_scan=self.unroll_scan,
      collect=with_block_outputs,
    )
    last = x
    x = nn.LayerNorm(epsilon=_LN_EPS, name="norm", **kw)(x)
    return x, {"block_outputs": block_outputs, "last_block_output": last}


class Decoder(nn.Module):
  """Shallow ViT decoder: fills the missing positions and predicts their tokens.

  Attributes:
    width, num_heads, mlp_dim, depth: decoder transformer size.
    num_patches: N, length of the full patch sequence.
    vocab_size: V, number of visual words.
    drop_path_rate: stochastic depth of the last block (linear from 0 over depth).
    remat: what each block keeps for the backward pass (`remat_policy`).
    attention: `Attention.implementation`.
  """

  width: int
  num_heads: int
  mlp_dim: int
  num_patches: int
  vocab_size: int
  depth: int = 2
  drop_path_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: str | bool = "none"
  attention: str | None = None

  @nn.compact
  def __call__(self, tokens: jax.Array, visible: jax.Array, predict: jax.Array, *, train: bool):
    """Decodes one branch.

    Args:
      tokens: [B, n, D_enc] encoder outputs of the observed patches.
      visible: int32 [B, n], the grid positions of `tokens` (distinct).
      predict: int32 [B, m], the positions whose visual word is predicted.
      train: enables stochastic depth (uses the 'dropout' rng).
    Returns:
      features: [B, N, width] in `dtype`, after the final LayerNorm.
      logits: float32 [B, m, vocab_size] at the `predict` positions.
    """
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if tokens.ndim != 3 or visible.shape != tokens.shape[:2]:
      raise ValueError(
        f"tokens must be [B, n, D] and visible [B, n], got {tokens.shape} and {visible.shape}"
      )
    if predict.ndim != 2 or predict.shape[0] != tokens.shape[0]:
      raise ValueError(f"predict must be [B, m] with B={tokens.shape[0]}, got {predict.shape}")
    b = tokens.shape[0]

    observed = nn.Dense(self.width, kernel_init=_xavier, name="input_projection", **kw)(tokens)
    mask_token = self.param("mask_token", _trunc_normal, (1, 1, self.width), self.param_dtype)
    pos = self.param(
      "pos_embedding", _trunc_normal, (1, self.num_patches, self.width), self.param_dtype
    )
    # Missing positions carry their position through the mask embedding; observed
    # tokens already carry the encoder's position embedding.
    filler = jnp.broadcast_to(
      (mask_token + pos).astype(observed.dtype), (b, self.num_patches, self.width)
    )
    x = jax.vmap(lambda seq, idx, val: seq.at[idx].set(val))(filler, visible, observed)

    x, _ = _run_blocks(
      x,
      depth=self.depth,
      num_heads=self.num_heads,
      mlp_dim=self.mlp_dim,
      drop_path_rate=self.drop_path_rate,
      remat=self.remat,
      train=train,
      kw=dict(kw, attention=self.attention),
      collect=False,
    )
    features = nn.LayerNorm(epsilon=_LN_EPS, name="norm", **kw)(x)
    head = logits_dense(self.vocab_size, kernel_init=_trunc_normal, name="head", **kw)
    return features, head(gather_tokens(features, predict))
