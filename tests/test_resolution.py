"""Fine-tuning and probing at another image size than pre-training (BEiT's 224 -> 384 px):
the position embeddings' bicubic resampling, the runs end to end, resume, and timm."""

import contextlib
import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from splitmask_jax import config_base
from splitmask_jax import export
from splitmask_jax import finetune
from splitmask_jax import probe
from splitmask_jax.models import vit
from splitmask_jax.runtime import checkpointing
from splitmask_jax.runtime import metric_log

from helpers import FINETUNE_CONFIG_FILE
from helpers import crash_after_saving
from helpers import load_config

# Test/8 (width 32, 2 blocks): pre-trained on a 4x4 grid, fine-tuned on a 6x6 one.
SMALL, LARGE = 32, 48
RESAMPLED_LINE = (
  "Position embeddings resampled from 4x4 to 6x6 patches (bicubic): "
  "pre-trained at 32 px, {task} at 48 px"
)


@contextlib.contextmanager
def _absl_messages():
  """The messages absl.logging emits inside the block (INFO and above), as a list."""
  messages = []
  handler = logging.Handler(logging.INFO)
  handler.emit = lambda record: messages.append(record.getMessage())
  logger = logging.getLogger("absl")
  level = logger.level
  logger.addHandler(handler)
  logger.setLevel(logging.INFO)
  try:
    yield messages
  finally:
    logger.removeHandler(handler)
    logger.setLevel(level)


def _downstream_config(arg, pretrained_run, fake_dir, **overrides):
  workdir, data_dir = pretrained_run
  config = load_config(arg, FINETUNE_CONFIG_FILE)
  config.data.manual_dir = str(fake_dir)
  config.data.data_dir = str(data_dir)
  config.init.workdir = str(workdir)
  config.update_from_flattened_dict(overrides)
  return config


@pytest.fixture(scope="module")
def finetuned_run(pretrained_run, fake_fashion_mnist, tmp_path_factory):
  """The 32 px run fine-tuned at 48 px for 4 steps, interrupted after saving step 2
  and resumed: {'workdir', 'config', 'initial_params' (the state of the first step),
  'first_log', 'resumed_log' (absl messages of each attempt), 'result'}."""
  workdir = tmp_path_factory.mktemp("finetuned") / "run"
  # The augmentations read any size alike (test_finetune runs them); off, two
  # runs compile a few seconds faster.
  config = _downstream_config(
    "test",
    pretrained_run,
    fake_fashion_mnist,
    **{
      "model.image_size": LARGE,
      "augment.randaugment_ops": 0,
      "augment.mixup": 0.0,
      "augment.cutmix": 0.0,
    },
  )
  initial = []
  init_state = finetune.init_classifier_state

  def keep_initial_state(*args, **kwargs):
    state = init_state(*args, **kwargs)
    initial.append(jax.device_get(state.params))
    return state

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(finetune, "init_classifier_state", keep_initial_state)
    crash_after_saving(patch, 2)
    with _absl_messages() as first_log, pytest.raises(RuntimeError, match="simulated crash"):
      finetune.finetune_and_evaluate(config, str(workdir))
  with _absl_messages() as resumed_log:
    result = finetune.finetune_and_evaluate(config, str(workdir))
  return dict(
    workdir=workdir,
    config=config,
    initial_params=initial[0],
    first_log=first_log,
    resumed_log=resumed_log,
    result=result,
  )


# --- the resampling ---------------------------------------------------------------------


def _pil_bicubic(pos, old_grid, grid):
  """An independent reference: Pillow's bicubic resize of each channel as a float image
  (Keys' a = -0.5, half-pixel centres, weights renormalised at the borders, widened
  when shrinking), in its own C implementation."""
  channels = np.asarray(pos, np.float32).reshape(*old_grid, -1)
  resized = [
    np.asarray(
      Image.fromarray(channels[..., c], mode="F").resize(grid[::-1], Image.Resampling.BICUBIC)
    )
    for c in range(channels.shape[-1])
  ]
  return np.stack(resized, -1).reshape(1, grid[0] * grid[1], -1)


def _smooth_embedding(side, d=4):
  """A smooth function of the position sampled at the centres of a side x side grid
  over the unit square (the half-pixel convention): [1, side*side, d] float32."""
  centres = (np.arange(side) + 0.5) / side
  y, x = np.meshgrid(centres, centres, indexing="ij")
  k = np.arange(1, d + 1)[:, None, None]
  values = np.sin(2 * y + x + k) + 0.5 * np.cos(3 * x - k * y)
  return values.transpose(1, 2, 0).reshape(1, side * side, d).astype(np.float32)


