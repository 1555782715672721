"""Tests of the ViT encoder, the decoder and the SplitMask / BEiT pre-training models."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from splitmask_jax.models.pretrain import BEiTModel
from splitmask_jax.models.pretrain import SplitMaskModel
from splitmask_jax.models.vit import VARIANTS
from splitmask_jax.models.vit import Decoder
from splitmask_jax.models.vit import Encoder
from splitmask_jax.models.vit import drop_path_rates
from splitmask_jax.models.vit import gelu
from splitmask_jax.models.vit import parse_variant
from splitmask_jax.models.vit import patchify

P, GRID, VOCAB, B = 4, (4, 4), 16, 2
N = GRID[0] * GRID[1]
IMG = GRID[0] * P
CFG = dict(**VARIANTS["Test"], patch_size=P, grid=GRID, vocab_size=VOCAB)


def _images(seed, channels):
  return jax.random.uniform(jax.random.key(seed), (B, IMG, IMG, channels), minval=-1, maxval=1)


def _split(seed):
  """Per-example random 50% split: visible_a, visible_b (= masked_a), as int32 [B, N/2]."""
  rng = np.random.default_rng(seed)
  perms = np.stack([rng.permutation(N) for _ in range(B)]).astype(np.int32)
  return jnp.asarray(perms[:, : N // 2]), jnp.asarray(perms[:, N // 2 :])


def _perturb_patches(images, keep, seed):
  """Replaces the pixels of every patch NOT listed in keep [B, n] by noise."""
  keep_mask = np.zeros((B, N), bool)
  np.put_along_axis(keep_mask, np.asarray(keep), True, axis=1)
  pixel_keep = np.repeat(np.repeat(keep_mask.reshape(B, *GRID), P, 1), P, 2)[..., None]
  noise = jax.random.normal(jax.random.key(seed), images.shape) * 3.0
  return jnp.where(pixel_keep, images, noise)


def _change_patch(images, example, patch):
  r, c = divmod(int(patch), GRID[1])
  return images.at[example, r * P : (r + 1) * P, c * P : (c + 1) * P].add(0.5)


@functools.partial(jax.jit, static_argnames=("model", "train"))
def _splitmask_fwd(model, params, images, va, vb, ma, mb, rng, train):
  return model.apply(params, images, va, vb, ma, mb, train=train, rngs={"dropout": rng})


@functools.partial(jax.jit, static_argnames=("model",))
def _encode(model, params, images, visible=None, mask=None):
  """The model's encoder on all patches, on `visible` ones only, or with `mask`."""
  return model.apply(
    params,
    images,
    visible=visible,
    mask=mask,
    train=False,
    method=lambda m, x, **kw: m.encoder(x, **kw),
  )


@pytest.fixture(scope="module")
def splitmask():
  model = SplitMaskModel(**CFG, drop_path_rate=0.5, decoder_drop_path_rate=0.5)
  images = _images(0, 3)
  va, vb = _split(1)
  params = jax.jit(lambda: model.init(jax.random.key(0), images, va, vb, vb, va, train=False))()
  return model, params, images, va, vb


def _run(splitmask, images=None, va=None, vb=None, ma=None, mb=None, train=False, seed=0):
  model, params, images0, va0, vb0 = splitmask
  va = va0 if va is None else va
  vb = vb0 if vb is None else vb
  return _splitmask_fwd(
    model,
    params,
    images0 if images is None else images,
    va,
    vb,
    vb if ma is None else ma,
    va if mb is None else mb,
    jax.random.key(seed),
    train,
  )


def test_variants_and_parse_variant():
  assert VARIANTS["Test"] == dict(width=32, depth=2, num_heads=2, mlp_dim=64)
  assert VARIANTS["B"] == dict(width=768, depth=12, num_heads=12, mlp_dim=3072)
  assert VARIANTS["L"] == dict(width=1024, depth=24, num_heads=16, mlp_dim=4096)
  assert parse_variant("S/16") == (VARIANTS["S"], 16)
  assert parse_variant("Ti/8") == (VARIANTS["Ti"], 8)
  parse_variant("B/16")[0]["width"] = 0  # a copy: the table is untouched
  assert VARIANTS["B"]["width"] == 768
  for bad in ["X/16", "B", "B/", "B/0", "B/16/2", "b/16", 16]:
    with pytest.raises(ValueError, match="variant"):
      parse_variant(bad)


