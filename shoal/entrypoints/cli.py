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
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shoal", description="shoal LLM inference server")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    registered: set[str] = set()
    for module_name in dict.fromkeys(SUBCOMMANDS.values()):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name == module_name:
                continue  # subcommand not built yet
            raise
        module.register(sub)
        registered.add(module_name)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except ValueError as e:
        # Config validation names the flag (see shoal.config); no traceback for bad input.
        parser.exit(2, f"shoal {args.command}: error: {e}\n")
    except FileNotFoundError as e:
        parser.exit(2, f"shoal {args.command}: error: {e}\n")
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
