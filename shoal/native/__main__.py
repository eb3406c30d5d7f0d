"""`python -m shoal.native`: build (or find) the native kernels now; exit 1 if they can't be."""

from __future__ import annotations

import sys

from shoal import native

if __name__ == "__main__":
    module = native.load()
    if module is None:
        print(f"shoal native kernels unavailable: {native.unavailable_reason()}", file=sys.stderr)
        sys.exit(1)
    print(f"shoal native kernels ready: {module.__file__}")
