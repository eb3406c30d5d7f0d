#!/usr/bin/env bash
# Optional: build llama.cpp's `llama-perplexity` and `llama-tokenize` for benchmarks/quality.py
# and `llama-server` for benchmarks/run_serving.py's llama-server rows, from the llama.cpp source vendored in the llama-cpp-python 0.3.36 sdist (the same source as the
# llama-server of issue 23). Everything goes outside the repository: nothing of llama.cpp is
# committed.
#
#   benchmarks/setup_llama_cpp.sh                 # builds into /tmp/llama.cpp-build
#   LLAMA_CPP_BUILD_DIR=/opt/llama JOBS=2 benchmarks/setup_llama_cpp.sh
#
# Then: .venv/bin/python benchmarks/quality.py \
#           --llama-perplexity /tmp/llama.cpp-build/build/bin/llama-perplexity
#       .venv/bin/python benchmarks/run_serving.py --only default,llama \
#           --llama-server /tmp/llama.cpp-build/build/bin/llama-server
# Needs pip (PyPI), cmake and a C++ compiler; takes ~5-10 minutes on 2 cores.
set -euo pipefail

VERSION=0.3.36
BUILD_DIR=${LLAMA_CPP_BUILD_DIR:-/tmp/llama.cpp-build}
JOBS=${JOBS:-2}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3

case "$BUILD_DIR" in
"$ROOT" | "$ROOT"/*)
    echo "LLAMA_CPP_BUILD_DIR must be outside the repository ($ROOT)" >&2
    exit 2
    ;;
esac

mkdir -p "$BUILD_DIR/sdist"
SDIST="$BUILD_DIR/sdist/llama_cpp_python-$VERSION.tar.gz"
if [ ! -f "$SDIST" ]; then
    "$PYTHON" -m pip download --no-binary :all: --no-deps --dest "$BUILD_DIR/sdist" \
        "llama-cpp-python==$VERSION"
fi
SRC="$BUILD_DIR/llama_cpp_python-$VERSION/vendor/llama.cpp"
if [ ! -f "$SRC/CMakeLists.txt" ]; then
    tar -xzf "$SDIST" -C "$BUILD_DIR" "llama_cpp_python-$VERSION/vendor/llama.cpp"
fi

# CPU only, tuned for this host (GGML_NATIVE), no network features (no HTTPS, no web UI
# download), only the three tools.
cmake -S "$SRC" -B "$BUILD_DIR/build" \
    -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=ON \
    -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=ON \
    -DLLAMA_BUILD_UI=OFF \
    -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_BUILD_TOOLS=ON
cmake --build "$BUILD_DIR/build" --config Release -j "$JOBS" \
    --target llama-perplexity llama-tokenize llama-server

echo "built: $BUILD_DIR/build/bin/llama-perplexity, llama-tokenize and llama-server"
