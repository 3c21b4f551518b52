#!/usr/bin/env bash
# The test suite: installs what it needs, then runs pytest (slow real-model tests are
# skipped; add --run-slow to include them).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/python-env.sh
bash scripts/install.sh test
export WANDB_MODE=offline HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -m pytest -q -p no:cacheprovider "$@"
