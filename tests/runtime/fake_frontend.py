#!/usr/bin/env python3
"""Stand-in for the native frontend binary (stdlib only).

`fake_frontend.py frontend --listen-fd N --input-address A --output-address B
--engine-start-index S --engine-count C --data-parallel-size D [--coordinator-address X]
--args-json J`: serves HTTP on the inherited listening socket (every GET answers a JSON echo
of its command line and pid), exits 0 on SIGTERM, exits 2 on an unknown flag (like the real
binary), exits when its parent dies. `fake_behavior` in the args JSON: "ignore-sigterm"
(ignore SIGTERM and start a SIGTERM-ignoring grandchild), "exit:<code>" (exit at once),
"no-parent-watch" (do not watch the parent and ignore SIGTERM: only the launcher's
parent-death guard can end it when the launcher dies).
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fake-frontend")
    sub = parser.add_subparsers(dest="command", required=True)
    front = sub.add_parser("frontend")
    front.add_argument("--listen-fd", type=int, required=True)
    front.add_argument("--input-address", required=True)
    front.add_argument("--output-address", required=True)
    front.add_argument("--engine-start-index", type=int, required=True)
    front.add_argument("--engine-count", type=int, default=1)
    front.add_argument("--data-parallel-size", type=int, required=True)
    front.add_argument("--coordinator-address")
    front.add_argument("--args-json", required=True)
    return parser.parse_args(argv)


def _watch_parent() -> None:
    parent = os.getppid()
    while os.getppid() == parent:
        time.sleep(0.2)
    os._exit(1)


def _bind_ipc(address: str) -> socket.socket | None:
    if not address.startswith("ipc://"):
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(address[len("ipc://") :])
    return sock


def main() -> None:
    opts = _parse(sys.argv[1:])
    shared = json.loads(opts.args_json)
    behavior = shared.get("fake_behavior", "")
    if behavior.startswith("exit:"):
        sys.exit(int(behavior.split(":", 1)[1]))
    state = {"argv": sys.argv[1:], "args_json": shared, "pid": os.getpid(), "grandchild": None}
    if behavior == "ignore-sigterm":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        sleeper = (
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
        )
        state["grandchild"] = subprocess.Popen([sys.executable, "-c", sleeper]).pid
    elif behavior == "no-parent-watch":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    if behavior != "no-parent-watch":
        threading.Thread(target=_watch_parent, daemon=True).start()
    # Bind the ZMQ addresses the way the real binary would (an ipc:// path becomes a file).
    bound = [_bind_ipc(address) for address in (opts.input_address, opts.output_address)]
    state["bound"] = [sock.getsockname() for sock in bound if sock is not None]
    body = json.dumps(state).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("", 0), Handler, bind_and_activate=False)
    server.socket = socket.socket(fileno=opts.listen_fd)
    server.serve_forever(poll_interval=0.1)


if __name__ == "__main__":
    main()
