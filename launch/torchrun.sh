#!/usr/bin/env bash
# train.py under torchrun. One node:        launch/torchrun.sh --config configs/train/tiny-adamw.yaml
# Several nodes (run on each, same MASTER_ADDR/PORT):
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 NPROC_PER_NODE=8 launch/torchrun.sh --config ...
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
NPROC_PER_NODE="${NPROC_PER_NODE:-$(python -c 'import torch; print(torch.cuda.device_count() or 2)')}"
if [ "${NNODES:-1}" = 1 ]; then
  exec torchrun --standalone --nproc_per_node "$NPROC_PER_NODE" train.py "$@"
fi
exec torchrun --nnodes "$NNODES" --node_rank "${NODE_RANK:?set NODE_RANK}" --nproc_per_node "$NPROC_PER_NODE" \
  --master_addr "${MASTER_ADDR:?set MASTER_ADDR}" --master_port "${MASTER_PORT:-29500}" train.py "$@"