def test_resampling_to_the_same_grid_is_the_identity():
  pos = np.random.default_rng(0).standard_normal((1, 16, 8)).astype(np.float32)
  assert vit.resample_pos_embedding(pos, (4, 4)) is pos
  same = vit.resample_pos_embedding(pos, (4, 4), old_grid=(4, 4))
  assert same.dtype == pos.dtype and np.array_equal(same, pos)


@pytest.mark.parametrize(
  "old_grid, grid", [((4, 4), (6, 6)), ((5, 5), (8, 8)), ((8, 8), (5, 5)), ((3, 5), (6, 4))]
)
def test_resampling_matches_pillows_bicubic(old_grid, grid):
  """Up, down (antialiased) and non-square grids, channel by channel."""
  rng = np.random.default_rng(sum(old_grid + grid))
  pos = rng.standard_normal((1, old_grid[0] * old_grid[1], 5)).astype(np.float32)
  resampled = vit.resample_pos_embedding(pos, grid, old_grid=old_grid)
  assert resampled.shape == (1, grid[0] * grid[1], 5) and resampled.dtype == np.float32
  np.testing.assert_allclose(resampled, _pil_bicubic(pos, old_grid, grid), rtol=1e-5, atol=1e-6)


def test_resampling_a_smooth_function_converges_at_third_order():
  """A smooth function sampled on a grid, resampled to a finer one, matches the function
  sampled on the finer grid; away from the borders (where the kernel is cut and
  renormalised) the error falls 8x when the spacing halves, as a cubic's should."""

  def error(old, new):
    got = vit.resample_pos_embedding(_smooth_embedding(old), (new, new)).reshape(new, new, -1)
    err = np.abs(got - _smooth_embedding(new).reshape(new, new, -1))
    m = new // 6
    return err.max(), err[m:-m, m:-m].max()

  coarse_all, coarse_interior = error(8, 12)
  fine_all, fine_interior = error(16, 24)
  assert fine_interior < 5e-4 and fine_all < 0.03  # measured 1.8e-4 and 0.022
  assert coarse_interior / fine_interior > 6  # measured 8.0
  assert coarse_all / fine_all > 1.5  # the borders: first order, measured 1.9


def test_resampling_keeps_the_dtype_and_checks_shapes():
  pos = jnp.ones((1, 16, 4), jnp.bfloat16)
  resampled = vit.resample_pos_embedding(pos, (6, 6))
  assert resampled.dtype == jnp.bfloat16 and resampled.shape == (1, 36, 4)
  np.testing.assert_array_equal(resampled.astype(np.float32), 1.0)  # weights sum to 1
  with pytest.raises(ValueError, match=r"12 positions, not a square grid: pass old_grid"):
    vit.resample_pos_embedding(np.zeros((1, 12, 4)), (4, 4))
  with pytest.raises(ValueError, match=r"12 positions, not old_grid=\(4, 4\)"):
    vit.resample_pos_embedding(np.zeros((1, 12, 4)), (4, 4), old_grid=(4, 4))
  with pytest.raises(ValueError, match=r"must be \[1, N, D\]"):
    vit.resample_pos_embedding(np.zeros((16, 4)), (4, 4))


def test_resampling_against_torch_and_timm():
  """timm's resample_abs_pos_embed at its defaults (which timm applies when it loads
  weights at another img_size) is the same interpolation; BEiT's and MAE's
  F.interpolate(bicubic, align_corners=False) (a = -0.75, repeated borders) is a
  slightly sharper one."""
  torch = pytest.importorskip("torch")
  timm = pytest.importorskip("timm")
  pos = _smooth_embedding(14, d=16)  # a ViT-B/16 grid at 224 px -> 384 px
  ours = vit.resample_pos_embedding(pos, (24, 24))
  theirs = timm.layers.resample_abs_pos_embed(
    torch.from_numpy(pos), (24, 24), num_prefix_tokens=0
  ).numpy()
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=2e-6)  # measured 4.8e-7
  grid = torch.from_numpy(pos).reshape(1, 14, 14, -1).permute(0, 3, 1, 2)
  beit = torch.nn.functional.interpolate(grid, size=(24, 24), mode="bicubic", align_corners=False)
  beit = beit.permute(0, 2, 3, 1).reshape(1, 576, -1).numpy()
  rms = np.sqrt(np.mean(np.square(ours - beit))) / pos.std()
  assert 1e-4 < rms < 0.03, rms  # measured 1.4% of the embeddings' std
  assert np.abs(ours - beit).max() < 0.06  # measured 0.037, the std being 0.76


# --- loading and the config checks -----------------------------------------------------


