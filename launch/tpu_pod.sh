#!/usr/bin/env bash
# Pre-trains on every worker (host) of a Cloud TPU VM pod slice, from a machine
# with the gcloud CLI.
#
#   TPU_NAME=my-v4-64 ZONE=us-central2-b launch/tpu_pod.sh CONFIG WORKDIR [--config.key=value ...]
#   SETUP=1 TPU_NAME=my-v4-64 ZONE=us-central2-b launch/tpu_pod.sh configs/imagenet.py \
#       gs://my-bucket/runs/splitmask_b16 --config.mesh.fsdp=4
#
# The same command runs on all workers (gcloud ... ssh --worker=all). On a TPU
# VM, JAX finds the pod's workers, the coordinator (worker 0) and this worker's
# index in the VM's metadata (splitmask_jax/runtime/distributed.py), so no flags are needed.
# SETUP=1 first copies this checkout to ~/splitmask_jax on every worker and
# installs it with jax[tpu] and gcsfs.
#
# WORKDIR and the dataset (config.data.data_dir) must be paths every worker sees:
# a bucket (gs://...) or a Filestore/NFS share. Prepare the dataset before the first
# run (python -m splitmask_jax.data --dataset=NAME --data_dir=...). Running again
# with the same WORKDIR resumes the run. Plan the run first, from any machine:
# python -m splitmask_jax.plan --config=CONFIG --target=v4-64.
#
# Preemption: a SIGTERM makes the run save its current step and exit with
# status 42 on every worker; the script then starts the command again on all
# workers, which resumes from that step, at most MAX_RESTARTS times (default 20;
# 0: never). Status 0 ends the script; any other status (an error, a failed
# ssh) ends it with that status. This covers a SIGTERM after which the VMs stay
# up (a maintenance notice that leaves them running, a `kill -TERM` to save and
# restart). It does not cover VMs that go away: a spot or preemptible TPU that
# is preempted is deleted, and a maintenance event may restart the VMs; the
# next attempt then fails to connect and the script stops. Recreate the TPU
# (then SETUP=1) or wait until it is READY, and run the script again with the
# same WORKDIR to resume.
set -euo pipefail

if [[ $# -lt 2 || -z "${TPU_NAME:-}" || -z "${ZONE:-}" ]]; then
  echo "usage: [SETUP=1] [MAX_RESTARTS=N] TPU_NAME=NAME ZONE=ZONE $0 CONFIG WORKDIR" \
    "[--config.key=value ...]" >&2
  exit 2
fi
config=$1
workdir=$2
shift 2
tpu=(compute tpus tpu-vm)
where=("$TPU_NAME" --zone="$ZONE" --worker=all)

if [[ "${SETUP:-0}" == 1 ]]; then
  repo=$(cd "$(dirname "$0")/.." && pwd)
  gcloud "${tpu[@]}" ssh "${where[@]}" --command="rm -rf ~/splitmask_jax"
  gcloud "${tpu[@]}" scp --recurse "$repo" "${where[0]}:~/splitmask_jax" "${where[@]:1}"
  gcloud "${tpu[@]}" ssh "${where[@]}" \
    --command="cd ~/splitmask_jax && pip install -e '.[gcs]' 'jax[tpu]'"
fi

# printf %q quotes every argument for the remote shell.
args=$(printf ' %q' --config="$config" --workdir="$workdir" "$@")
# The run's status when it saved its step and stopped at a SIGTERM
# (splitmask_jax/runtime/preemption.py).
preempted=42
max_restarts=${MAX_RESTARTS:-20}
# The loop runs here rather than on each worker: all workers must start again
# together (worker 0 hosts the coordinator), and gcloud returns only once the
# command has ended on every worker, with the status of the first worker, in
# worker order, whose status is not 0 (so a later worker's error beside a 42 is
# restarted too: MAX_RESTARTS bounds an error that comes back every time).
for ((restarts = 0; ; restarts++)); do
  status=0
  gcloud "${tpu[@]}" ssh "${where[@]}" \
    --command="cd ~/splitmask_jax && python3 -m splitmask_jax.main$args" || status=$?
  if [[ $status -ne $preempted ]]; then
    exit "$status"
  fi
  if ((restarts >= max_restarts)); then
    echo "Stopped again after $restarts restarts (MAX_RESTARTS=$max_restarts): the state is" \
      "saved; run the script again with the same WORKDIR to resume." >&2
    exit "$preempted"
  fi
  echo "The run saved its state and stopped: starting it again" \
    "(restart $((restarts + 1)) of at most $max_restarts)." >&2
done
