"""The DP coordinator process: EngineLoad in, DPStats out (real process, real ZMQ)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import zmq

from shoal.engine.coordinator import DPCoordinator
from shoal.protocol import DPStats, EngineLoad, decoder, encode
from shoal.runtime.addresses import ipc_path


@pytest.fixture
def coordinator() -> Iterator[tuple[DPCoordinator, zmq.Socket, zmq.Socket]]:
    coord = DPCoordinator(num_engines=2)
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(coord.stats_update_address)
    push = ctx.socket(zmq.PUSH)
    push.connect(coord.load_address)
    try:
        yield coord, push, sub
    finally:
        push.close(linger=0)
        sub.close(linger=0)
        ctx.term()
        coord.shutdown(5)


def _next_stats(sub: zmq.Socket, timeout_ms: int = 10_000) -> DPStats:
    assert sub.poll(timeout_ms), "no DPStats published"
    return decoder(DPStats).decode(sub.recv())


def _wait_for_loads(sub: zmq.Socket, loads: list[tuple[int, int]]) -> DPStats:
    for _ in range(200):
        stats = _next_stats(sub)
        if [tuple(x) for x in stats.loads] == loads:
            return stats
    raise AssertionError(f"never saw loads {loads}")


def test_publishes_engine_loads(coordinator) -> None:
    coord, push, sub = coordinator
    push.send(encode(EngineLoad(engine_index=1, num_waiting_reqs=3, num_running_reqs=4)))
    _wait_for_loads(sub, [(0, 0), (3, 4)])
    # Republished while busy, so a late subscriber catches up without a change.
    again = _next_stats(sub)
    assert [tuple(x) for x in again.loads] == [(0, 0), (3, 4)]
    push.send(encode(EngineLoad(engine_index=0, num_waiting_reqs=1, num_running_reqs=0)))
    _wait_for_loads(sub, [(1, 0), (3, 4)])


def test_quiet_once_every_engine_is_idle(coordinator) -> None:
    coord, push, sub = coordinator
    push.send(encode(EngineLoad(engine_index=0, num_waiting_reqs=0, num_running_reqs=2)))
    _wait_for_loads(sub, [(0, 2), (0, 0)])
    push.send(encode(EngineLoad(engine_index=0, num_waiting_reqs=0, num_running_reqs=0)))
    _wait_for_loads(sub, [(0, 0), (0, 0)])
    # All idle: nothing more until something changes (republishing is every 0.1 s).
    assert not sub.poll(1000)


def test_malformed_loads_are_dropped(coordinator) -> None:
    coord, push, sub = coordinator
    push.send(b"\xc1garbage")
    push.send(encode(EngineLoad(engine_index=7, num_waiting_reqs=1, num_running_reqs=1)))
    push.send(encode(DPStats(loads=[(1, 1)])))
    push.send(encode(EngineLoad(engine_index=1, num_waiting_reqs=0, num_running_reqs=5)))
    _wait_for_loads(sub, [(0, 0), (0, 5)])
    assert coord.proc.is_alive()


def test_shutdown_exits_cleanly_and_removes_socket_files() -> None:
    coord = DPCoordinator(num_engines=3)
    paths = [ipc_path(a) for a in (coord.load_address, coord.stats_update_address)]
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(coord.stats_update_address)
    push = ctx.socket(zmq.PUSH)
    push.connect(coord.load_address)
    push.send(encode(EngineLoad(engine_index=2, num_waiting_reqs=1, num_running_reqs=0)))
    _wait_for_loads(sub, [(0, 0), (0, 0), (1, 0)])  # it is up and serving
    push.close(linger=0)
    sub.close(linger=0)
    ctx.term()
    assert coord.proc.name == "DPCoordinator"
    coord.shutdown(5)
    coord.shutdown(5)  # idempotent
    assert coord.proc.exitcode == 0
    assert not any(p is not None and os.path.exists(p) for p in paths)


def test_rejects_zero_engines() -> None:
    with pytest.raises(ValueError, match="--data-parallel-size"):
        DPCoordinator(num_engines=0)
