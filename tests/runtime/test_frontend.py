"""RustFrontendProcessManager with a stand-in frontend executable (tests/runtime/fake_frontend.py)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import time
import urllib.request

import psutil
import pytest

from shoal import envs
from shoal.runtime.addresses import get_engine_client_zmq_addr, ipc_path
from shoal.runtime.frontend import RustFrontendProcessManager, _redacted, frontend_args_json
from shoal.runtime.monitor import wait_for_completion_or_failure

SEED_FLOOR_S = 5.0


@pytest.fixture
def listening_socket():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    yield sock
    sock.close()


def _get(sock: socket.socket) -> dict:
    host, port = sock.getsockname()
    with urllib.request.urlopen(f"http://{host}:{port}/health", timeout=60) as response:
        return json.loads(response.read())


def _manager(binary: str, sock: socket.socket, args, **kwargs) -> RustFrontendProcessManager:
    addresses = {"input_address": "tcp://127.0.0.1:5701", "output_address": "tcp://127.0.0.1:5702"}
    addresses.update(kwargs.pop("addresses", {}))
    return RustFrontendProcessManager(
        binary,
        sock,
        args,
        engine_start_index=0,
        engine_count=2,
        data_parallel_size=2,
        **addresses,
        **kwargs,
    )


def test_frontend_serves_on_the_inherited_socket(
    fake_frontend_binary: str, listening_socket: socket.socket
) -> None:
    args = argparse.Namespace(
        model="tiny",
        api_key="secret",
        api_server_count=4,
        data_parallel_rank=1,
        tool_call_parser=None,
        max_model_len=64,
    )
    inp, out = (get_engine_client_zmq_addr(True, "") for _ in range(2))
    manager = _manager(
        fake_frontend_binary,
        listening_socket,
        args,
        addresses={"input_address": inp, "output_address": out},
        stats_update_address="ipc://stats",
    )
    try:
        state = _get(listening_socket)
        assert [p.name for p in manager.processes] == ["RustFrontend"]
        assert state["pid"] == manager.processes[0].pid
        assert state["argv"][:-1] == [
            "frontend",
            "--listen-fd",
            str(listening_socket.fileno()),
            "--input-address",
            inp,
            "--output-address",
            out,
            "--engine-start-index",
            "0",
            "--engine-count",
            "2",
            "--data-parallel-size",
            "2",
            "--coordinator-address",
            "ipc://stats",
            "--args-json",
        ]
        assert state["args_json"] == {
            "api_key": "secret",
            "max_model_len": 64,
            "model": "tiny",
            "model_tag": "tiny",
            "engine_ready_timeout_secs": envs.ENVS.engine_ready_timeout_s,
            "http_timeout_keep_alive": envs.ENVS.http_timeout_keep_alive_s,
        }
        assert sorted(state["bound"]) == sorted([ipc_path(inp), ipc_path(out)])
    finally:
        manager.shutdown()
    assert manager.processes[0].exitcode == 0  # it exits on SIGTERM
    assert not os.path.exists(ipc_path(inp)) and not os.path.exists(ipc_path(out))


def test_frontend_failure_is_named(
    fake_frontend_binary: str, listening_socket: socket.socket
) -> None:
    manager = _manager(fake_frontend_binary, listening_socket, {"fake_behavior": "exit:2"})
    try:
        with pytest.raises(
            RuntimeError, match=r"Process RustFrontend \(PID: \d+\) died with exit code 2"
        ):
            wait_for_completion_or_failure(manager)
    finally:
        manager.shutdown()


def test_stubborn_frontend_and_its_child_are_killed_by_the_deadline(
    fake_frontend_binary: str, listening_socket: socket.socket
) -> None:
    manager = _manager(fake_frontend_binary, listening_socket, {"fake_behavior": "ignore-sigterm"})
    try:
        grandchild = _get(listening_socket)["grandchild"]  # SIGTERM is ignored from here on
        start = time.monotonic()
        manager.shutdown(timeout=0.5)
        assert time.monotonic() - start < SEED_FLOOR_S - 1
    finally:
        manager.shutdown()
    assert manager.processes[0].exitcode == -9
    assert (
        not psutil.pid_exists(grandchild)
        or psutil.Process(grandchild).status() == psutil.STATUS_ZOMBIE
    )


def test_missing_or_non_executable_binary(tmp_path, listening_socket: socket.socket) -> None:
    plain = tmp_path / "not-executable"
    plain.write_text("#!/bin/sh\n")
    for path in (str(tmp_path / "missing"), str(plain)):
        with pytest.raises(FileNotFoundError, match="SHOAL_RUST_FRONTEND_PATH"):
            _manager(path, listening_socket, None)


def test_bad_counts_are_named(fake_frontend_binary: str, listening_socket: socket.socket) -> None:
    with pytest.raises(ValueError, match="engine_count"):
        RustFrontendProcessManager(fake_frontend_binary, listening_socket, None, "a", "b", 0, 0, 1)


@dataclasses.dataclass
class _Args:
    model: str = "m"
    hf_token: str = "t"
    data_parallel_hybrid_lb: bool = False
    callback: object = print  # not JSON: dropped


def test_args_json_sources_and_redaction() -> None:
    from_dataclass = json.loads(frontend_args_json(_Args()))
    assert from_dataclass["model_tag"] == "m" and "callback" not in from_dataclass
    assert "data_parallel_hybrid_lb" not in from_dataclass
    assert json.loads(frontend_args_json({"model_tag": "x", "model": "m"}))["model_tag"] == "x"
    shown = _redacted(["bin", "--args-json", frontend_args_json(_Args())])
    assert json.loads(shown[2])["hf_token"] == "***"
    with pytest.raises(ValueError, match="args"):
        frontend_args_json(42)
