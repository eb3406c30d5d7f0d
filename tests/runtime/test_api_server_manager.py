"""APIServerProcessManager with real spawned processes: start, gather, shutdown, failures."""

from __future__ import annotations

import os
import socket
import threading
import time
from urllib.parse import urlsplit

import psutil
import pytest

from shoal import envs
from shoal.runtime.addresses import get_engine_client_zmq_addr, ipc_path
from shoal.runtime.managers import APIServerProcessManager
from shoal.runtime.monitor import wait_for_completion_or_failure
from shoal.runtime.procs import SPAWN_CTX

from . import stub_targets

TCP_PLACEHOLDER = "tcp://127.0.0.1:0"


def _manager(target, num_servers: int = 2, addresses: list[str] | None = None, **kwargs):
    ins = addresses or [TCP_PLACEHOLDER] * num_servers
    outs = addresses or [TCP_PLACEHOLDER] * num_servers
    return APIServerProcessManager(
        "localhost:8000",
        socket.socket(),
        "test_args",
        num_servers,
        ins,
        outs,
        target_server_fn=target,
        **kwargs,
    )


def _all_dead(manager: APIServerProcessManager) -> bool:
    return not any(p.is_alive() for p in manager.processes)


# -- the seed contract's scenarios (docs/api.md) -----------------------------------------------


@pytest.mark.parametrize("stats_update_address", [None, "tcp://127.0.0.1:5555"])
def test_scenario1_start_and_shutdown(stats_update_address: str | None) -> None:
    manager = _manager(stub_targets.sleep_then_exit, 3, stats_update_address=stats_update_address)
    try:
        assert [p.name for p in manager.processes] == ["ApiServer_0", "ApiServer_1", "ApiServer_2"]
        assert all(p.is_alive() for p in manager.processes)
        time.sleep(0.25)
        assert all(p.is_alive() for p in manager.processes)
    finally:
        manager.shutdown()
    time.sleep(0.2)
    assert _all_dead(manager)


def test_scenario2_sigterm_one_child_fails_the_wait() -> None:
    manager = _manager(stub_targets.never_report, 3)
    errors: list[BaseException] = []

    def watch() -> None:
        try:
            wait_for_completion_or_failure(api_server_manager=manager)
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=watch)
    try:
        thread.start()
        time.sleep(0.3)
        os.kill(manager.processes[0].pid, 15)
        thread.join(timeout=1.0)
        assert not thread.is_alive()
        assert len(errors) == 1 and "died with exit code" in str(errors[0])
        assert "ApiServer_0" in str(errors[0])
    finally:
        manager.shutdown()
    assert _all_dead(manager)


def test_scenario3_all_exit_zero_returns() -> None:
    manager = _manager(stub_targets.sleep_then_exit, 3)
    try:
        for proc in manager.processes:
            proc.join(timeout=30)
        wait_for_completion_or_failure(api_server_manager=manager)
    finally:
        manager.shutdown()


def test_scenario4_coordinator_death_is_named() -> None:
    manager = _manager(stub_targets.never_report, 2)
    coordinator_proc = SPAWN_CTX.Process(
        target=stub_targets.exit_after, args=(60, 0), name="MockExternalProcess"
    )
    coordinator_proc.start()

    class Coordinator:
        proc = coordinator_proc

    errors: list[BaseException] = []

    def watch() -> None:
        try:
            wait_for_completion_or_failure(manager, coordinator=Coordinator())
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=watch)
    try:
        thread.start()
        time.sleep(0.3)
        coordinator_proc.terminate()
        thread.join(timeout=1.0)
        assert not thread.is_alive()
        assert len(errors) == 1 and "MockExternalProcess" in str(errors[0])
        assert all(p.is_alive() for p in manager.processes)
    finally:
        manager.shutdown()
        coordinator_proc.join(5)
    assert _all_dead(manager)


def test_scenario5_tcp_placeholders_resolve_to_distinct_ports() -> None:
    manager = _manager(stub_targets.report_and_serve, 4)
    try:
        inputs, outputs = manager.gather_actual_addresses(timeout=15)
    finally:
        manager.shutdown()
    endpoints = inputs + outputs
    assert len(set(endpoints)) == 8
    for endpoint in endpoints:
        parts = urlsplit(endpoint)
        assert parts.scheme == "tcp" and parts.hostname == "127.0.0.1" and parts.port > 0


def test_scenario6_children_that_never_report() -> None:
    manager = _manager(stub_targets.exit_without_report, 2)
    try:
        with pytest.raises(RuntimeError, match="reporting"):
            manager.gather_actual_addresses(timeout=10)
    finally:
        manager.shutdown()


# -- gather: errors name the server, arrive early, reports are never lost -------------------------


def test_exit_before_report_fails_long_before_the_deadline() -> None:
    manager = _manager(stub_targets.exit_without_report, 2)
    start = time.monotonic()
    try:
        with pytest.raises(RuntimeError, match=r"ApiServer_\d .*(exited \(code=3\)|closed)"):
            manager.gather_actual_addresses(timeout=600)
    finally:
        manager.shutdown()
    assert time.monotonic() - start < 60


def test_closed_pipe_is_named() -> None:
    manager = _manager(stub_targets.close_pipe_and_hang, 1)
    try:
        with pytest.raises(RuntimeError, match="ApiServer_0 closed its address pipe"):
            manager.gather_actual_addresses(timeout=60)
    finally:
        manager.shutdown(timeout=0)


def test_timeout_names_the_silent_servers() -> None:
    manager = _manager(stub_targets.never_report, 2)
    try:
        with pytest.raises(RuntimeError, match=r"Timed out after 1\.0s .*ApiServer_0.*ApiServer_1"):
            manager.gather_actual_addresses(timeout=1.0)
        with pytest.raises(RuntimeError, match="already failed"):
            manager.gather_actual_addresses(timeout=1.0)
    finally:
        manager.shutdown(timeout=0)


