#!/usr/bin/env bash
# Install (if needed), then run the main job end to end on the embedded default (CPU, ~40 minutes on
# 2 cores): the seed study's experiment on Shakespeare (configs/experiments/shakespeare-small.yaml):
# tokenize; train a 4-layer GPT-2 with AdamW and with Muon from 2 inits x 2 data orders; align the
# independent inits; fit a chain between them; probe every pair (loss, error, barriers, spectra,
# group statistics, plots); write reports/shakespeare-small/. Then evaluate the first AdamW and Muon
# runs with our model and with Hugging Face's GPT2LMHeadModel. Run again, it continues where it
# stopped and repeats nothing finished.
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$ROOT"
set -x
python experiment.py --config configs/experiments/shakespeare-small.yaml
for run in adamw-i0-d0 muon-i0-d0; do
  run_dir="out/experiments/shakespeare-small/runs/shakespeare/$run"
  python evaluate.py --config configs/eval/tiny.yaml --init_from="$run_dir/final" --out_dir="$run_dir/evaluate" \
    --overwrite=true
done
