"""`python -m shoal.native`: which kernel levels are installed and which one this CPU loads
(exit 1 if none can be loaded here).

`python -m shoal.native build`: recompile the kernels of a source checkout in place
(`setup.py build_ext --inplace`), for a developer who edited a kernel; an installed shoal
never needs it. A development command: nothing in shoal runs it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from shoal import native
from shoal.native.variants import VARIANTS


def report() -> int:
    chosen, reason = native.choose_variant()
    for variant in VARIANTS:
        try:
            loaded = native.load_variant(variant.name)
            state = f"installed ({Path(loaded.__file__ or '').name})"
        except ImportError as e:
            state = f"unavailable: {e}"
        runs = "runs here" if variant.runs_on(native.cpu_flags()) else "not for this CPU"
        print(f"{variant.name:12} {runs:17} {state}")
    module = native.load()
    if module is None:
        print(f"shoal native kernels unavailable: {native.unavailable_reason()}", file=sys.stderr)
        return 1
    assert chosen is not None and reason is None
    print(f"shoal native kernels ready: {native.loaded_variant()}")
    return 0


def build() -> int:
    root = Path(__file__).resolve().parents[2]
    if not (root / "setup.py").exists():
        print(f"no setup.py above {Path(__file__).parent}: not a source checkout", file=sys.stderr)
        return 2
    cmd = [sys.executable, "setup.py", "-q", "build_ext", "--inplace"]
    return subprocess.run(cmd, cwd=root).returncode


if __name__ == "__main__":
    sys.exit(build() if sys.argv[1:] == ["build"] else report())