@pytest.mark.parametrize("saved_scanned, model_scanned", [(True, False), (False, True)])
def test_a_larger_encoder_loads_from_either_block_layout(saved_scanned, model_scanned):
  """Only pos_embedding changes (it lies outside the scanned blocks); the rest is copied
  bit for bit."""
  config = load_config("test", FINETUNE_CONFIG_FILE)
  config.model.image_size = LARGE
  config.model.scan = model_scanned
  model = finetune.build_classifier(config, 10)
  variables = jax.device_get(jax.jit(finetune.classifier_init_fn(model, config))(jax.random.key(0)))
  encoder = vit.Encoder(
    **vit.VARIANTS["Test"], patch_size=8, grid=(4, 4), use_mask_token=True, scan=saved_scanned
  )
  images = jnp.zeros((1, SMALL, SMALL, 1))
  encoder_params = jax.jit(lambda key: encoder.init(key, images, train=False))(jax.random.key(5))
  pretrained = jax.device_get({"params": {"encoder": encoder_params["params"]}})
  with _absl_messages() as messages:
    adapted = finetune.adapt_to_image_size(pretrained, config)
  assert messages == [RESAMPLED_LINE.format(task="fine-tuning")]
  loaded = finetune.load_pretrained_encoder(variables, adapted)["params"]["encoder"]
  saved = pretrained["params"]["encoder"]
  np.testing.assert_array_equal(
    loaded["pos_embedding"], vit.resample_pos_embedding(saved["pos_embedding"], (6, 6))
  )
  saved = vit.match_block_layout(saved, loaded)
  for name in set(loaded) - {"pos_embedding"}:
    assert jax.tree.all(jax.tree.map(np.array_equal, loaded[name], saved[name])), name
  # Without the resampling, the loader names the parameter that does not fit.
  with pytest.raises(ValueError, match=r"pos_embedding: checkpoint \(1, 16, 32\) vs model"):
    finetune.load_pretrained_encoder(variables, pretrained)
  # At the pre-training size nothing changes, and nothing is logged.
  config.model.image_size = SMALL
  with _absl_messages() as messages:
    assert finetune.adapt_to_image_size(pretrained, config) is pretrained
  assert not any("resampled" in m for m in messages)


def test_an_image_size_off_the_patch_grid_is_refused_by_the_config_check():
  config = load_config("test", FINETUNE_CONFIG_FILE)
  config.model.image_size = 44
  with pytest.raises(
    ValueError,
    match=r"config.model.image_size=44 is invalid: it must be a positive multiple of the "
    r"patch size 8 of model.variant='Test/8' \(e.g. 40 or 48\)",
  ):
    config_base.validate_config(config)


@pytest.mark.parametrize(
  "overrides, message",
  [
    (
      {"model.variant": "Test/16"},
      r"config.model.variant='Test/16' does not match the run in config.init.workdir=.*, "
      r"which has model.variant='Test/8': set config.model.variant='Test/8'. The encoder's "
      r"size and patch size are the pre-training run's; model.image_size may differ from "
      r"its 32 px \(a multiple of the patch size 8\)",
    ),
    (
      {"model.num_channels": 3},
      r"config.model.num_channels=3 does not match .* set config.model.num_channels=1.$",
    ),
  ],
)
def test_another_patch_size_or_channel_count_fails_before_any_work(
  pretrained_run, tmp_path, overrides, message
):
  config = _downstream_config(
    "test", pretrained_run, "/nonexistent", **{"model.image_size": LARGE, **overrides}
  )
  config.data.data_dir = str(tmp_path / "nothing")
  with pytest.raises(ValueError, match=message):
    finetune.finetune_and_evaluate(config, str(tmp_path / "ft"))
  config.task = "probe"
  with pytest.raises(ValueError, match=message):
    probe.probe_blocks(config, str(tmp_path / "probe"))
  assert not (tmp_path / "ft").exists() and not (tmp_path / "probe").exists()
  assert not (tmp_path / "nothing").exists()  # no data read


# --- end to end -------------------------------------------------------------------------


@pytest.mark.slow
def test_finetuning_at_a_larger_size_starts_from_the_resampled_encoder(
  finetuned_run, pretrained_run
):
  workdir, _ = pretrained_run
  saved, _ = checkpointing.load_params(str(workdir))
  saved = saved["params"]["encoder"]
  initial = finetuned_run["initial_params"]["params"]["encoder"]
  np.testing.assert_array_equal(
    initial["pos_embedding"], vit.resample_pos_embedding(saved["pos_embedding"], (6, 6))
  )
  assert initial["pos_embedding"].shape == (1, 36, 32)
  # Everything else is the pre-trained encoder, bit for bit.
  assert set(initial) == set(saved) - {"mask_token"}
  for path, leaf in jax.tree_util.tree_flatten_with_path(initial)[0]:
    if path[0].key == "pos_embedding":
      continue
    source = saved
    for key in path:
      source = source[key.key]
    assert leaf.dtype == source.dtype and np.array_equal(leaf, source), path
  assert finetuned_run["first_log"].count(RESAMPLED_LINE.format(task="fine-tuning")) == 1


