"""The planner: target names, real compiles of the train step for a TPU topology and
for H100s on this CPU-only machine, its memory report, its FLOP count, the refusal
of a config too large for its target, and the missing-compiler message."""

import subprocess
import sys

import numpy as np
import pytest

from splitmask_jax import objectives
from splitmask_jax import plan
from splitmask_jax.models import vit
from splitmask_jax.runtime import targets

import helpers

GIB = targets.GIB


@pytest.mark.parametrize(
  "spec,topology,chips,slices",
  [
    ("v5e-16", "v5e:4x4", 16, 1),
    ("v5litepod-16", "v5e:4x4", 16, 1),
    ("v5p-128", "v5:4x4x4", 64, 1),
    ("v4-8", "v4:2x2x1", 4, 1),
    ("v6e-256", "v6e:16x16", 256, 1),
    ("v5e:2x4", "v5e:2x4", 8, 1),
    ("v5p:2x2x2", "v5:2x2x2", 8, 1),
    ("2xv5e-256", "v5e:16x16", 512, 2),
    ("h100", "1x1", 1, 1),
    ("h100-8", "1x8", 8, 1),
    ("H100-16", "2x8", 16, 1),
    ("h200:4x8", "4x8", 32, 1),
  ],
)
def test_target_names(spec, topology, chips, slices):
  target = targets.parse_target(spec)
  assert (target.topology, target.num_chips, target.num_slices) == (topology, chips, slices)


@pytest.mark.parametrize(
  "spec,message",
  [
    ("v5e-12", r"v5e slices come in sizes \[1, 4, 8"),
    ("v4-7", "v4 slices come in sizes"),
    ("v5e:2x2x2", "a v5e topology has 2 dimensions"),
    ("h100-12", "12 GPUs do not fill hosts of 8"),
    ("2xh100-8", "slices .* are a TPU notion"),
    ("a100-8", "Unknown target 'a100-8': expected a TPU slice"),
  ],
)
def test_bad_target_names_say_what_is_allowed(spec, message):
  with pytest.raises(targets.TargetError, match=message):
    targets.parse_target(spec)


def test_missing_compiler_says_what_to_install(monkeypatch):
  monkeypatch.setattr(targets, "_missing", lambda module: True)
  with pytest.raises(targets.TargetError, match=r"needs libtpu.*pip install -e '.\[plan\]'"):
    targets.devices(targets.parse_target("v5e-4"))
  with pytest.raises(targets.TargetError, match=r"CUDA compiler plugin.*'.\[plan\]'"):
    targets.devices(targets.parse_target("h100"))


def _config(**overrides):
  config = helpers.load_config("test")
  config.model.scan = True
  config.update_from_flattened_dict(overrides)
  return config


def _analytic_splitmask_flops(config) -> float:
  """Training FLOPs of the tiny SplitMask step from its matmuls (3x forward, 2 per MAC)."""
  arch, patch = vit.parse_variant(config.model.variant)
  d, mlp, depth = arch["width"], arch["mlp_dim"], arch["depth"]
  grid = config.model.image_size // patch
  n_all = grid * grid
  n_seen = n_all - int(round(objectives.mask_ratio(config) * n_all))
  b2 = 2 * config.batch_size  # both branches
  pixels = patch * patch * config.model.num_channels

  def blocks(tokens, count):
    per_token = 4 * d * d + 2 * d * mlp  # qkv, proj, fc1, fc2
    attention = 2 * tokens * d  # scores and weighted sum
    return count * b2 * tokens * (per_token + attention)

  tokenizer = 2 * config.batch_size * n_all * pixels * config.tokenizer.vocab_size  # no backward
  forward = (
    b2 * n_seen * pixels * d  # patch embedding
    + blocks(n_seen, depth)
    + b2 * n_seen * d * d  # decoder input projection
    + blocks(n_all, config.model.decoder_depth)
    + b2 * (n_all - n_seen) * d * config.tokenizer.vocab_size  # vocabulary head
  )
  return 2 * (3 * forward + tokenizer)


