#!/usr/bin/env bash
# Create .venv and install modeconn with its pinned dependencies (CPU torch 2.13.0, never a CUDA
# build). Sourced by quickstart.sh and test.sh; does nothing when the install is already current.
# MODECONN_VENV picks another venv path, PYTHON another interpreter (3.10+).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MODECONN_VENV:-$ROOT/.venv}"
STAMP="$VENV/.modeconn-install"
want="$(cat "$ROOT"/requirements/*.txt "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV"
  "${PYTHON:-python3}" -m venv "$VENV"
fi
if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing dependencies into $VENV (about three minutes the first time)"
  # (grep drops the notes some machines' pip configuration prints for every package)
  pip_install() {
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$@" 2>&1 \
      | { grep -v "^WARNING: Location '.*' is ignored" || true; }
  }
  pip_install "setuptools>=70" wheel
  pip_install -r "$ROOT/requirements/test.txt"
  pip_install --no-deps -r "$ROOT/requirements/corpus.txt"
  # Build DeepSpeed's CPU communication op now, not at run time (see requirements/deepspeed.txt).
  DS_BUILD_SHM_COMM=1 pip_install --no-build-isolation --no-cache-dir -r "$ROOT/requirements/deepspeed.txt"
  pip_install --no-deps --no-build-isolation -e "$ROOT"
  echo "$want" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"

# Offline machines: the GPT-2 BPE file of ../shared stands in for tiktoken's download.
if [ -z "${MODECONN_GPT2_BPE:-}" ] && [ -f "$ROOT/../shared/data/gpt2.tiktoken" ]; then
  export MODECONN_GPT2_BPE="$ROOT/../shared/data/gpt2.tiktoken"
fi
