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
set -euo pipefail

if [[ $# -lt 2 || -z "${TPU_NAME:-}" || -z "${ZONE:-}" ]]; then
  echo "usage: [SETUP=1] TPU_NAME=NAME ZONE=ZONE $0 CONFIG WORKDIR [--config.key=value ...]" >&2
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
gcloud "${tpu[@]}" ssh "${where[@]}" \
  --command="cd ~/splitmask_jax && python3 -m splitmask_jax.main$args"
