"""`shoal bench serve` as a script: `python benchmarks/serve_bench.py --port 8000 ...`."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from shoal.entrypoints.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", "serve", *sys.argv[1:]]))