def test_default_timeout_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHOAL_ENGINE_READY_TIMEOUT_S", "0.5")
    envs.refresh()
    try:
        manager = _manager(stub_targets.never_report, 1)
        try:
            with pytest.raises(RuntimeError, match=r"Timed out after 0\.5s"):
                manager.gather_actual_addresses()
        finally:
            manager.shutdown(timeout=0)
    finally:
        monkeypatch.undo()
        envs.refresh()


def test_report_from_a_child_that_already_exited_is_kept() -> None:
    manager = _manager(
        stub_targets.report_then_exit, 3, addresses=[f"ipc://unused-{i}" for i in range(3)]
    )
    try:
        for proc in manager.processes:
            proc.join(timeout=30)
            assert proc.exitcode == 0
        inputs, outputs = manager.gather_actual_addresses(timeout=10)
        assert inputs == outputs == [f"ipc://unused-{i}" for i in range(3)]
        assert manager.gather_actual_addresses() == (inputs, outputs)  # cached
    finally:
        manager.shutdown()


def test_no_servers_gathers_nothing() -> None:
    manager = _manager(stub_targets.never_report, 0)
    assert manager.processes == []
    assert manager.gather_actual_addresses(timeout=0) == ([], [])
    manager.shutdown()


# -- construction contract --------------------------------------------------------------------------


@pytest.mark.parametrize("with_extras", [False, True])
def test_client_config_contents(with_extras: bool) -> None:
    queue = SPAWN_CTX.Queue()
    extras = {"stats_update_address": "ipc://stats"} if with_extras else {}
    manager = APIServerProcessManager(
        "0.0.0.0:8000",
        socket.socket(),
        "test_args",
        2,
        ["in0", "in1"],
        ["out0", "out1"],
        target_server_fn=stub_targets.echo_config,
        tensor_queue=queue,
        **extras,
    )
    try:
        seen = sorted(
            (queue.get(timeout=30) for _ in range(2)), key=lambda s: s["config"]["client_index"]
        )
        manager.gather_actual_addresses(timeout=30)
    finally:
        manager.shutdown()
        queue.close()
        queue.join_thread()
    expected_keys = {
        "input_address",
        "output_address",
        "client_index",
        "client_count",
        "actual_address_pipe",
        "tensor_queue",
    } | set(extras)
    for i, report in enumerate(seen):
        assert set(report["keys"]) == expected_keys
        assert report["config"]["client_index"] == i
        assert report["config"]["client_count"] == 2
        assert report["config"]["input_address"] == f"in{i}"
        assert report["config"]["output_address"] == f"out{i}"
        assert report["listen_address"] == "0.0.0.0:8000" and report["args"] == "test_args"
        assert report["process_name"] == f"ApiServer_{i}"


@pytest.mark.parametrize(
    "ins, outs, field",
    [
        (["a"], ["b", "c"], "input_addresses"),
        (["a", "b"], ["c"], "output_addresses"),
        (["a", "b", "c"], ["d", "e", "f"], "input_addresses"),
    ],
)
def test_mismatched_address_lists_raise(ins: list[str], outs: list[str], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        APIServerProcessManager(
            "", None, "a", 2, ins, outs, target_server_fn=stub_targets.never_report
        )


def test_failed_start_rolls_back_started_servers() -> None:
    stub_targets.FailOnSecondPickle.pickles = 0
    before = {p.pid for p in psutil.Process().children()}
    with pytest.raises(RuntimeError, match="pickled twice") as excinfo:
        APIServerProcessManager(
            "",
            None,
            stub_targets.FailOnSecondPickle(),
            3,
            ["ipc://x"] * 3,
            ["ipc://y"] * 3,
            target_server_fn=stub_targets.never_report,
        )
    # The first server was started for real. The traceback still holds the half-built
    # manager, so its finalizer has not run: only the rollback can have stopped it.
    started = [p for p in psutil.Process().children() if p.pid not in before]
    assert [p for p in started if p.status() != psutil.STATUS_ZOMBIE] == []
    assert excinfo.traceback is not None


def test_ipc_socket_files_are_removed_at_shutdown() -> None:
    addresses = [get_engine_client_zmq_addr(True, "") for _ in range(4)]
    manager = APIServerProcessManager(
        "",
        None,
        "a",
        2,
        addresses[:2],
        addresses[2:],
        target_server_fn=stub_targets.report_and_serve,
    )
    try:
        inputs, outputs = manager.gather_actual_addresses(timeout=30)
        assert inputs + outputs == addresses
        assert all(os.path.exists(ipc_path(a)) for a in addresses)
    finally:
        manager.shutdown()
    assert not any(os.path.exists(ipc_path(a)) for a in addresses)


def test_finalizer_stops_servers_of_a_dropped_manager() -> None:
    manager = _manager(stub_targets.never_report, 2)
    procs = list(manager.processes)
    del manager  # the weakref.finalize safety net runs shutdown()
    assert not any(p.is_alive() for p in procs)


@pytest.mark.slow
def test_fifty_start_gather_shutdown_cycles_without_collision() -> None:
    for cycle in range(50):
        manager = _manager(stub_targets.bind_and_report, 4)
        try:
            inputs, outputs = manager.gather_actual_addresses(timeout=30)
        finally:
            manager.shutdown()
        endpoints = inputs + outputs
        assert len(set(endpoints)) == 8, f"cycle {cycle}: {endpoints}"
        assert all(urlsplit(e).port for e in endpoints)
