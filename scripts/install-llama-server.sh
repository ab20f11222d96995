#!/usr/bin/env bash
# Install llama-cpp-python[server] (the OpenAI-compatible server the judge tests talk to).
# Idempotent: exits at once when `import llama_cpp.server` already works in the venv.
# There is no prebuilt CPU wheel; the default source build targets the build machine's CPU and
# crashed on its first request here (AMX `ldtilecfg`), so build a portable AVX2 binary instead.
# pip caches the built wheel, so later runs on the same machine take seconds.
# usage: scripts/install-llama-server.sh [PIP]   (default: .venv/bin/pip)
set -euo pipefail
PIP="${1:-.venv/bin/pip}"
PY="$(dirname "$PIP")/python"
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"

if "$PY" -c "import llama_cpp.server" >/dev/null 2>&1; then
    echo "llama-cpp-python server already installed ($("$PY" -c 'import llama_cpp; print(llama_cpp.__version__)'))"
    exit 0
fi
echo "building llama-cpp-python[server]==$VERSION from source (portable AVX2; ~8-10 min on 2 cores)"
CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAVA_BUILD=OFF" \
FORCE_CMAKE=1 \
    "$PIP" install "llama-cpp-python[server]==$VERSION"
"$PY" -c "import llama_cpp.server" && echo "llama-cpp-python server installed"
