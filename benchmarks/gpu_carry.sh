#!/usr/bin/env bash
# Build what benchmarks/gpu_check.sh installs on the bare, offline GPU machine (Python 3.12, torch
# with CUDA, transformers, safetensors, tiktoken, scipy, matplotlib; no DeepSpeed, datasets, wandb):
#   .gpu/wheels/  DeepSpeed (pure Python, `pip wheel --no-deps`) and the dependencies it lacks there,
#                 as binary wheels for CPython 3.12 on manylinux x86-64;
#   data/shakespeare/  the prepared embedded corpus (prepare.py), if not there yet.
# Then, from the machine with the device tool:  run benchmarks/gpu_check.sh "$OUT" with
# carry [".gpu", "data/shakespeare"]  (about 4 MiB; the tool's limit is 64 MiB).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source scripts/setup.sh
WHEELS=.gpu/wheels
rm -rf "$WHEELS" && mkdir -p "$WHEELS"
python -m pip wheel --quiet --no-deps --no-build-isolation -w "$WHEELS" "$(grep -v '^#' requirements/deepspeed.txt)"
# DeepSpeed's own requirements that the GPU image lacks (torch, numpy, packaging, tqdm are there), at
# the versions of .venv (the ones the suite tests), as CPython 3.12 wheels.
missing="hjson|msgpack|ninja|py-cpuinfo|psutil|einops|pydantic|pydantic[-_]core|annotated-types|typing[-_]inspection"
missing+="|typing[-_]extensions"
pins=$(python -m pip freeze | grep -iE "^($missing)==")
python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d "$WHEELS" \
  $pins
[ -e data/shakespeare/meta.json ] || python prepare.py --config configs/data/shakespeare.yaml
ls -l "$WHEELS"
du -sh .gpu data/shakespeare
