#!/usr/bin/env bash
# The GPU validation, one prepared run (see benchmarks/gpu_check.py for what it measures):
#   bash benchmarks/gpu_check.sh OUT_DIR               # on the GPU machine, ~8 min
#   bash benchmarks/gpu_check.sh OUT_DIR --cpu-smoke   # tiny on the CPU (the suite's test of this script)
# On a bare machine it first installs, offline, what benchmarks/gpu_carry.sh put in .gpu/wheels, into
# a venv that sees the machine's own torch (--system-site-packages); the project itself runs from this
# checkout (PYTHONPATH), against that torch, with nothing of its own installed (no --deps to resolve).
# Where modeconn and DeepSpeed import already (this repository's .venv), it installs nothing.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:?usage: gpu_check.sh OUT_DIR [--cpu-smoke]}"
shift
cd "$ROOT"
PY="${PYTHON:-python3}"
if ! "$PY" -c "import deepspeed, modeconn" 2>/dev/null; then
  VENV="${MODECONN_GPU_VENV:-/tmp/modeconn-gpu}"
  [ -x "$VENV/bin/python" ] || "$PY" -m venv --system-site-packages "$VENV"
  "$VENV/bin/python" -m pip install --quiet --no-index --find-links .gpu/wheels --no-deps .gpu/wheels/*.whl
  PY="$VENV/bin/python"
fi
export PATH="$(dirname "$PY"):$PATH" PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled
mkdir -p "$OUT"
"$PY" benchmarks/gpu_check.py "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
