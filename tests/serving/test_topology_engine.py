"""Engine-core processes driven over real ZMQ by a stand-in for the API servers: handshake,
ADD / ABORT / outputs per client, malformed frames, SIGTERM, a fatal error, start-up failures."""

from __future__ import annotations

from collections.abc import Iterator

import psutil
import pytest

from shoal.engine.manager import CoreEngineProcManager
from shoal.protocol import (
    EngineCoreOutputs,
    EngineDead,
    FinishReason,
    KVCacheStatus,
    RequestType,
    encode,
)
from shoal.protocol import engine_identity as ident
from shoal.runtime.procs import SPAWN_CTX
from tests.helpers import make_tiny_model_dir
from tests.serving.engine_faults import exit_with_code_3, failing_on_boom
from tests.serving.engine_harness import (
    FakeApiServers,
    make_request,
    serving_engine,
    tiny_config,
    tokens,
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_tiny_model_dir(str(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def served(model_dir: str) -> Iterator[tuple[FakeApiServers, CoreEngineProcManager]]:
    """One engine serving two stand-in API servers, shared by the tests that leave it healthy."""
    with serving_engine(model_dir, num_clients=2) as served:
        yield served


@pytest.fixture
def fake_servers() -> Iterator[FakeApiServers]:
    servers = FakeApiServers(num_clients=1)
    yield servers
    servers.close()


def test_handshake_reports_capacity_to_launcher_and_every_api_server(served) -> None:
    servers, manager = served
    (ready,) = manager.engines_ready
    assert (ready.engine_index, ready.num_blocks, ready.block_size) == (0, 64, 16)
    assert 0 < ready.max_model_len <= 256
    for client in (0, 1):
        assert servers.ready_messages[client] == {ident(0): ready}
    proc = manager.processes[0]
    assert proc.name == "EngineCore_0"
    assert "EngineCore_0" in " ".join(psutil.Process(proc.pid).cmdline())  # ps shows the role


def test_outputs_go_to_the_client_that_sent_the_request(served) -> None:
    servers, _ = served
    servers.add(0, make_request("c1", max_tokens=5, client_index=1))
    servers.add(0, make_request("c0", max_tokens=3, client_index=0))
    (out1,) = servers.collect(1, {"c1"}).values()
    (out0,) = servers.collect(0, {"c0"}).values()
    assert len(tokens(out1)) == 5 and out1[-1].finish_reason == FinishReason.LENGTH
    assert len(tokens(out0)) == 3 and out0[-1].finish_reason == FinishReason.LENGTH
    assert all(o.request_id == "c1" for o in out1)


def test_scheduler_stats_ride_with_outputs(served) -> None:
    servers, _ = served
    servers.add(0, make_request("s0", max_tokens=2))
    message = servers.recv(0)
    assert isinstance(message, EngineCoreOutputs) and message.engine_index == 0
    assert message.scheduler_stats is not None
    assert message.scheduler_stats.num_blocks_total == 64
    servers.collect(0, {"s0"})


def test_abort_finishes_the_request_with_abort(served) -> None:
    servers, _ = served
    servers.add(0, make_request("long", max_tokens=200))
    servers.collect(0, {"long"}, first_only=True)
    servers.abort(0, ["long", "unknown-id"])
    outputs = servers.collect(0, {"long"})["long"]
    assert outputs[-1].finish_reason == FinishReason.ABORT
    assert len(tokens(outputs)) < 200


def test_malformed_frames_are_dropped_and_the_engine_keeps_serving(served) -> None:
    servers, manager = served
    servers.send_raw(0, RequestType.ADD.value, b"\xc1 not msgpack")
    servers.send_raw(0, RequestType.ADD.value, b"\x93\x01\x02\x03")  # wrong shape
    servers.send_raw(0, b"\x09", b"unknown type")
    servers.send_raw(0, RequestType.UTILITY.value, b"")
    servers.send_raw(0, RequestType.ADD.value)  # payload missing
    servers.send_raw(0, RequestType.ABORT.value, b"\x91\x05")  # ids not strings
    bad_client = make_request("after-garbage", max_tokens=4, client_index=7)  # no client 7
    servers.send_raw(0, RequestType.ADD.value, encode(bad_client))
    servers.add(0, make_request("after-garbage", max_tokens=4))
    outputs = servers.collect(0, {"after-garbage"})["after-garbage"]
    assert len(tokens(outputs)) == 4
    assert manager.processes[0].is_alive()


def test_a_request_the_engine_cannot_take_finishes_with_error(served) -> None:
    servers, manager = served
    servers.add(0, make_request("too-long", num_prompt_tokens=1000))
    servers.add(0, make_request("empty", num_prompt_tokens=0))
    got = servers.collect(0, {"too-long", "empty"})
    assert [o.finish_reason for o in got["too-long"]] == [FinishReason.ERROR]
    assert [o.finish_reason for o in got["empty"]] == [FinishReason.ERROR]
    assert manager.processes[0].is_alive()


def test_sigterm_drains_in_flight_requests_then_exits_zero(model_dir, fake_servers) -> None:
    manager = fake_servers.start_engines(tiny_config(model_dir), drain_timeout_s=60)
    try:
        fake_servers.wait_ready(manager)
        fake_servers.add(0, make_request("drained", max_tokens=30))
        first = fake_servers.collect(0, {"drained"}, first_only=True)["drained"]
        manager.processes[0].terminate()
        outputs = first + fake_servers.collect(0, {"drained"})["drained"]
        manager.processes[0].join(30)
        assert outputs[-1].finish_reason == FinishReason.LENGTH
        assert len(tokens(outputs)) == 30
        assert manager.processes[0].exitcode == 0
    finally:
        manager.shutdown(5)


def test_sigterm_without_drain_aborts_in_flight_requests(model_dir, fake_servers) -> None:
    manager = fake_servers.start_engines(tiny_config(model_dir), drain_timeout_s=0)
    try:
        fake_servers.wait_ready(manager)
        fake_servers.add(0, make_request("cut", max_tokens=200))
        fake_servers.collect(0, {"cut"}, first_only=True)
        manager.processes[0].terminate()
        outputs = fake_servers.collect(0, {"cut"})["cut"]
        manager.processes[0].join(30)
        assert outputs[-1].finish_reason == FinishReason.ABORT
        assert manager.processes[0].exitcode == 0
    finally:
        manager.shutdown(5)


def test_utility_call_runs_the_live_engines_integrity_check(served) -> None:
    servers, _ = served
    servers.add(0, make_request("held", max_tokens=200, client_index=1))
    servers.collect(1, {"held"}, first_only=True)
    servers.utility(0, 7, "kv_cache_status", client=1)
    while not isinstance(answer := servers.recv(1), EngineCoreOutputs) or not (
        answer.utility_output
    ):
        pass  # "held"'s token outputs
    assert answer.utility_output.call_id == 7 and answer.outputs == []
    busy = answer.utility_output.kv_cache
    assert busy is not None and busy.integrity == "ok"
    assert busy.num_blocks == 64 and busy.num_free_blocks < 64  # "held" holds blocks
    servers.abort(0, ["held"], client=1)
    servers.collect(1, {"held"})
    servers.utility(0, 8, "kv_cache_status")
    idle = servers.recv(0)
    assert isinstance(idle, EngineCoreOutputs) and idle.utility_output is not None
    assert idle.utility_output.kv_cache == KVCacheStatus(0, 64, 64, "ok")
    servers.utility(0, 9, "no_such_method")
    unknown = servers.recv(0)
    assert isinstance(unknown, EngineCoreOutputs) and unknown.utility_output is not None
    assert unknown.utility_output.kv_cache is None
    assert "no_such_method" in unknown.utility_output.error


def test_fatal_error_sends_engine_core_dead_and_exits_non_zero(model_dir) -> None:
    servers = FakeApiServers(num_clients=2)
    manager = servers.start_engines(tiny_config(model_dir), runner_factory=failing_on_boom)
    try:
        servers.wait_ready(manager)
        servers.add(0, make_request("fine", max_tokens=2))
        servers.collect(0, {"fine"})
        servers.add(0, make_request("boom", max_tokens=2))
        # The dead notice names the engine (--restart-dead-engines fails only its requests).
        assert servers.recv(0) == EngineDead(0, "fatal error")
        assert servers.recv(1) == EngineDead(0, "fatal error")
        manager.processes[0].join(30)
        assert manager.processes[0].exitcode == 1
    finally:
        manager.shutdown(5)
        servers.close()


def test_ready_deadline_names_the_engine_and_the_knob(model_dir) -> None:
    # No addresses sent: the engine loads its model and then waits for them.
    manager = CoreEngineProcManager(tiny_config(model_dir), 1)
    try:
        with pytest.raises(RuntimeError, match=r"EngineCore_0.*--engine-ready-timeout"):
            manager.wait_for_ready(timeout=1.0)
    finally:
        manager.shutdown(5)


def test_engine_that_fails_to_start_is_named(tmp_path, fake_servers) -> None:
    # A model directory whose config names no known architecture: loading fails.
    (tmp_path / "config.json").write_text('{"architectures": ["NoSuchModel"]}')
    manager = fake_servers.start_engines(tiny_config(str(tmp_path)), num_engines=2)
    try:
        with pytest.raises(RuntimeError, match=r"EngineCore_[01] .*exited with code 1"):
            manager.wait_for_ready(120)
    finally:
        manager.shutdown(5)


def test_watched_process_dying_during_startup_is_named(model_dir, fake_servers) -> None:
    manager = fake_servers.start_engines(tiny_config(model_dir))
    other = SPAWN_CTX.Process(target=exit_with_code_3, name="ApiServer_9")
    other.start()
    try:
        with pytest.raises(RuntimeError, match=r"ApiServer_9 .*code 3"):
            manager.wait_for_ready(120, watched=[other])
    finally:
        other.join(5)
        manager.shutdown(5)
