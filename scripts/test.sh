#!/usr/bin/env bash
# Install (if needed) and run the test suite. Extra arguments go to pytest.
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$ROOT"
# Tests never touch the network: hub libraries offline, wandb off.
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled
exec python -m pytest "$@"
