"""`shoal` command line: one subcommand per module, looked up in a small table."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module defining `register(subparsers)`; the parser it adds sets `func`.
SUBCOMMANDS: dict[str, str] = {
    "serve": "shoal.entrypoints.serve",
    "generate": "shoal.entrypoints.generate",
    "chat": "shoal.entrypoints.generate",
    "bench": "shoal.entrypoints.bench",
    "top": "shoal.entrypoints.top",
}


def build_parser() -> argparse.ArgumentParser:
    from shoal import __version__

    parser = argparse.ArgumentParser(prog="shoal", description="shoal LLM inference server")
    parser.add_argument("--version", action="version", version=f"shoal {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in dict.fromkeys(SUBCOMMANDS.values()):
        importlib.import_module(module_name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except (ValueError, FileNotFoundError) as e:
        # Config validation names the flag (see shoal.config), a missing model names its
        # path: bad input gets one line, no traceback.
        parser.exit(2, f"shoal {args.command}: error: {e}\n")
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
