#!/usr/bin/env bash
# Install (if needed), then run the main job end to end on the embedded default (CPU, ~12 minutes):
# tokenize Shakespeare; train a tiny GPT-2 under DeepSpeed from one init three times (AdamW, AdamW
# with another data order, Muon); export them and evaluate the exports with our model and with
# Hugging Face's GPT2LMHeadModel; probe the straight paths between the three (loss, error,
# barriers, spectra, plots). Running it again continues or reuses what is already there.
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$ROOT"
set -x
python prepare.py --config configs/data/shakespeare.yaml
for run in tiny-adamw tiny-muon; do
  python train.py --config "configs/train/$run.yaml" --resume=auto
  python evaluate.py --config configs/eval/tiny.yaml --init_from="out/$run/final" \
    --out_dir="out/$run/evaluate" --overwrite=true
done
# The AdamW spawn partner: same init, another data order.
python train.py --config configs/train/tiny-adamw.yaml --seed.data=1 --out_dir=out/tiny-adamw-data1 --resume=auto
python probe.py --config configs/probe/tiny.yaml
