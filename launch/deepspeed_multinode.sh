#!/usr/bin/env bash
# Multi-node training with the DeepSpeed launcher.
#
# With passwordless ssh from this node to every node of the hostfile (DeepSpeed runs pdsh):
#   HOSTFILE=launch/hostfile.example launch/deepspeed_multinode.sh --config configs/train/gpt2-adamw.yaml
#
# Without ssh: run this script on every node, each with its NODE_RANK, all with the same
# MASTER_ADDR (node 0) and MASTER_PORT:
#   NO_SSH=1 NODE_RANK=0 MASTER_ADDR=gpu-node-01 launch/deepspeed_multinode.sh --config ...   # on node 0
#   NO_SSH=1 NODE_RANK=1 MASTER_ADDR=gpu-node-01 launch/deepspeed_multinode.sh --config ...   # on node 1
# out_dir must be on a filesystem every node sees (checkpoints are written by all ranks).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
args=(--hostfile "${HOSTFILE:-launch/hostfile.example}" --master_port "${MASTER_PORT:-29500}")
if [ -n "${NO_SSH:-}" ]; then
  args+=(--no_ssh --node_rank "${NODE_RANK:?set NODE_RANK}" --master_addr "${MASTER_ADDR:?set MASTER_ADDR}")
fi
exec deepspeed "${args[@]}" train.py "$@"
