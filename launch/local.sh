#!/usr/bin/env bash
# Runs one pre-training run as several processes on this machine, exactly as a
# multi-host run would: process 0 hosts the coordinator, every process feeds its
# own devices, CPU collectives go over gloo (TCP). It exercises the multi-host
# code path (sharded input, cross-process collectives and checkpoints) on a
# laptop, each process with a few fake CPU devices.
#
#   launch/local.sh CONFIG WORKDIR [--config.key=value ...]
#   NUM_PROCESSES=2 CPU_DEVICES=2 launch/local.sh configs/fashion_mnist.py:test /tmp/run
#
# Environment:
#   NUM_PROCESSES  processes to start (default 2).
#   CPU_DEVICES    fake CPU devices per process (default 1; sets XLA_FLAGS).
#   PORT           the coordinator's port (default: a free one).
#   PYTHON         the interpreter (default: python3 on the PATH).
# Each process logs to WORKDIR/process_<i>.log; metrics and checkpoints go to
# WORKDIR as for a one-process run; process 0 prepares the dataset while the
# others wait. If one process fails, the others are stopped and the script exits
# with its status.
set -euo pipefail

if [[ $# -lt 2 ]]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d'
  exit 2
fi
config=$1
workdir=$2
shift 2
num_processes=${NUM_PROCESSES:-2}
cpu_devices=${CPU_DEVICES:-1}
python=${PYTHON:-python3}
free_port='import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'
port=${PORT:-$("$python" -c "$free_port")}

mkdir -p "$workdir"
pids=()
for ((i = 0; i < num_processes; i++)); do
  XLA_FLAGS="--xla_force_host_platform_device_count=$cpu_devices" \
    "$python" -m splitmask_jax.main --config="$config" --workdir="$workdir" \
      --coordinator_address="localhost:$port" --num_processes="$num_processes" \
      --process_id="$i" "$@" > "$workdir/process_$i.log" 2>&1 &
  pids+=("$!")
done

status=0
for ((i = 0; i < num_processes; i++)); do
  wait -n "${pids[@]}" || { status=$?; break; }
done
if [[ $status -ne 0 ]]; then
  echo "a process failed; stopping the others (logs: $workdir/process_*.log)" >&2
  kill "${pids[@]}" 2>/dev/null || true
  wait || true
fi
exit $status