@pytest.mark.slow
def test_tpu_compile_reports_memory_and_counts_scanned_flops():
  compiled = []
  result = plan.plan(
    _config(),
    "v5e:2x2",
    search_compiles=0,
    on_compiled=compiled.append,
  )
  assert compiled and result.target.num_chips == 4 and result.per_chip_batch == 4
  assert result.fits and result.train.total <= result.capacity
  # The state is replicated over the 4 data-parallel chips: each holds all of it.
  num_params = result.num_params
  assert result.params_bytes == 4 * num_params
  assert 2 * result.params_bytes <= result.opt_state_bytes <= 2 * result.params_bytes + 64
  assert result.train.state >= result.params_bytes + result.opt_state_bytes
  assert result.train.batch == 4 * 32 * 32 * 1 + sum(
    4 * np.asarray(v).nbytes for v in _mask_example(result).values()
  )
  assert (
    result.train.total >= result.train.state + result.train.batch + result.train.temporaries - 1
  )
  assert result.eval is not None and result.eval.total < result.train.total
  assert "splitmask Test/8 at 32 px, float32, vocabulary 64," in result.config_summary
  report = result.report()
  for text in ("Memory per chip", "temporaries", "fits", "FLOPs per step", "chip-hours", "40%"):
    assert text in report
  hours = result.step_seconds(0.5) * result.total_steps / 3600
  assert f"{hours:16.1f}" in report


def test_flop_count_is_the_whole_model_with_scanned_blocks():
  """Six scanned blocks count six times (XLA's analysis of a scan counts its body
  once): the count is the model's matmuls plus the few per cent that norms,
  softmax, GELU and the optimizer add."""
  config = _config(**{"model.variant": "Mini/8", "tokenizer.vocab_size": 512})
  flops = plan.count_flops(config)
  expected = _analytic_splitmask_flops(config)
  assert expected <= flops <= 1.12 * expected, (flops, expected)
  config.model.scan = False
  assert plan.count_flops(config) == flops


def _mask_example(result):
  config = _config()
  from splitmask_jax import objectives  # pylint: disable=import-outside-toplevel

  return objectives.make_mask_fn(config, (4, 4))(np.random.default_rng(0))


@pytest.mark.slow
def test_too_large_a_batch_is_refused_with_what_would_fit():
  """A per-chip batch beyond what JAX may take of an H100: exit status 3, the total,
  the capacity, what would make it fit and the largest batch that fitted."""
  cmd = [
    sys.executable,
    "-m",
    "splitmask_jax.plan",
    f"--config={helpers.CONFIG_FILE}:test",
    "--target=h100-8",
    "--config.batch_size=262144",
    "--config.tokenizer.vocab_size=8192",
    "--search_compiles=1",
  ]
  result = subprocess.run(cmd, capture_output=True, text=True, cwd=helpers.ROOT, timeout=600)
  assert result.returncode == plan.EXIT_DOES_NOT_FIT, result.stderr[-3000:]
  assert "fits                             NO" in result.stdout
  message = result.stderr
  total = float(message.split("the train step needs ")[1].split(" GiB")[0])
  assert total > 59.33
  assert "one h100 chip has 59.33 GiB for JAX by default" in message
  assert "a per-chip batch of at most 16384, now 32768 (--config.batch_size=131072" in message
  assert "--config.model.remat=full" in message
  assert "XLA_PYTHON_CLIENT_MEM_FRACTION" in message


def test_largest_batch_search_brackets_the_capacity():
  """On a made-up affine memory, the search lands within 2% of the exact answer."""
  capacity, fixed, per_image = 16 * GIB, 2 * GIB, 3 * 2**20

  def measure(batch):
    total = fixed + per_image * batch
    return plan.Memory(fixed, 0, total - fixed, total, 0.0)

  best, refused, note = plan.largest_batch(measure, {64: measure(64)}, capacity, max_compiles=6)
  exact = (capacity - fixed) // per_image
  assert 0.98 * exact <= best <= exact < refused, (best, exact, note)
  too_big = plan.Memory(0, 0, 0, 2 * capacity, 0.0, out_of_memory=True)
  best, _, _ = plan.largest_batch(measure, {100_000: too_big}, capacity, max_compiles=8)
  assert 0.9 * exact <= best <= exact
  # Out of compiles before anything fitted: unknown, not "nothing fits".
  best, refused, note = plan.largest_batch(measure, {100_000: too_big}, capacity, max_compiles=1)
  assert (best, refused) == (None, 50_000) and "none fitted in 1 more compiles" in note


@pytest.mark.slow
def test_h100_compile_uses_cudnn_fused_attention_in_bfloat16():
  texts = []
  result = plan.plan(
    _config(**{"model.dtype": "bfloat16"}),
    "h100-8",
    search_compiles=0,
    compile_eval=False,
    on_compiled=lambda compiled: texts.append(compiled.as_text()),
  )
  assert result.target.chip.name == "h100" and result.capacity == int(0.75 * 84_942_979_072)
  assert "__cudnn$fmha" in texts[0]
  texts.clear()
  plan.plan(
    _config(**{"model.dtype": "bfloat16", "model.attention": "xla"}),
    "h100-8",
    search_compiles=0,
    compile_eval=False,
    on_compiled=lambda compiled: texts.append(compiled.as_text()),
  )
  assert "__cudnn$fmha" not in texts[0]