def test_a_resumed_run_restores_its_own_embeddings(finetuned_run):
  """The resumption reads its step-2 checkpoint, whose embeddings are already on the
  6x6 grid: nothing is resampled (or compared with the init run's image size) again."""
  resumed_log = finetuned_run["resumed_log"]
  assert any(m.startswith("Resumed from step 2") for m in resumed_log), resumed_log
  assert not any("resampled" in m for m in resumed_log)
  workdir = finetuned_run["workdir"]
  records = metric_log.read_metrics(str(workdir))
  assert [r["step"] for r in records if "loss" in r] == [2, 4]
  assert np.isfinite([r["loss"] for r in records if "loss" in r]).all()
  assert 0.0 <= finetuned_run["result"]["test_top1"] <= 1.0
  assert json.loads((workdir / "final_metrics.json").read_text())["step"] == 4
  tuned, step = checkpointing.load_params(str(workdir))
  assert step == 4
  assert tuned["params"]["encoder"]["pos_embedding"].shape == (1, 36, 32)
  # Trained on from the resampled embeddings.
  assert not np.array_equal(
    tuned["params"]["encoder"]["pos_embedding"],
    finetuned_run["initial_params"]["params"]["encoder"]["pos_embedding"],
  )


def test_probing_at_a_larger_size(pretrained_run, fake_fashion_mnist, tmp_path):
  config = _downstream_config(
    "probe,test",
    pretrained_run,
    fake_fashion_mnist,
    **{"model.image_size": LARGE, "probe.random_init_baseline": False},
  )
  with _absl_messages() as messages:
    values = probe.probe_blocks(config, str(tmp_path / "probe"))
  assert messages.count(RESAMPLED_LINE.format(task="probing")) == 1
  assert sorted(values) == ["probe_top1_pretrained_block_1", "probe_top1_pretrained_block_2"]
  assert all(0.0 <= v <= 1.0 for v in values.values())


def test_export_loads_in_timm_at_the_new_size(finetuned_run, tmp_path):
  """timm builds the 48 px classifier from the exported folder and gives the same logits."""
  workdir, config = finetuned_run["workdir"], finetuned_run["config"]
  export.export(str(workdir), str(tmp_path / "exported"))
  written = json.loads((tmp_path / "exported" / "config.json").read_text())
  assert written["model_args"]["img_size"] == LARGE
  assert written["pretrained_cfg"]["input_size"] == [1, LARGE, LARGE]

  torch = pytest.importorskip("torch")
  timm = pytest.importorskip("timm")
  from safetensors.torch import load_file  # pylint: disable=import-outside-toplevel

  by_hand = timm.create_model(
    export.ARCHITECTURE,
    pretrained=False,
    **dict(written["model_args"], img_size=LARGE),
  ).eval()
  by_hand.load_state_dict(load_file(str(tmp_path / "exported" / "model.safetensors")))
  from_folder = timm.create_model(f"local-dir:{tmp_path / 'exported'}", pretrained=True).eval()
  assert tuple(from_folder.patch_embed.grid_size) == (6, 6)

  variables, _ = checkpointing.load_params(str(workdir))
  classifier = finetune.build_classifier(config, num_classes=10)
  images = np.random.default_rng(4).uniform(-1, 1, (3, LARGE, LARGE, 1)).astype(np.float32)
  expected = classifier.apply(variables, images, train=False)
  with torch.no_grad():
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    for model in (by_hand, from_folder):
      np.testing.assert_allclose(model(x).numpy(), expected, rtol=1e-5, atol=1e-5)


def test_timm_resamples_a_pretrained_export_as_finetuning_does(pretrained_run, tmp_path):
  """timm loading the 32 px pre-trained encoder at img_size=48 makes the embeddings
  that fine-tuning at 48 px starts from."""
  workdir, _ = pretrained_run
  export.export(str(workdir), str(tmp_path / "exported"))
  torch = pytest.importorskip("torch")
  timm = pytest.importorskip("timm")
  model = timm.create_model(f"local-dir:{tmp_path / 'exported'}", pretrained=True, img_size=LARGE)
  saved, _ = checkpointing.load_params(str(workdir))
  with torch.no_grad():
    timm_pos = model.pos_embed.numpy()
  np.testing.assert_allclose(
    timm_pos,
    vit.resample_pos_embedding(saved["params"]["encoder"]["pos_embedding"], (6, 6)),
    rtol=0,
    atol=1e-6,
  )
