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
LayerNorm statistics and the attention softmax are always float32 and vocabulary
logits are returned as float32.
"""

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
  """Per-sample stochastic depth on a residual branch (needs the 'dropout' rng)."""

  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    if not train or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    kept = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
    return jnp.where(kept, x / jnp.asarray(keep, x.dtype), jnp.zeros_like(x))


class Attention(nn.Module):
  """Multi-head self-attention over [B, T, D] through jax.nn.dot_product_attention."""

  num_heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

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
    # Softmax is computed in float32 inside dot_product_attention.
    out = jax.nn.dot_product_attention(q, k, v).reshape(b, t, d)
    return nn.Dense(
      d, kernel_init=_xavier, dtype=self.dtype, param_dtype=self.param_dtype, name="proj"
    )(out)


class Block(nn.Module):
  """Pre-norm transformer block on [B, T, D] -> [B, T, D]."""

  num_heads: int
  mlp_dim: int
  drop_path_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    d = x.shape[-1]
    drop = DropPath(self.drop_path_rate)
    y = nn.LayerNorm(epsilon=_LN_EPS, name="norm1", **kw)(x)
    y = Attention(self.num_heads, name="attn", **kw)(y)
    x = x + drop(y, train)
    y = nn.LayerNorm(epsilon=_LN_EPS, name="norm2", **kw)(x)
    y = nn.Dense(self.mlp_dim, kernel_init=_xavier, name="fc1", **kw)(y)
    y = nn.gelu(y, approximate=False)
    y = nn.Dense(d, kernel_init=_xavier, name="fc2", **kw)(y)
    return x + drop(y, train)


def _block_class(remat: bool):
  # Index 2 is `train` (index 0 is the module itself): it must stay a Python bool.
  return nn.remat(Block, static_argnums=(2,)) if remat else Block


def _run_blocks(x, *, depth, num_heads, mlp_dim, drop_path_rate, remat, train, kw):
  block_cls = _block_class(remat)
  outputs = []
  for i, rate in enumerate(drop_path_rates(drop_path_rate, depth)):
    x = block_cls(num_heads, mlp_dim, rate, name=f"block_{i}", **kw)(x, train)
    outputs.append(x)
  return x, tuple(outputs)


class Encoder(nn.Module):
  """ViT encoder with learned absolute position embeddings and no class token.

  Attributes:
    width, depth, num_heads, mlp_dim: transformer size (see VARIANTS).
    patch_size: side of the square patches in pixels.
    grid: (gh, gw) patch grid; images must be [B, gh*patch_size, gw*patch_size, C].
    drop_path_rate: stochastic depth of the last block (linear from 0 over depth).
    use_mask_token: create a learned [MASK] embedding (BEiT), needed for `mask`.
    remat: rematerialise each block in the backward pass.
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
  remat: bool = False

  @nn.compact
  def __call__(
    self,
    images: jax.Array,
    *,
    visible: jax.Array | None = None,
    mask: jax.Array | None = None,
    train: bool,
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
    Returns:
      tokens: [B, n or N, width] in `dtype`, after the final LayerNorm.
      aux: {'block_outputs': tuple of `depth` arrays [B, n or N, width], each
        block's raw output (before the final LayerNorm)}.
    """
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    gh, gw = self.grid
    num_patches = gh * gw
    expected = (gh * self.patch_size, gw * self.patch_size)
    if images.ndim != 4 or tuple(images.shape[1:3]) != expected:
      raise ValueError(
        f"images must be [B, {expected[0]}, {expected[1]}, C] for grid={self.grid} and "
        f"patch_size={self.patch_size}, got shape {images.shape}"
      )
    if visible is not None and mask is not None:
      raise ValueError("pass at most one of visible and mask")
    if mask is not None and not self.use_mask_token:
      raise ValueError("mask requires use_mask_token=True")
    if mask is not None and mask.shape != (images.shape[0], num_patches):
      raise ValueError(f"mask must be [B, {num_patches}], got shape {mask.shape}")
    if visible is not None and (visible.ndim != 2 or visible.shape[0] != images.shape[0]):
      raise ValueError(f"visible must be [B, n] with B={images.shape[0]}, got {visible.shape}")

    patches = patchify(images, self.patch_size)
    pos = self.param("pos_embedding", _trunc_normal, (1, num_patches, self.width), self.param_dtype)
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
      kw=kw,
    )
    x = nn.LayerNorm(epsilon=_LN_EPS, name="norm", **kw)(x)
    return x, {"block_outputs": block_outputs}


class Decoder(nn.Module):
  """Shallow ViT decoder: fills the missing positions and predicts their tokens.

  Attributes:
    width, num_heads, mlp_dim, depth: decoder transformer size.
    num_patches: N, length of the full patch sequence.
    vocab_size: V, number of visual words.
    drop_path_rate: stochastic depth of the last block (linear from 0 over depth).
    remat: rematerialise each block in the backward pass.
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
  remat: bool = False

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
      kw=kw,
    )
    features = nn.LayerNorm(epsilon=_LN_EPS, name="norm", **kw)(x)
    logits = nn.Dense(self.vocab_size, kernel_init=_trunc_normal, name="head", **kw)(
      gather_tokens(features, predict)
    )
    return features, logits.astype(jnp.float32)
