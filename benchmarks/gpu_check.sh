#!/usr/bin/env bash
# The project's one-shot GPU check, for a machine with an NVIDIA GPU, JAX (with its
# CUDA plugin), PyTorch and timm; no internet needed. In under 8 minutes it:
#   1. installs what is missing: the wheels in .whl/ (benchmarks/gpu_wheels.sh
#      fetches them on a machine with internet), or else from the package index;
#   2. checks that the train step's losses over 10 steps on the GPU equal the CPU's
#      (benchmarks/gpu_losses.py: float32 to 1e-4 relative, bfloat16 to 5e-3);
#   3. times the SplitMask step of S/16, B/16 and L/16 at 224 px in bfloat16 with
#      the PyTorch + timm peer, and B/16 with XLA's attention instead of cuDNN's
#      (benchmarks/throughput.py);
#   4. appends the figures, with the device, date and commit, to
#      benchmarks/RESULTS.md and to $OUT/gpu_check.md.
#
#   SPLITMASK_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_check.sh
#
# The outputs (JSON, logs, the Markdown table) go to $OUT, or benchmarks/gpu_check_out.
# Exit status: that of the loss check, else 0; a step that runs out of its time
# is reported and the others still run.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/gpu_check_out}
mkdir -p "$out"
python=${PYTHON:-python3}
# Smaller settings for a dry run of the script itself on a CPU.
configs=${GPU_CHECK_CONFIGS:-S/16@224,B/16@224,L/16@224}
batch=${GPU_CHECK_BATCH:-256}
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
stamp() { echo "[gpu_check $(date +%T)] $*"; }

stamp "1. packages"
if [ -n "${GPU_CHECK_SKIP_INSTALL:-}" ]; then
  :
elif [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/splitmask_site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/splitmask_site${PYTHONPATH:+:$PYTHONPATH}"
else
  "$python" -m pip install -q -e . || exit 1
fi
# The repository itself, uninstalled: `splitmask_jax` and `benchmarks` import from here.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader ||
  echo "no GPU"; } | tee "$out/device.txt"
"$python" -c "import jax; print('jax', jax.__version__, jax.devices())" | tee -a "$out/device.txt"

stamp "2. losses, GPU against CPU"
timeout 200 "$python" -m benchmarks.gpu_losses --losses_json="$out/gpu_losses.json" 2>&1 |
  grep -v "^I[0-9]\|^W[0-9]" | tee "$out/gpu_losses.txt"
losses_status=${PIPESTATUS[0]}

stamp "3. throughput, bfloat16, with the PyTorch peer"
timeout 270 "$python" -m benchmarks.throughput --configs="$configs" \
  --objectives=splitmask --batch_size="$batch" --dtype=bfloat16 --peer --steps=10 \
  --json="$out/throughput.json" 2>&1 | grep -v "^I[0-9]\|^W[0-9]" | tee "$out/throughput.txt"
timeout 90 "$python" -m benchmarks.throughput --configs="${GPU_CHECK_XLA_CONFIG:-B/16@224}" --objectives=splitmask \
  --batch_size="$batch" --dtype=bfloat16 --attention=xla --steps=10 \
  --json="$out/throughput_xla_attention.json" 2>&1 | grep -v "^I[0-9]\|^W[0-9]" |
  tee "$out/throughput_xla_attention.txt"

stamp "4. RESULTS.md"
"$python" - "$out" <<'PY'
import datetime, json, os, pathlib, sys

out = pathlib.Path(sys.argv[1])
device = (out / "device.txt").read_text().splitlines()[0]
commit = os.environ.get("SPLITMASK_COMMIT", "unknown")
date = datetime.date.today().isoformat()
peak = 989e12  # an H100 / H200 SXM's dense bfloat16 peak, the vendor's figure
lines = [f"\n### GPU check: {device}, {date}, commit {commit}\n",
         "Command: `SPLITMASK_COMMIT=<commit> bash benchmarks/gpu_check.sh`\n"]
losses = out / "gpu_losses.json"
if losses.exists():
  for v in json.loads(losses.read_text())["verdicts"]:
    lines.append(f"- losses over 10 steps, GPU vs CPU, {v['name']}: max relative difference "
                 f"{v['max_rel_diff']:.2e} (bound {v['rtol']:.0e}): {'ok' if v['ok'] else 'FAILED'}")
else:
  lines.append("- losses: no result (see gpu_losses.txt)")
lines += ["", "| config | attention | batch | JAX img/s | TFLOP/s | MFU (measured peak) | "
          "MFU (989 TFLOP/s) | PyTorch img/s | JAX / PyTorch |", "|---|---|---|---|---|---|---|---|---|"]
for name in ("throughput.json", "throughput_xla_attention.json"):
  path = out / name
  if not path.exists():
    lines.append(f"| {name}: no result | | | | | | | | |")
    continue
  for row in json.loads(path.read_text())["steps"]:
    torch = row.get("torch", {}).get("images_per_sec")
    lines.append(
      f"| {row['config']} {row['objective']} | {row.get('attention', 'auto')} | {row['batch_size']} | "
      f"{row['images_per_sec']:.0f} | {row['tflops']:.1f} | {row['mfu']:.1%} | "
      f"{row['tflops'] * 1e12 / peak:.1%} | {torch and f'{torch:.0f}' or '-'} | "
      f"{row.get('jax_over_torch') and format(row['jax_over_torch'], '.2f') or '-'} |")
text = "\n".join(lines) + "\n"
(out / "gpu_check.md").write_text(text)
with open("benchmarks/RESULTS.md", "a") as f:
  f.write(text)
print(text)
PY
stamp "done"
exit "$losses_status"
