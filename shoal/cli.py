"""The `shoal` command's old home, kept because console scripts written by installs made before
the move to `shoal.entrypoints.cli` still import `shoal.cli:main` (and `python -m shoal.cli`
still works). Re-running scripts/bootstrap.sh rewrites the script; nothing in shoal imports this.
"""

import sys

from shoal.entrypoints.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