def test_drop_path_rates_increase_linearly():
  np.testing.assert_allclose(drop_path_rates(0.1, 5), [0.0, 0.025, 0.05, 0.075, 0.1])
  assert drop_path_rates(0.0, 3) == [0.0, 0.0, 0.0]
  with pytest.raises(ValueError, match="drop_path_rate"):
    drop_path_rates(-0.1, 3)


def test_patchify_matches_loop():
  images = np.asarray(_images(3, 3))
  expected = np.stack(
    [
      np.stack(
        [
          images[b, r * P : (r + 1) * P, c * P : (c + 1) * P].reshape(-1)
          for r in range(GRID[0])
          for c in range(GRID[1])
        ]
      )
      for b in range(B)
    ]
  )
  np.testing.assert_array_equal(np.asarray(patchify(jnp.asarray(images), P)), expected)


def test_splitmask_shapes_dtypes_and_params_tree(splitmask):
  model, params, images, va, vb = splitmask
  out = _run(splitmask)
  assert set(out) == {
    "logits_a",
    "logits_b",
    "features_a",
    "features_b",
    "embedding_a",
    "embedding_b",
  }
  for k in ("logits_a", "logits_b"):
    assert out[k].shape == (B, N // 2, VOCAB) and out[k].dtype == jnp.float32
  for k in ("features_a", "features_b"):
    assert out[k].shape == (B, N, CFG["width"]) and out[k].dtype == jnp.float32
  # No projector (the default): the matched embedding is the pooled decoder output.
  for x in "ab":
    assert out[f"embedding_{x}"].dtype == jnp.float32
    np.testing.assert_allclose(
      out[f"embedding_{x}"], np.asarray(out[f"features_{x}"]).mean(axis=1), rtol=1e-5, atol=1e-6
    )
  assert set(params["params"]) == {"encoder", "decoder"}
  assert params["params"]["encoder"]["pos_embedding"].shape == (1, N, CFG["width"])
  assert "mask_token" not in params["params"]["encoder"]
  assert params["params"]["decoder"]["head"]["kernel"].shape == (CFG["width"], VOCAB)
  # qkv is initialised as three Xavier [D, D] matrices: std sqrt(2 / (D + D)).
  qkv = np.asarray(params["params"]["encoder"]["block_0"]["attn"]["qkv"]["kernel"])
  np.testing.assert_allclose(qkv.std(), np.sqrt(1.0 / CFG["width"]), rtol=0.1)
  np.testing.assert_allclose(params["params"]["encoder"]["pos_embedding"].std(), 0.02, rtol=0.15)

  tokens, aux = jax.jit(lambda p, x: model.apply(p, x, method="encode"))(params, images)
  assert tokens.shape == (B, N, CFG["width"])
  assert len(aux["block_outputs"]) == CFG["depth"]
  assert all(o.shape == (B, N, CFG["width"]) for o in aux["block_outputs"])


def test_encoder_only_reads_visible_patches(splitmask):
  model, params, images, va, _ = splitmask
  tokens, aux = _encode(model, params, images, va)
  assert tokens.shape == (B, N // 2, CFG["width"])
  assert all(o.shape == (B, N // 2, CFG["width"]) for o in aux["block_outputs"])

  hidden_changed = _perturb_patches(images, va, seed=5)
  assert not np.allclose(hidden_changed, images)
  np.testing.assert_array_equal(_encode(model, params, hidden_changed, va)[0], tokens)

  visible_changed = _change_patch(images, 0, va[0, 3])
  changed = _encode(model, params, visible_changed, va)[0]
  assert not np.allclose(changed[0], tokens[0], atol=1e-4)
  np.testing.assert_array_equal(changed[1], tokens[1])  # examples are independent


def test_encoder_gather_is_consistent(splitmask):
  """Permuting `visible` permutes the tokens; every patch visible equals no selection."""
  model, params, images, va, _ = splitmask
  perm = np.random.default_rng(0).permutation(N // 2)
  tokens = _encode(model, params, images, va)[0]
  permuted = _encode(model, params, images, va[:, perm])[0]
  np.testing.assert_allclose(permuted, tokens[:, perm], atol=1e-5)

  full = _encode(model, params, images)[0]
  reversed_all = jnp.broadcast_to(jnp.arange(N - 1, -1, -1, dtype=jnp.int32), (B, N))
  np.testing.assert_allclose(
    _encode(model, params, images, reversed_all)[0], full[:, ::-1], atol=1e-5
  )
  # A token's value depends on which other patches are visible (attention mixes them).
  first_half = jnp.broadcast_to(jnp.arange(N // 2, dtype=jnp.int32), (B, N // 2))
  assert not np.allclose(
    _encode(model, params, images, first_half)[0], full[:, : N // 2], atol=1e-4
  )


def test_branch_sees_only_its_patches(splitmask):
  _, _, images, va, vb = splitmask
  base = _run(splitmask)
  out = _run(splitmask, images=_perturb_patches(images, va, seed=7))
  np.testing.assert_array_equal(out["logits_a"], base["logits_a"])
  np.testing.assert_array_equal(out["features_a"], base["features_a"])
  assert not np.allclose(out["logits_b"], base["logits_b"], atol=1e-4)
  out = _run(splitmask, images=_perturb_patches(images, vb, seed=8))
  np.testing.assert_array_equal(out["logits_b"], base["logits_b"])
  assert not np.allclose(out["logits_a"], base["logits_a"], atol=1e-4)


def test_branches_independent_in_joint_batch(splitmask):
  _, _, _, va, vb = splitmask
  base = _run(splitmask)
  other_b = jnp.asarray(np.roll(np.asarray(vb), 3, axis=1)[:, ::-1].copy())
  other_b = other_b.at[:, 0].set(va[:, 0])  # b now overlaps a: still no effect on a
  out = _run(splitmask, vb=other_b, ma=vb, mb=jnp.flip(va, axis=1))
  np.testing.assert_array_equal(out["logits_a"], base["logits_a"])
  np.testing.assert_array_equal(out["features_a"], base["features_a"])
  assert not np.allclose(out["logits_b"], base["logits_b"], atol=1e-4)


def test_decoder_predict_indexing(splitmask):
  """Logits are the head applied to the features at `predict`, in `predict` order."""
  model, params, _, va, vb = splitmask
  predict = jnp.asarray(np.random.default_rng(3).integers(0, N, (B, 5)), jnp.int32)
  out = _run(splitmask, ma=predict, mb=predict)
  head = params["params"]["decoder"]["head"]
  feats = np.asarray(out["features_a"], np.float64)
  expected = np.stack([feats[b, np.asarray(predict[b])] for b in range(B)])
  expected = expected @ np.asarray(head["kernel"], np.float64) + np.asarray(head["bias"])
  np.testing.assert_allclose(out["logits_a"], expected, atol=1e-4)
  assert out["logits_a"].shape == (B, 5, VOCAB)


def test_decoder_observed_order_does_not_matter():
  """Scatter by position: the order of the observed tokens is irrelevant."""
  dec = Decoder(width=32, num_heads=2, mlp_dim=64, num_patches=N, vocab_size=VOCAB)
  va, vb = _split(4)
  tokens = jax.random.normal(jax.random.key(1), (B, N // 2, 24))
  params = jax.jit(lambda: dec.init(jax.random.key(0), tokens, va, vb, train=False))()
  fwd = jax.jit(lambda t, v: dec.apply(params, t, v, vb, train=False))
  perm = np.random.default_rng(1).permutation(N // 2)
  f1, l1 = fwd(tokens, va)
  f2, l2 = fwd(tokens[:, perm], va[:, perm])
  np.testing.assert_allclose(f1, f2, atol=1e-5)
  np.testing.assert_allclose(l1, l2, atol=1e-5)
  assert f1.shape == (B, N, 32) and l1.shape == (B, N // 2, VOCAB)


def test_drop_path(splitmask):
  eval1 = _run(splitmask, train=False, seed=1)
  eval2 = _run(splitmask, train=False, seed=2)
  np.testing.assert_array_equal(eval1["logits_a"], eval2["logits_a"])
  train1 = _run(splitmask, train=True, seed=1)
  train1_again = _run(splitmask, train=True, seed=1)
  train2 = _run(splitmask, train=True, seed=2)
  np.testing.assert_array_equal(train1["logits_a"], train1_again["logits_a"])
  assert not np.allclose(train1["logits_a"], train2["logits_a"], atol=1e-4)
  assert not np.allclose(train1["logits_a"], eval1["logits_a"], atol=1e-4)


def test_remat_same_outputs_and_gradients(splitmask):
  model, params, images, va, vb = splitmask
  rng = jax.random.key(3)

  def loss(p, m):
    out = m.apply(p, images, va, vb, vb, va, train=True, rngs={"dropout": rng})
    return jnp.sum(out["logits_a"] ** 2) + jnp.sum(out["features_b"] ** 2), out

  results = [
    jax.jit(jax.value_and_grad(functools.partial(loss, m=m), has_aux=True))(params)
    for m in (model, model.clone(remat=True))
  ]
  (_, out_plain), grads_plain = results[0]
  (_, out_remat), grads_remat = results[1]
  for k in out_plain:
    np.testing.assert_allclose(out_remat[k], out_plain[k], rtol=1e-5, atol=1e-5)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), grads_remat, grads_plain
  )
  assert any(np.abs(g).sum() > 0 for g in jax.tree.leaves(grads_plain))


def test_bfloat16_compute(splitmask):
  model, params, images, va, vb = splitmask
  bf16 = model.clone(dtype=jnp.bfloat16)
  shapes = jax.eval_shape(lambda: bf16.init(jax.random.key(0), images, va, vb, vb, va, train=False))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(shapes))
  assert jax.tree.structure(shapes) == jax.tree.structure(params)
  out = _splitmask_fwd(bf16, params, images, va, vb, vb, va, jax.random.key(0), False)
  ref = _run(splitmask)
  assert out["logits_a"].dtype == jnp.float32 and out["logits_b"].dtype == jnp.float32
  assert out["features_a"].dtype == jnp.bfloat16
  np.testing.assert_allclose(out["logits_a"], ref["logits_a"], atol=0.02)


def test_beit_model():
  model = BEiTModel(**CFG)
  images = _images(10, 1)
  rng = np.random.default_rng(11)
  masked = np.stack([np.sort(rng.choice(N, 6, replace=False)) for _ in range(B)])
  mask = np.zeros((B, N), bool)
  np.put_along_axis(mask, masked, True, axis=1)
  masked, mask = jnp.asarray(masked, jnp.int32), jnp.asarray(mask)
  unmasked = jnp.asarray(np.stack([np.flatnonzero(~m) for m in np.asarray(mask)]), jnp.int32)

  params = jax.jit(lambda: model.init(jax.random.key(0), images, mask, masked, train=False))()
  assert set(params["params"]) == {"encoder", "head"}
  assert params["params"]["encoder"]["mask_token"].shape == (1, 1, CFG["width"])
  fwd = jax.jit(lambda im: model.apply(params, im, mask, masked, train=False)["logits"])
  logits = fwd(images)
  assert logits.shape == (B, 6, VOCAB) and logits.dtype == jnp.float32
  np.testing.assert_array_equal(fwd(_perturb_patches(images, unmasked, seed=12)), logits)
  assert not np.allclose(fwd(_change_patch(images, 1, unmasked[1, 0])), logits, atol=1e-4)

  tokens, aux = jax.jit(lambda p, x: model.apply(p, x, method="encode"))(params, images)
  assert tokens.shape == (B, N, CFG["width"]) and len(aux["block_outputs"]) == CFG["depth"]
  # The [MASK] embedding replaces the masked patches: unmasked encoding differs.
  assert not np.allclose(_encode(model, params, images, mask=mask)[0], tokens, atol=1e-4)


def test_bad_arguments_raise(splitmask):
  model, params, images, va, vb = splitmask
  enc = Encoder(**VARIANTS["Test"], patch_size=P, grid=GRID)
  with pytest.raises(ValueError, match="images must be"):
    enc.init(jax.random.key(0), jnp.zeros((1, IMG + P, IMG, 3)), train=False)
  with pytest.raises(ValueError, match="use_mask_token"):
    enc.init(
      jax.random.key(0), jnp.zeros((1, IMG, IMG, 3)), mask=jnp.zeros((1, N), bool), train=False
    )
  with pytest.raises(ValueError, match="visible_a and visible_b"):
    model.apply(params, images, va, vb[:, :3], vb, va, train=False)
  with pytest.raises(ValueError, match="drop_path_rate"):
    Encoder(**VARIANTS["Test"], patch_size=P, grid=GRID, drop_path_rate=1.0).init(
      jax.random.key(0), jnp.zeros((1, IMG, IMG, 3)), train=False
    )


def test_gelu_is_the_exact_gelu():
  x = np.linspace(-10, 10, 20001, dtype=np.float32)
  reference = np.array([v * math.erfc(-v / math.sqrt(2)) / 2 for v in x.astype(np.float64)])
  ours = np.asarray(jax.jit(gelu)(x), np.float64)
  np.testing.assert_allclose(ours, reference, rtol=2e-6, atol=2e-6)
  assert gelu(jnp.ones(3, jnp.bfloat16)).dtype == jnp.bfloat16
