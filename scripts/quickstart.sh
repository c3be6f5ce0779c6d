#!/usr/bin/env bash
# Install (if needed), then run the main job end to end on the embedded default (CPU, ~5 minutes):
# tokenize Shakespeare, train a tiny GPT-2 with AdamW and with Muon from the same init under
# DeepSpeed, export both, and evaluate the exports with our model and with Hugging Face's
# GPT2LMHeadModel. Running it again continues or reuses what is already there.
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$ROOT"
set -x
python prepare.py --config configs/data/shakespeare.yaml
for run in tiny-adamw tiny-muon; do
  python train.py --config "configs/train/$run.yaml" --resume=auto
  python evaluate.py --config configs/eval/tiny.yaml --init_from="out/$run/final" \
    --out_dir="out/$run/evaluate" --overwrite=true
done
