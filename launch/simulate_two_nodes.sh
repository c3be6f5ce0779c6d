#!/usr/bin/env bash
# Two "nodes" on one machine: two DeepSpeed launcher invocations on loopback, in DeepSpeed's
# --no_ssh mode (each node starts its own ranks, as on clusters without passwordless ssh),
# node ranks 0 and 1, one rank each. Extra arguments go to train.py.
#   launch/simulate_two_nodes.sh --config configs/train/tiny-adamw.yaml --out_dir out/two-nodes
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PORT="${MASTER_PORT:-$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
HOSTFILE="$(mktemp)"
trap 'rm -f "$HOSTFILE"' EXIT
printf 'node-0 slots=1\nnode-1 slots=1\n' > "$HOSTFILE"   # the names only count slots here
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
pids=()
for node_rank in 0 1; do
  deepspeed --hostfile "$HOSTFILE" --no_ssh --node_rank "$node_rank" --master_addr 127.0.0.1 \
    --master_port "$PORT" train.py "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
