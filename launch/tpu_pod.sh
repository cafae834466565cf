#!/usr/bin/env bash
# Runs a launcher on every worker of a Cloud TPU VM (a pod slice or a single host) as one JAX job.
# usage: launch/tpu_pod.sh TPU_NAME ZONE [PROJECT] -- experiments/LAUNCHER.py [launcher flags]
#   launch/tpu_pod.sh my-v5e-32 us-central2-b -- experiments/robustify.py \
#       --config experiments/configs/robustify.py:brats --config.data.root=/mnt/data/BraTS2021 \
#       --workdir /mnt/shared/runs/robustify
# Every worker needs this repository with its .venv (jax[tpu]) at $REPO (default: the same path as here),
# e.g. once: gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=all --command="git clone ... && ..."
# The data root and the workdir must be on storage every worker sees (a Filestore/NFS or gcsfuse mount).
# jax.distributed.initialize() needs no arguments on TPU VMs: it reads the pod's metadata.
set -euo pipefail
usage() { echo "usage: $0 TPU_NAME ZONE [PROJECT] -- experiments/LAUNCHER.py [flags]" >&2; exit 2; }
[[ $# -ge 4 ]] || usage
name=$1; zone=$2; shift 2
project=()
if [[ $1 != -- ]]; then project=(--project="$1"); shift; fi
[[ ${1:-} == -- ]] || usage
shift
[[ $# -ge 1 ]] || usage
script=$1; shift
mod=$(echo "${script%.py}" | tr / .)
repo=${REPO:-$(pwd)}
command="cd $(printf %q "$repo") && MRI_POISON_MULTIPROCESS=1 .venv/bin/python -m $mod$(printf ' %q' "$@")"
exec gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" "${project[@]}" --worker=all --command="$command"
