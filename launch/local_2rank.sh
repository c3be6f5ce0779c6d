#!/usr/bin/env bash
# Two ranks on this machine with the DeepSpeed launcher (CPU: gloo; one thread per rank).
#   launch/local_2rank.sh --config configs/train/tiny-adamw.yaml --deepspeed.zero_stage=2
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec deepspeed --num_gpus 2 --master_port "${MASTER_PORT:-29511}" train.py "$@"
