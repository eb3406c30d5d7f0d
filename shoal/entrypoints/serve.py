"""The `shoal serve` subcommand: its parser (serve_args.py) and a lazy hook to the launcher."""

from __future__ import annotations

import argparse
import gc
from typing import Any

from shoal.entrypoints.serve_args import add_serve_args, config_from_args, server_config_from_args


def register(subparsers: Any) -> None:
    """Add `serve` to the `shoal` command's subparsers (`func` runs the server)."""
    parser = subparsers.add_parser(
        "serve",
        help="start the OpenAI-compatible server",
        description="Start N API servers on one socket and M engine processes.",
    )
    add_serve_args(parser)
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    # Bad flags fail here, before anything heavy is imported.
    config, server_config = config_from_args(args), server_config_from_args(args)
    # First, while this process has no thread and no child: the process that kills whatever
    # this one leaves behind when it exits, SIGKILL included (shoal/runtime/sweeper.py).
    from shoal.runtime.sweeper import start_sweeper

    start_sweeper()
    # Imported here so `shoal --help` and `shoal serve --help` stay fast.
    if server_config.scale_out.headless:
        from shoal.entrypoints.headless import run_headless

        code = run_headless(config, server_config)
    else:
        from shoal.entrypoints.launcher import run_serve

        code = run_serve(config, server_config)
    # Every child is gone: spare the interpreter's final collection of the launcher's objects
    # (~0.2 s, inside the SIGTERM-to-exit time) by freezing them; atexit handlers still run.
    gc.freeze()
    return code
