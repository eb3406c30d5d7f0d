"""ZMQ endpoints: tcp URIs, the private IPC directory, bind-and-report, unlinking, sweeping."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys

import pytest
import zmq

from shoal import envs
from shoal.runtime.addresses import (
    bind_zmq_socket,
    cleanup_owned_ipc_paths,
    get_engine_client_zmq_addr,
    get_tcp_uri,
    ipc_path,
    ipc_run_dir,
    remove_ipc_run_dir,
    sweep_stale_ipc_dirs,
    unlink_ipc_address,
)


@pytest.fixture
def zmq_ctx():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


@pytest.mark.parametrize(
    "host, port, uri",
    [
        ("127.0.0.1", 0, "tcp://127.0.0.1:0"),
        ("localhost", 5555, "tcp://localhost:5555"),
        ("::1", 0, "tcp://[::1]:0"),
        ("[fe80::1]", 80, "tcp://[fe80::1]:80"),
        ("*", 65535, "tcp://*:65535"),
    ],
)
def test_tcp_uri(host: str, port: int, uri: str) -> None:
    assert get_tcp_uri(host, port) == uri
    assert get_engine_client_zmq_addr(False, host, port) == uri


@pytest.mark.parametrize(
    "host, port, field",
    [
        ("h", -1, "port"),
        ("h", 65536, "port"),
        ("h", True, "port"),
        ("h", "80", "port"),
        ("", 0, "host"),
        ("[]", 0, "host"),
    ],
)
def test_bad_tcp_parts_are_named(host: str, port, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        get_tcp_uri(host, port)


def test_ipc_addresses_live_in_a_private_run_directory() -> None:
    first, second = (get_engine_client_zmq_addr(True, "ignored", 1234) for _ in range(2))
    assert first != second and first.startswith("ipc://")
    run_dir = os.path.dirname(ipc_path(first))
    assert run_dir == ipc_run_dir() == os.path.dirname(ipc_path(second))
    assert os.path.dirname(run_dir) == envs.ENVS.rpc_base_path
    assert os.path.basename(run_dir).startswith(f"shoal-{os.getpid()}-")
    assert stat.S_IMODE(os.stat(run_dir).st_mode) == 0o700
    remove_ipc_run_dir()
    assert not os.path.exists(run_dir)
    assert os.path.dirname(ipc_path(get_engine_client_zmq_addr(True, ""))) != run_dir
    remove_ipc_run_dir()


def test_too_long_ipc_path_names_the_variable(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    monkeypatch.setenv("SHOAL_RPC_BASE_PATH", str(deep))
    envs.refresh()
    try:
        with pytest.raises(ValueError, match="SHOAL_RPC_BASE_PATH"):
            get_engine_client_zmq_addr(True, "")
    finally:
        monkeypatch.undo()
        envs.refresh()
        remove_ipc_run_dir()


def test_bind_resolves_port_zero(zmq_ctx: zmq.Context) -> None:
    sockets = [zmq_ctx.socket(zmq.PULL) for _ in range(3)]
    endpoints = [bind_zmq_socket(s, "tcp://127.0.0.1:0") for s in sockets]
    assert len(set(endpoints)) == 3
    for endpoint in endpoints:
        assert endpoint.startswith("tcp://127.0.0.1:") and int(endpoint.rsplit(":", 1)[1]) > 0
    push = zmq_ctx.socket(zmq.PUSH)
    push.connect(endpoints[1])
    push.send(b"hi")
    assert sockets[1].poll(10_000) and sockets[1].recv() == b"hi"


def test_bind_ipv6(zmq_ctx: zmq.Context) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        endpoint = bind_zmq_socket(zmq_ctx.socket(zmq.PULL), get_tcp_uri("::1", 0))
    except zmq.ZMQError as e:
        pytest.skip(f"IPv6 loopback unavailable: {e}")
    assert endpoint.startswith("tcp://[::1]:") and not endpoint.endswith(":0")


def test_ipc_files_are_unlinked(zmq_ctx: zmq.Context) -> None:
    a, b = (get_engine_client_zmq_addr(True, "") for _ in range(2))
    assert bind_zmq_socket(zmq_ctx.socket(zmq.PULL), a) == a
    assert bind_zmq_socket(zmq_ctx.socket(zmq.PULL), b) == b
    assert os.path.exists(ipc_path(a)) and os.path.exists(ipc_path(b))
    unlink_ipc_address(a)
    unlink_ipc_address(a)  # idempotent
    assert not os.path.exists(ipc_path(a))
    cleanup_owned_ipc_paths()  # what exit and parent death run
    assert not os.path.exists(ipc_path(b))


def test_non_ipc_addresses_are_left_alone() -> None:
    for address in ("tcp://127.0.0.1:5555", "ipc://@abstract", "inproc://x"):
        assert ipc_path(address) is None
        unlink_ipc_address(address)


def test_ipc_run_dir_is_removed_at_exit() -> None:
    code = (
        "from shoal.runtime.addresses import get_engine_client_zmq_addr, ipc_run_dir; "
        "get_engine_client_zmq_addr(True, ''); print(ipc_run_dir())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    run_dir = out.stdout.strip()
    assert run_dir.startswith(envs.ENVS.rpc_base_path) and not os.path.exists(run_dir)


def test_sweep_removes_only_dead_runs() -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    base = envs.ENVS.rpc_base_path
    dead_dir = os.path.join(base, f"shoal-{dead.stdout.strip()}-abc")
    live_dir = os.path.join(base, f"shoal-{os.getppid()}-abc")
    other_dir = os.path.join(base, "unrelated-1")
    for path in (dead_dir, live_dir, other_dir):
        os.mkdir(path)
    try:
        assert sweep_stale_ipc_dirs() == [dead_dir]
        assert os.path.isdir(live_dir) and os.path.isdir(other_dir)
    finally:
        for path in (dead_dir, live_dir, other_dir):
            if os.path.isdir(path):
                os.rmdir(path)
