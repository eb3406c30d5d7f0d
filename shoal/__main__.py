"""`python -m shoal ...`: the `shoal` command (shoal/entrypoints/cli.py)."""

import sys

from shoal.entrypoints.cli import main

sys.exit(main())
