#!/usr/bin/env bash
# Install (if needed), then run the main job end to end on the embedded default:
# tokenize Shakespeare, then run a tiny GPT-2 on it and check it against Hugging Face's GPT-2.
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$ROOT"
set -x
python prepare.py --config configs/data/shakespeare.yaml
python evaluate.py --config configs/eval/tiny.yaml --overwrite=true
