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


# -- targets that never call init_child_process (tests/runtime/test_orphans.py) -----------------

_PR_GET_PDEATHSIG = 2


def pdeathsig() -> int:
    """This process's parent-death signal (prctl PR_GET_PDEATHSIG; 0 = none, -1 off Linux)."""
    import ctypes

    if not sys.platform.startswith("linux"):
        return -1
    value = ctypes.c_int(0)
    ctypes.CDLL(None).prctl(_PR_GET_PDEATHSIG, ctypes.byref(value), 0, 0, 0)
    return value.value


def _stubborn() -> None:
    """Ignore what a polite stop sends: only the parent-death guard can end this process."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def bare_api_server(listen_address: str, sock: Any, args: Any, client_config: dict) -> None:
    """API-server stub with no init_child_process: report the addresses unchanged (so the
    launcher knows the target runs), then sleep, ignoring SIGTERM."""
    _stubborn()
    pipe = client_config["actual_address_pipe"]
    pipe.send(
        {
            "input_address": client_config["input_address"],
            "output_address": client_config["output_address"],
        }
    )
    pipe.close()
    while True:
        time.sleep(60)


def bare_sleeper(report: Any) -> None:
    """Generic stub with no init_child_process: send `{"pid", "pdeathsig"}`, sleep, ignoring
    SIGTERM."""
    _stubborn()
    report.send({"pid": os.getpid(), "pdeathsig": pdeathsig()})
    report.close()
    while True:
        time.sleep(60)


def identity_and_pdeathsig(report: Any) -> None:
    """Generic stub that does call init_child_process (so the guard is armed twice): send
    `{"role", "pgid", "pdeathsig"}`, sleep."""
    _init("Twice")
    from shoal.logger import get_process_role

    report.send({"role": get_process_role(), "pgid": os.getpgrp(), "pdeathsig": pdeathsig()})
    report.close()
    while True:
        time.sleep(60)


def spawn_a_helper(report: Any) -> None:
    """Generic stub with no init_child_process that starts its own helper (a grandchild of
    the launcher) through ProcessManager.spawn, sends `{"pid", "helper"}`, sleeps."""
    _stubborn()
    from shoal.runtime.managers import ProcessManager
    from shoal.runtime.procs import SPAWN_CTX

    helpers = ProcessManager()
    recv, send = SPAWN_CTX.Pipe(duplex=False)
    helpers.spawn(bare_sleeper, "Helper", args=(send,))
    send.close()
    helper = recv.recv()["pid"]
    report.send({"pid": os.getpid(), "helper": helper})
    report.close()
    while True:
        time.sleep(60)


def bare_engine(engine_index: int, config: Any, handshake: Any, *rest: Any) -> None:
    """Engine stub (run_engine_core's signature) with no init_child_process: send its pid on
    the handshake pipe, sleep, ignoring SIGTERM."""
    _stubborn()
    handshake.send_bytes(str(os.getpid()).encode())
    while True:
        time.sleep(60)


def count_parent_watchers(report: Any) -> None:
    """Generic stub: the fallback watcher as the shim starts it off Linux, then
    init_child_process; send how many ParentWatch threads run, sleep."""
    import threading

    from shoal.runtime import child

    child.watch_parent(use_pdeathsig=False)
    child.init_child_process("Watched")
    report.send(sum(t.name == "ParentWatch" for t in threading.enumerate()))
    report.close()
    while True:
        time.sleep(60)


def write_marker(path: str) -> None:
    """Generic stub: create the file `path` (shows that the target ran)."""
    with open(path, "w") as f:
        f.write("ran")


def guard_launcher_main(mode: str, frontend_binary: str = "") -> None:
    """Body of a stand-in launcher whose children run targets that never call
    init_child_process. Modes: "api" (two API servers via APIServerProcessManager), "spawn"
    (ProcessManager.spawn of a child that starts its own helper), "engine" (an engine started,
    killed and restarted by CoreEngineProcManager.restart), "frontend" (the fake native
    frontend with its own parent watch off). Uses no IPC address, so it leaves no socket
    file. Prints `{"pids": [...]}` (every live descendant it started) as one JSON line, then
    sleeps until killed."""
    import json

    pids: list[int] = []
    keep: list[Any] = []  # managers stay referenced: their finalizers would stop the children
    if mode == "api":
        from shoal.runtime.managers import APIServerProcessManager

        placeholders = ["tcp://127.0.0.1:0"] * 2
        servers = APIServerProcessManager(
            "", None, None, 2, placeholders, placeholders, target_server_fn=bare_api_server
        )
        servers.gather_actual_addresses(timeout=60)  # both targets are running
        pids = [p.pid for p in servers.processes if p.pid is not None]
        keep.append(servers)
    elif mode == "spawn":
        from shoal.runtime.managers import ProcessManager
        from shoal.runtime.procs import SPAWN_CTX

        manager = ProcessManager()
        recv, send = SPAWN_CTX.Pipe(duplex=False)
        manager.spawn(spawn_a_helper, "Parent", args=(send,))
        send.close()
        report = recv.recv()
        pids = [report["pid"], report["helper"]]
        keep.append(manager)
    elif mode == "engine":
        from shoal.config import ShoalConfig
        from shoal.engine.manager import CoreEngineProcManager

        engines = CoreEngineProcManager(ShoalConfig(), 1, target_fn=bare_engine)
        first = engines.processes[0]
        assert first.pid is not None
        os.kill(first.pid, signal.SIGKILL)
        first.join(30)
        pipe = engines.restart(0)
        if not pipe.poll(60):
            raise RuntimeError("the restarted engine did not report")
        pids = [int(pipe.recv_bytes())]
        keep.append(engines)
    elif mode == "frontend":
        import socket
        import urllib.request

        from shoal.runtime.frontend import RustFrontendProcessManager

        sock = socket.create_server(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        frontend = RustFrontendProcessManager(
            frontend_binary,
            sock,
            {"fake_behavior": "no-parent-watch"},
            "tcp://127.0.0.1:0",
            "tcp://127.0.0.1:0",
            0,
            1,
            1,
        )
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=60) as reply:
            pids = [json.loads(reply.read())["pid"]]  # it serves: started and armed
        keep.append(frontend)
    else:
        raise ValueError(mode)
    print(json.dumps({"pids": pids}), flush=True)
    time.sleep(120)
