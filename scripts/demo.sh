#!/usr/bin/env bash
# Set up (if needed) and run the demo: build the tiny zoo, search, export, print the table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
evomerge demo "$@"
