"""Pre-training models: SplitMask (encoder + shallow decoder) and the BEiT baseline.

In every model the ViT encoder is the submodule `encoder`, so its parameters are
`variables['params']['encoder']` and can be loaded into a downstream classifier
(BEiT's and SimMIM's encoders additionally hold `mask_token`, which a classifier does
not use). MAE and SimMIM, the pixel-predicting baselines, are at the end.
Construct from the variant table, e.g.
`SplitMaskModel(**VARIANTS['B'], patch_size=16, grid=(14, 14), vocab_size=8192)`.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from splitmask_jax.models.vit import Decoder
from splitmask_jax.models.vit import Encoder
from splitmask_jax.models.vit import gather_tokens
from splitmask_jax.models.vit import gelu
from splitmask_jax.models.vit import logits_dense
from splitmask_jax.models.vit import pooled_features

Dtype = Any

_trunc_normal = nn.initializers.truncated_normal(stddev=0.02)


def _encoder(model: nn.Module, **options) -> Encoder:
  """The encoder of a pre-training model, from the fields every one of them has
  (width, depth, num_heads, mlp_dim, patch_size, grid, drop_path_rate, scan,
  unroll_scan, dtype, param_dtype, remat, attention); `options`: the Encoder
  options of its own (use_mask_token, any_grid)."""
  return Encoder(
    width=model.width,
    depth=model.depth,
    num_heads=model.num_heads,
    mlp_dim=model.mlp_dim,
    patch_size=model.patch_size,
    grid=model.grid,
    drop_path_rate=model.drop_path_rate,
    scan=model.scan,
    unroll_scan=model.unroll_scan,
    dtype=model.dtype,
    param_dtype=model.param_dtype,
    remat=model.remat,
    attention=model.attention,
    **options,
  )


class SplitMaskModel(nn.Module):
  """SplitMask: a shared encoder sees each branch's observed patches only, a shallow
  decoder inpaints the rest of the image for each branch, and each branch's decoder
  outputs are average-pooled into the embedding that the match compares.

  The projector (`projector='mlp'`, SimCLR's and MoCo v3's head) is
  Dense(projector_hidden_dim) - LayerNorm - ReLU - Dense(projector_dim) on the pooled
  features. LayerNorm where those papers use BatchNorm: it normalises each embedding
  on its own, so the model keeps no running statistics (no mutable collection in
  the train state, checkpoints or evaluation), the InfoNCE stays the only term that
  compares images (gradient accumulation and batch sharding keep their meaning:
  no statistics per micro-batch or per device), and the two branches cannot share
  batch statistics. Its parameters are `params['projection_head']`, beside
  `encoder` and `decoder`: a downstream model loads `params['encoder']` alone.

  Attributes:
    width, depth, num_heads, mlp_dim: encoder size (see VARIANTS).
    patch_size, grid: patch side in pixels and (gh, gw) patch grid.
    vocab_size: number of visual words predicted by the decoder head.
    decoder_depth: decoder blocks (2 in the paper).
    decoder_width, decoder_num_heads, decoder_mlp_dim: decoder size; None = the
      encoder's (the paper matches the encoder width).
    drop_path_rate, decoder_drop_path_rate: stochastic depth of each stack.
    remat: what every block of both stacks keeps for the backward pass.
    scan, unroll_scan: scan the encoder's blocks (see Encoder).
    attention: the attention kernel of both stacks (see Attention).
    projector: what maps the pooled decoder output to the matched embedding, one of
      PROJECTORS: 'none' (the paper: the pooled features themselves) or 'mlp'.
    projector_hidden_dim, projector_dim: the MLP projector's hidden and output widths.
  """

  # A class constant, not a field: the allowed values of `projector`.
  PROJECTORS = ("none", "mlp")

  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  patch_size: int
  grid: tuple[int, int]
  vocab_size: int
  decoder_depth: int = 2
  decoder_width: int | None = None
  decoder_num_heads: int | None = None
  decoder_mlp_dim: int | None = None
  drop_path_rate: float = 0.0
  decoder_drop_path_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: str | bool = "none"
  scan: bool = False
  unroll_scan: bool = False
  attention: str | None = None
  projector: str = "none"
  projector_hidden_dim: int = 2048
  projector_dim: int = 256

  def setup(self):
    kw = dict(
      dtype=self.dtype, param_dtype=self.param_dtype, remat=self.remat, attention=self.attention
    )
    if self.projector not in self.PROJECTORS:
      raise ValueError(f"projector must be one of {self.PROJECTORS}, got {self.projector!r}")
    self.encoder = _encoder(self)
    self.decoder = Decoder(
      width=self.decoder_width or self.width,
      num_heads=self.decoder_num_heads or self.num_heads,
      mlp_dim=self.decoder_mlp_dim or self.mlp_dim,
      num_patches=self.grid[0] * self.grid[1],
      vocab_size=self.vocab_size,
      depth=self.decoder_depth,
      drop_path_rate=self.decoder_drop_path_rate,
      **kw,
    )
    if self.projector == "mlp":
      dense = dict(
        kernel_init=nn.initializers.xavier_uniform(),
        dtype=self.dtype,
        param_dtype=self.param_dtype,
      )
      self.projection_head = nn.Sequential(
        [
          nn.Dense(self.projector_hidden_dim, **dense),
          nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, param_dtype=self.param_dtype),
          nn.relu,
          nn.Dense(self.projector_dim, **dense),
        ]
      )

  def __call__(
    self,
    images: jax.Array,
    visible_a: jax.Array,
    visible_b: jax.Array,
    masked_a: jax.Array,
    masked_b: jax.Array,
    *,
    train: bool,
  ) -> dict:
    """Runs both branches.

    Args:
      images: float [B, H, W, C] in [-1, 1].
      visible_a, visible_b: int32 [B, n], patches observed by branch a / b.
      masked_a, masked_b: int32 [B, m], patches whose visual word branch a / b
        predicts (those it does not observe).
      train: enables stochastic depth (uses the 'dropout' rng).
    Returns:
      {'logits_a', 'logits_b': float32 [B, m, V],
       'features_a', 'features_b': [B, N, decoder width] in `dtype`, the decoder
       outputs at every position,
       'embedding_a', 'embedding_b': float32 [B, D], what the match compares: the
       average-pooled features (D = decoder width), through the projector when
       there is one (D = projector_dim)}.
    """
    b = images.shape[0]
    if visible_a.shape != visible_b.shape or visible_a.ndim != 2 or visible_a.shape[0] != b:
      raise ValueError(
        f"visible_a and visible_b must both be [B={b}, n], got "
        f"{visible_a.shape} and {visible_b.shape}"
      )
    if masked_a.shape != masked_b.shape or masked_a.ndim != 2 or masked_a.shape[0] != b:
      raise ValueError(
        f"masked_a and masked_b must both be [B={b}, m], got {masked_a.shape} and {masked_b.shape}"
      )
    # Both branches as one batch of 2B: the weights are shared and one call
    # launches every kernel once instead of twice.
    both = lambda x, y: jnp.concatenate([x, y], axis=0)
    visible = both(visible_a, visible_b)
    tokens, _ = self.encoder(
      both(images, images), visible=visible, train=train, with_block_outputs=False
    )
    features, logits = self.decoder(tokens, visible, both(masked_a, masked_b), train=train)
    # Over observed and hallucinated positions alike (the paper's pooling).
    embedding = pooled_features(features)
    if self.projector == "mlp":
      embedding = self.projection_head(embedding).astype(jnp.float32)
    return {
      "logits_a": logits[:b],
      "logits_b": logits[b:],
      "features_a": features[:b],
      "features_b": features[b:],
      "embedding_a": embedding[:b],
      "embedding_b": embedding[b:],
    }

  def encode(self, images: jax.Array, *, train: bool = False):
    """Encoder over all patches: (tokens [B, N, width], aux), see Encoder."""
    return self.encoder(images, train=train)


class BEiTModel(nn.Module):
  """BEiT: an encoder over all patches, masked ones replaced by a learned [MASK]
  embedding, and a linear head predicting the masked patches' visual words.

  Attributes:
    width, depth, num_heads, mlp_dim: encoder size (see VARIANTS).
    patch_size, grid: patch side in pixels and (gh, gw) patch grid.
    vocab_size: number of visual words.
    drop_path_rate: stochastic depth of the last block.
    remat: what every block keeps for the backward pass.
    scan, unroll_scan: scan the encoder's blocks (see Encoder).
    attention: the attention kernel (see Attention).
  """

  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  patch_size: int
  grid: tuple[int, int]
  vocab_size: int
  drop_path_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: str | bool = "none"
  scan: bool = False
  unroll_scan: bool = False
  attention: str | None = None

  def setup(self):
    self.encoder = _encoder(self, use_mask_token=True)
    self.head = logits_dense(
      self.vocab_size, kernel_init=_trunc_normal, dtype=self.dtype, param_dtype=self.param_dtype
    )

  def __call__(self, images: jax.Array, mask: jax.Array, masked: jax.Array, *, train: bool) -> dict:
    """Predicts the visual words of the masked patches.

    Args:
      images: float [B, H, W, C] in [-1, 1].
      mask: bool [B, N], True where the patch is replaced by [MASK].
      masked: int32 [B, m], the indices of the True entries of `mask`.
      train: enables stochastic depth (uses the 'dropout' rng).
    Returns:
      {'logits': float32 [B, m, V]}.
    """
    if masked.ndim != 2 or masked.shape[0] != images.shape[0]:
      raise ValueError(f"masked must be [B={images.shape[0]}, m], got {masked.shape}")
    tokens, _ = self.encoder(images, mask=mask, train=train, with_block_outputs=False)
    return {"logits": self.head(gather_tokens(tokens, masked))}

  def encode(self, images: jax.Array, *, train: bool = False):
    """Encoder over all patches, nothing masked: (tokens [B, N, width], aux)."""
    return self.encoder(images, train=train)


class MAEModel(nn.Module):
  """MAE: the encoder sees the visible patches only (no [MASK] embedding); a light
  decoder over its tokens plus mask tokens at the missing positions predicts the
  pixels of each masked patch.

  The decoder is `Decoder` with one output per pixel value: its mask tokens carry the
  decoder's position embeddings, its visible tokens the encoder's (MAE adds the
  decoder's position embeddings to both; either way every token knows its place).

  Attributes:
    width, depth, num_heads, mlp_dim: encoder size (see VARIANTS).
    patch_size, grid: patch side in pixels and (gh, gw) patch grid.
    num_channels: C, so that a patch prediction is patch_size**2 * C values.
    decoder_width, decoder_depth, decoder_num_heads: decoder size (MAE: 512, 8, 16).
    decoder_mlp_dim: None: 4 * decoder_width (MAE's MLP ratio).
    drop_path_rate: stochastic depth of the encoder's last block (the decoder has none).
    remat: what every block of both stacks keeps for the backward pass.
    scan, unroll_scan: scan the encoder's blocks (see Encoder).
    attention: the attention kernel of both stacks (see Attention).
  """

  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  patch_size: int
  grid: tuple[int, int]
  num_channels: int = 3
  decoder_width: int = 512
  decoder_depth: int = 8
  decoder_num_heads: int = 16
  decoder_mlp_dim: int | None = None
  drop_path_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: str | bool = "none"
  scan: bool = False
  unroll_scan: bool = False
  attention: str | None = None

  def setup(self):
    kw = dict(
      dtype=self.dtype, param_dtype=self.param_dtype, remat=self.remat, attention=self.attention
    )
    self.encoder = _encoder(self)
    self.decoder = Decoder(
      width=self.decoder_width,
      num_heads=self.decoder_num_heads,
      mlp_dim=self.decoder_mlp_dim or 4 * self.decoder_width,
      num_patches=self.grid[0] * self.grid[1],
      vocab_size=self.patch_size**2 * self.num_channels,
      depth=self.decoder_depth,
      **kw,
    )

  def __call__(self, images: jax.Array, visible: jax.Array, masked: jax.Array, *, train: bool):
    """Predicts the pixels of the masked patches from the visible ones.

    Args:
      images: float [B, H, W, C] in [-1, 1].
      visible: int32 [B, n], the patches the encoder sees.
      masked: int32 [B, m], the others, whose pixels are predicted.
      train: enables stochastic depth (uses the 'dropout' rng).
    Returns:
      {'pixels': float32 [B, m, patch_size**2 * C]}, each patch in `patchify`'s order.
    """
    b = images.shape[0]
    if visible.ndim != 2 or visible.shape[0] != b or masked.ndim != 2 or masked.shape[0] != b:
      raise ValueError(
        f"visible and masked must be [B={b}, n] and [B={b}, m], got {visible.shape} and "
        f"{masked.shape}"
      )
    tokens, _ = self.encoder(images, visible=visible, train=train, with_block_outputs=False)
    _, pixels = self.decoder(tokens, visible, masked, train=train)
    return {"pixels": pixels}

  def encode(self, images: jax.Array, *, train: bool = False):
    """Encoder over all patches: (tokens [B, N, width], aux), see Encoder."""
    return self.encoder(images, train=train)


class SimMIMModel(nn.Module):
  """SimMIM: an encoder over all patches, masked ones replaced by a learned [MASK]
  embedding (as BEiT's), and one linear layer predicting each masked patch's pixels.

  Attributes:
    width, depth, num_heads, mlp_dim: encoder size (see VARIANTS).
    patch_size, grid: patch side in pixels and (gh, gw) patch grid.
    num_channels: C, so that a patch prediction is patch_size**2 * C values.
    drop_path_rate: stochastic depth of the last block.
    remat: what every block keeps for the backward pass.
    scan, unroll_scan: scan the encoder's blocks (see Encoder).
    attention: the attention kernel (see Attention).
  """

  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  patch_size: int
  grid: tuple[int, int]
  num_channels: int = 3
  drop_path_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: str | bool = "none"
  scan: bool = False
  unroll_scan: bool = False
  attention: str | None = None

  def setup(self):
    self.encoder = _encoder(self, use_mask_token=True)
    # Float32 outputs whatever the compute dtype: the regression target is float32.
    self.head = logits_dense(
      self.patch_size**2 * self.num_channels,
      kernel_init=_trunc_normal,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
    )

  def __call__(self, images: jax.Array, mask: jax.Array, masked: jax.Array, *, train: bool):
    """Predicts the pixels of the masked patches.

    Args:
      images: float [B, H, W, C] in [-1, 1].
      mask: bool [B, N], True where the patch is replaced by [MASK].
      masked: int32 [B, m], the indices of the True entries of `mask`.
      train: enables stochastic depth (uses the 'dropout' rng).
    Returns:
      {'pixels': float32 [B, m, patch_size**2 * C]}, each patch in `patchify`'s order.
    """
    if masked.ndim != 2 or masked.shape[0] != images.shape[0]:
      raise ValueError(f"masked must be [B={images.shape[0]}, m], got {masked.shape}")
    tokens, _ = self.encoder(images, mask=mask, train=train, with_block_outputs=False)
    return {"pixels": self.head(gather_tokens(tokens, masked))}

  def encode(self, images: jax.Array, *, train: bool = False):
    """Encoder over all patches, nothing masked: (tokens [B, N, width], aux)."""
    return self.encoder(images, train=train)


# PyTorch's default nn.Linear weight (Kaiming-uniform with a = sqrt(5): U(+-1/sqrt(fan_in))),
# which DINO's last layer keeps: it is created after the head's truncated-normal init.
_torch_linear_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


class DINOHead(nn.Module):
  """DINO's projection head: a 3-layer MLP (GELU) to a bottleneck, L2 normalisation,
  and a weight-normalised linear layer without bias to `out_dim` outputs.

  The last layer's kernel `last_layer/kernel` [bottleneck, K] is used as
  scale * kernel / (the norm of each output's column); with `norm_last_layer` the
  scale is fixed at 1 (DINO's default, which it finds stabilises training), else it
  is the learned `last_layer/scale` [K], initialised to 1. Logits are float32.

  Attributes:
    out_dim: K, the dimension the teacher's softmax is over (65,536 in DINO).
    hidden_dim, bottleneck_dim: the MLP's widths (2048 and 256 in DINO).
  """

  out_dim: int
  hidden_dim: int
  bottleneck_dim: int
  norm_last_layer: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, D] -> float32 [B, out_dim]."""
    kw = dict(kernel_init=_trunc_normal, dtype=self.dtype, param_dtype=self.param_dtype)
    x = gelu(nn.Dense(self.hidden_dim, name="fc1", **kw)(x))
    x = gelu(nn.Dense(self.hidden_dim, name="fc2", **kw)(x))
    x = nn.Dense(self.bottleneck_dim, name="fc3", **kw)(x).astype(jnp.float32)
    # torch's F.normalize: x / max(|x|, 1e-12).
    x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    last_layer = WeightNormDense(
      self.out_dim,
      use_scale=not self.norm_last_layer,
      param_dtype=self.param_dtype,
      name="last_layer",
    )
    return last_layer(x)


class WeightNormDense(nn.Module):
  """A linear layer without bias whose kernel is scale * v / |v| per output unit
  (torch's weight_norm of nn.Linear), computed in float32: [..., D] -> [..., features].

  Attributes:
    use_scale: learn the per-output scale (init 1); False fixes it at 1.
  """

  features: int
  use_scale: bool = True
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    v = self.param("kernel", _torch_linear_init, (x.shape[-1], self.features), self.param_dtype)
    kernel = v.astype(jnp.float32)
    kernel = kernel / jnp.linalg.norm(kernel, axis=0, keepdims=True)
    if self.use_scale:
      kernel = kernel * self.param("scale", nn.initializers.ones, (self.features,), jnp.float32)
    return x.astype(jnp.float32) @ kernel


class DINOModel(nn.Module):
  """DINO's network, student and teacher alike: the encoder and the DINO head on its
  pooled tokens. The teacher is the same module with the EMA weights
  (objectives/dino.py).

  DINO's feature is the [CLS] token; this encoder has none (vit.Encoder), so the
  head reads the mean of the encoder's output tokens: the feature that k-NN, the
  probes and fine-tuning read too. The encoder takes crops of any size that is a
  multiple of the patch size (the local crops), resampling its position embeddings.

  Attributes:
    width, depth, num_heads, mlp_dim, patch_size, grid: the encoder (see Encoder);
      `grid` is the global crops' (config.model.image_size).
    out_dim, hidden_dim, bottleneck_dim, norm_last_layer: the head (DINOHead).
    drop_path_rate, remat, scan, unroll_scan, attention: as the other models' encoders.
  """

  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  patch_size: int
  grid: tuple[int, int]
  out_dim: int
  hidden_dim: int
  bottleneck_dim: int
  norm_last_layer: bool = True
  drop_path_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: str | bool = "none"
  scan: bool = False
  unroll_scan: bool = False
  attention: str | None = None

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.encoder = _encoder(self, any_grid=True)
    self.head = DINOHead(
      out_dim=self.out_dim,
      hidden_dim=self.hidden_dim,
      bottleneck_dim=self.bottleneck_dim,
      norm_last_layer=self.norm_last_layer,
      **kw,
    )

  def __call__(self, images: jax.Array, *, train: bool) -> jax.Array:
    """The head's outputs of a batch of crops of one size.

    Args:
      images: float [B, h, w, C] in [-1, 1], h and w multiples of patch_size.
      train: enables stochastic depth (uses the 'dropout' rng).
    Returns:
      float32 [B, out_dim], before any temperature or softmax.
    """
    tokens, _ = self.encoder(images, train=train, with_block_outputs=False)
    return self.head(pooled_features(tokens))

  def encode(self, images: jax.Array, *, train: bool = False):
    """Encoder over all patches: (tokens [B, N, width], aux), see Encoder."""
    return self.encoder(images, train=train)
