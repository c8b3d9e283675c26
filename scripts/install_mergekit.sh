#!/usr/bin/env bash
# Create .mergekit-venv with mergekit 0.1.5 (the yardstick the merge tests compare against).
# mergekit pins its own transformers/peft, so it lives apart from the main .venv.
# Idempotent: a venv where `import mergekit` works is left as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.mergekit-venv
if [[ -x "$VENV/bin/python" ]] && "$VENV/bin/python" -c "import mergekit, peft" >/dev/null 2>&1; then
    echo "install_mergekit: $VENV already works; nothing to do"
    exit 0
fi
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q "torch==2.13.0"   # CPU torch first (a bare torch pulls CUDA)
"$VENV/bin/pip" install -q "mergekit==0.1.5" peft
echo "install_mergekit: $VENV ready"
