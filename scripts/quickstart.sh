#!/usr/bin/env bash
# Install (if needed), then run the main job end to end on the embedded default (CPU, ~3 minutes):
# tokenize Shakespeare, train a tiny GPT-2 with AdamW under DeepSpeed, export it, and evaluate the
# export with our model and with Hugging Face's GPT2LMHeadModel. Running it again continues or
# reuses what is already there.
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$ROOT"
set -x
python prepare.py --config configs/data/shakespeare.yaml
python train.py --config configs/train/tiny-adamw.yaml --resume=auto
python evaluate.py --config configs/eval/tiny.yaml --init_from=out/tiny-adamw/final \
  --out_dir=out/tiny-adamw/evaluate --overwrite=true
