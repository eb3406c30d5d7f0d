"""Spawn targets for the runtime tests: stdlib (+ zmq, + shoal.runtime.child) only, so a child
starts in a fraction of a second. Module-level functions, importable by spawn."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any

# A grandchild that ignores SIGTERM and sleeps (exec'd, so it starts fast and owns no fds).
_STUBBORN_SLEEPER = (
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
)
# Forks an escapee (optionally in its own session), prints its pid and exits at once, so the
# escapee is re-parented away from the process that started this script.
_DOUBLE_FORK = """
import os, signal, sys, time
pid = os.fork()
if pid:
    print(pid, flush=True)
    os._exit(0)
devnull = os.open(os.devnull, os.O_RDWR)
for fd in (0, 1, 2):
    os.dup2(devnull, fd)  # release the pipe the starter reads the pid from
if sys.argv[1] == "setsid":
    os.setsid()
signal.signal(signal.SIGTERM, signal.SIG_IGN)
time.sleep(60)
"""


def _init(role: str) -> None:
    from shoal.runtime.child import init_child_process

    init_child_process(role)


def _role(client_config: dict[str, Any]) -> str:
    return f"ApiServer_{client_config['client_index']}"


def sleep_then_exit(listen_address: str, sock: Any, args: Any, client_config: dict) -> None:
    """API-server stub: lives 0.5 s, then exits 0 without reporting."""
    _init(_role(client_config))
    time.sleep(0.5)


def report_and_serve(listen_address: str, sock: Any, args: Any, client_config: dict) -> None:
    """API-server stub: bind ROUTER on input and PULL on output, report them, wait for SIGTERM
    (default disposition: exit at once)."""
    _init(_role(client_config))
    import zmq

    from shoal.runtime.addresses import bind_zmq_socket

    ctx = zmq.Context()
    router, pull = ctx.socket(zmq.ROUTER), ctx.socket(zmq.PULL)
    pipe = client_config["actual_address_pipe"]
    try:
        pipe.send(
            {
                "input_address": bind_zmq_socket(router, client_config["input_address"]),
                "output_address": bind_zmq_socket(pull, client_config["output_address"]),
            }
        )
    finally:
        pipe.close()
    while True:
        time.sleep(60)


def bind_and_report(listen_address: str, sock: Any, args: Any, client_config: dict) -> None:
    """Lightest API-server stub (stdlib + zmq, no shoal import): bind ROUTER/PULL, report the
    bound endpoints (zmq.LAST_ENDPOINT), wait for SIGTERM."""
    import zmq

    ctx = zmq.Context()
    router, pull = ctx.socket(zmq.ROUTER), ctx.socket(zmq.PULL)
    router.bind(client_config["input_address"])
    pull.bind(client_config["output_address"])
    pipe = client_config["actual_address_pipe"]
    pipe.send(
        {
            "input_address": router.getsockopt(zmq.LAST_ENDPOINT).decode(),
            "output_address": pull.getsockopt(zmq.LAST_ENDPOINT).decode(),
        }
    )
    pipe.close()
    while True:
        time.sleep(60)


def report_then_exit(listen_address: str, sock: Any, args: Any, client_config: dict) -> None:
    """API-server stub: report the addresses unchanged and exit 0 straight away."""
    _init(_role(client_config))
    pipe = client_config["actual_address_pipe"]
    pipe.send(
        {
            "input_address": client_config["input_address"],
            "output_address": client_config["output_address"],
        }
    )
    pipe.close()


def exit_without_report(listen_address: str, sock: Any, args: Any, client_config: dict) -> None:
    """API-server stub: exit 3 at once, never reporting."""
    _init(_role(client_config))
    sys.exit(3)


def close_pipe_and_hang(listen_address: str, sock: Any, args: Any, client_config: dict) -> None:
    """API-server stub: close the address pipe without reporting, then keep running."""
    _init(_role(client_config))
    client_config["actual_address_pipe"].close()
    time.sleep(60)


def never_report(listen_address: str, sock: Any, args: Any, client_config: dict) -> None:
    """API-server stub: keep the pipe open and never report."""
    _init(_role(client_config))
    time.sleep(60)


def echo_config(listen_address: str, sock: Any, args: Any, client_config: dict) -> None:
    """API-server stub: put what it received on `client_config["tensor_queue"]`, then report
    fixed addresses."""
    _init(_role(client_config))
    pipe = client_config["actual_address_pipe"]
    client_config["tensor_queue"].put(
        {
            "keys": sorted(client_config),
            "config": {
                k: v
                for k, v in client_config.items()
                if k not in ("tensor_queue", "actual_address_pipe")
            },
            "listen_address": listen_address,
            "args": args,
            "process_name": _process_name(),
        }
    )
    pipe.send({"input_address": "ipc://in", "output_address": "ipc://out"})
    pipe.close()


def _process_name() -> str:
    import multiprocessing

    return multiprocessing.current_process().name


def exit_after(delay_s: float, code: int) -> None:
    """Generic stub: sleep `delay_s`, exit `code`."""
    _init("Stub")
    time.sleep(delay_s)
    sys.exit(code)


def start_grandchildren(report: Any, escapee_mode: str, ignore_sigterm: bool = True) -> None:
    """Generic stub that starts one SIGTERM-ignoring grandchild and (escapee_mode "group" or
    "setsid", not "none") one SIGTERM-ignoring escapee re-parented by a double fork, sends
    `{"grandchild": pid, "escapee": pid | None}` on `report`, then sleeps; it ignores SIGTERM
    itself when `ignore_sigterm`, else exits 0 on it."""
    _init("Stubborn")
    if ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    grandchild = subprocess.Popen([sys.executable, "-c", _STUBBORN_SLEEPER])
    escapee = None
    if escapee_mode != "none":
        out = subprocess.run(
            [sys.executable, "-c", _DOUBLE_FORK, escapee_mode],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        )
        escapee = int(out.stdout.split()[0])
    report.send({"grandchild": grandchild.pid, "escapee": escapee})
    report.close()
    while True:
        time.sleep(60)


def bind_ipc_then_exit_now(report: Any, address: str, code: int) -> None:
    """Bind a ZMQ socket at the IPC `address`, report the path, then `exit_now(code)` with the
    socket still open (what an API server or engine does after its shutdown)."""
    import zmq

    from shoal.runtime.addresses import bind_zmq_socket, ipc_path
    from shoal.runtime.child import exit_now

    _init("Stub")
    sock = zmq.Context.instance().socket(zmq.PULL)
    bind_zmq_socket(sock, address)
    report.send(ipc_path(address))
    report.close()
    exit_now(code)


def report_identity(report: Any, role: str) -> None:
    """Generic stub: init_child_process(role), send what it set up, sleep."""
    _init(role)
    from shoal.logger import get_process_role

    report.send({"role": get_process_role(), "pid": os.getpid(), "pgid": os.getpgrp()})
    report.close()
    while True:
        time.sleep(60)


def plain_sleeper(report: Any) -> None:
    """Generic stub that does NOT call init_child_process (stays in the launcher's group)."""
    report.send(os.getpgrp())
    report.close()
    time.sleep(60)


def watcher_only_child(report: Any, address: str) -> None:
    """Generic stub armed with the fallback watcher only (no PR_SET_PDEATHSIG): binds an IPC
    socket, reports its pid, sleeps. The watcher must remove the socket file and exit."""
    from shoal.logger import set_process_role
    from shoal.runtime import child

    set_process_role("WatcherOnly")
    os.setpgid(0, 0)
    child.watch_parent(use_pdeathsig=False)
    import zmq

    from shoal.runtime.addresses import bind_zmq_socket

    sock = zmq.Context().socket(zmq.PULL)
    bind_zmq_socket(sock, address)
    report.send(os.getpid())
    report.close()
    while True:
        time.sleep(60)


class FailOnSecondPickle:
    """An `args` object that pickles once and raises on the second pickling, to make the
    second API server's start() fail for real."""

    pickles = 0

    def __reduce__(self) -> tuple[Any, ...]:
        type(self).pickles += 1
        if type(self).pickles >= 2:
            raise RuntimeError("args cannot be pickled twice")
        return (FailOnSecondPickle, ())


def orphan_launcher_main(mode: str) -> None:
    """Body of a stand-in launcher process for the parent-death tests: start two children
    (mode "api": API-server stubs via APIServerProcessManager; mode "watcher": watcher-only
    stubs), print `{"pids", "files", "run_dir"}` as one JSON line, sleep until killed."""
    import json

    from shoal.runtime.addresses import get_engine_client_zmq_addr, ipc_path, ipc_run_dir

    addresses = [get_engine_client_zmq_addr(True, "") for _ in range(4)]
    if mode == "api":
        from shoal.runtime.managers import APIServerProcessManager

        manager = APIServerProcessManager(
            "", None, "args", 2, addresses[:2], addresses[2:], target_server_fn=report_and_serve
        )
        manager.gather_actual_addresses(timeout=60)
        pids = [p.pid for p in manager.processes]
    else:
        from shoal.runtime.procs import SPAWN_CTX, start_process

        pids = []
        for address in addresses[:2]:
            recv, send = SPAWN_CTX.Pipe(duplex=False)
            proc = SPAWN_CTX.Process(target=watcher_only_child, args=(send, address))
            start_process(proc)
            send.close()
            pids.append(recv.recv())
        addresses = addresses[:2]
    files = [ipc_path(a) for a in addresses]
    print(json.dumps({"pids": pids, "files": files, "run_dir": ipc_run_dir()}), flush=True)
    time.sleep(120)
