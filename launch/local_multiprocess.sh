#!/usr/bin/env bash
# Runs N copies of a command as ONE JAX job on this machine: N processes, one CPU device each, the coordinator
# bound to 127.0.0.1 only. For testing multi-process code paths without a cluster.
# usage: launch/local_multiprocess.sh N COMMAND...
#   launch/local_multiprocess.sh 2 python -m experiments.train --config experiments/configs/unet.py:runlocal \
#       --workdir /tmp/unet_2proc
# env: PORT (default: a free port), XLA_FLAGS (default: 1 CPU device per process), JAX_PLATFORMS (default cpu).
# Each process gets JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT, JAX_NUM_PROCESSES=N, JAX_PROCESS_ID=i and
# MRI_POISON_MULTIPROCESS=1; launch_utils.init_processes passes them to jax.distributed.initialize (jax itself
# reads only the address). Process 0's output goes to the terminal, process i's to $LOGDIR/process_i.log
# (LOGDIR default: a new temporary folder). If one process fails, the others are stopped.
set -euo pipefail
if [[ $# -lt 2 || ! $1 =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 N COMMAND... (N processes of COMMAND on this machine)" >&2
  exit 2
fi
n=$1; shift
port=${PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
logdir=${LOGDIR:-$(mktemp -d -t mri_poison_procs.XXXXXX)}
mkdir -p "$logdir"
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
export XLA_FLAGS=${XLA_FLAGS:---xla_force_host_platform_device_count=1}
pids=()
stop_all() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap 'stop_all; exit 130' INT TERM
for i in $(seq 0 $((n - 1))); do
  env JAX_COORDINATOR_ADDRESS="127.0.0.1:$port" JAX_NUM_PROCESSES="$n" JAX_PROCESS_ID="$i" \
      MRI_POISON_MULTIPROCESS=1 "$@" > >(if [[ $i == 0 ]]; then cat; else cat > "$logdir/process_$i.log"; fi) 2>&1 &
  pids+=($!)
done
echo "local_multiprocess: $n processes, coordinator 127.0.0.1:$port, logs of processes 1.. in $logdir" >&2
rc=0
for p in "${pids[@]}"; do
  if ! wait "$p"; then rc=1; stop_all; fi
done
exit $rc
