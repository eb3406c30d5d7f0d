"""Helpers of the native frontend's tests: where the cargo workspace's binaries are.

`scripts/bootstrap.sh` builds them (`cargo build --release` in frontend-rs/) when cargo is
present; without them these tests skip and say what to build.
"""

from __future__ import annotations

import os
import shutil

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKSPACE = os.path.join(REPO, "frontend-rs")
# From inside frontend-rs/: cargo reads .cargo/config.toml (offline, Debian's crates) from the
# working directory, not from the manifest's folder.
BUILD_HINT = "cd frontend-rs && cargo build --release (or scripts/bootstrap.sh)"


def rust_binary(name: str) -> str:
    """The path of workspace binary `name` (SHOAL_RUST_TARGET_DIR, else frontend-rs/target);
    skips the test when it is not built."""
    target = os.environ.get("SHOAL_RUST_TARGET_DIR") or os.path.join(WORKSPACE, "target")
    path = os.path.join(target, "release", name)
    if os.path.isfile(path) and os.access(path, os.X_OK):
        return path
    found = shutil.which(name)
    if found:
        return found
    pytest.skip(f"{name} is not built: {BUILD_HINT}")
