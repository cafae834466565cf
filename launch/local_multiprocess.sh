#!/usr/bin/env bash
# Runs N copies of a launcher as one JAX job on this machine (coordinator on localhost).
# usage: launch/local_multiprocess.sh 2 python -m experiments.train --config experiments/configs/unet.py:runlocal --workdir /tmp/w
set -euo pipefail
n=$1; shift
port=${PORT:-12355}
pids=()
for i in $(seq 0 $((n - 1))); do
  JAX_COORDINATOR_ADDRESS=127.0.0.1:$port JAX_NUM_PROCESSES=$n JAX_PROCESS_ID=$i "$@" --multiprocess &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
