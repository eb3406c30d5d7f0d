"""An engine whose step hangs: the API server's stall watchdog turns /health 503 and fails the
stuck requests with 503 within --engine-stall-timeout (+ one watchdog period); a slow but
progressing engine (heartbeats) is not declared hung."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import pytest

from shoal.entrypoints.serve_args import config_from_args, make_serve_parser
from shoal.protocol import EngineCoreOutputs, EngineDead
from tests.serving.api_helpers import TIMEOUT_S, hand_built_topology
from tests.serving.conftest import TINY_FLAGS
from tests.serving.engine_faults import SLOW_STEP_S, engine_target, hanging_on_hang
from tests.serving.engine_harness import FakeApiServers, make_request, tiny_config, tokens
from tests.serving.test_api_engine_death import _health, _stream_in_background, _wait_for_end

STALL_TIMEOUT_S = 3.0


@pytest.fixture
def url(tiny_model_dir: str) -> Iterator[str]:
    """One API server over one engine whose runner is slow and hangs on requests whose id
    contains "hang"."""
    args = make_serve_parser().parse_args([tiny_model_dir, *TINY_FLAGS])
    args.shutdown_timeout = 0.5
    args.engine_stall_timeout = STALL_TIMEOUT_S
    # The hung engine ignores SIGTERM: killed after 2 s.
    with hand_built_topology(args, engine_target(hanging_on_hang), engine_grace_s=2) as t:
        yield t.url


def test_a_hung_engine_turns_health_503_and_fails_its_requests(url: str) -> None:
    # Progress first: a long stream (100 steps of SLOW_STEP_S, over the stall timeout in
    # total, each step short) finishes normally.
    model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
    body = {"model": model, "prompt": "slow", "max_tokens": 100, "ignore_eos": True}
    started = time.monotonic()
    assert httpx.post(f"{url}/v1/completions", json=body, timeout=TIMEOUT_S).status_code == 200
    assert time.monotonic() - started >= 100 * SLOW_STEP_S > STALL_TIMEOUT_S
    assert _health(url) == 200

    started = time.monotonic()
    first, payloads = _stream_in_background(url, {"x-request-id": "hang-1"})
    done = _wait_for_end(payloads)
    assert done.wait(TIMEOUT_S), "the stuck stream was never failed"
    elapsed = time.monotonic() - started
    assert payloads[-1] == "[DONE]"
    error = json.loads(payloads[-2])["error"]
    assert error["code"] == 503 and "--engine-stall-timeout" in error["message"]
    assert _health(url) == 503
    reason = httpx.get(f"{url}/health").json()["error"]["message"]
    assert "no progress" in reason
    assert elapsed >= STALL_TIMEOUT_S  # not before the timeout


def test_engine_stall_timeout_is_a_validated_flag() -> None:
    parser = make_serve_parser()
    assert parser.parse_args([]).engine_stall_timeout == 120.0
    with pytest.raises(ValueError, match="--engine-stall-timeout"):
        config_from_args(parser.parse_args(["--engine-stall-timeout", "-1"]))


def test_with_restarts_a_hung_engine_exits_itself(tiny_model_dir: str) -> None:
    """--restart-dead-engines: the engine's own watchdog ends a step that runs past the stall
    timeout by exiting (code 1, dead notice first), so the launcher restarts it like any
    dead engine (tests/serving/test_restart_engines.py covers the restart)."""
    servers = FakeApiServers(num_clients=1)
    manager = servers.start_engines(
        tiny_config(tiny_model_dir), runner_factory=hanging_on_hang, stall_exit_s=2.0
    )
    try:
        servers.wait_ready(manager)
        # 100 short steps of SLOW_STEP_S, over 2 s in total: no exit.
        started = time.monotonic()
        servers.add(0, make_request("fine", max_tokens=100))
        assert len(tokens(servers.collect(0, {"fine"})["fine"])) == 100
        assert time.monotonic() - started >= 100 * SLOW_STEP_S > 2.0
        assert manager.processes[0].exitcode is None
        started = time.monotonic()
        servers.add(0, make_request("hang-1"))
        while isinstance(notice := servers.recv(0, timeout_s=30), EngineCoreOutputs):
            pass
        assert isinstance(notice, EngineDead) and notice.engine_index == 0, notice
        assert "--engine-stall-timeout" in notice.reason
        manager.processes[0].join(30)
        assert manager.processes[0].exitcode == 1
        assert 2.0 <= time.monotonic() - started < 15
    finally:
        manager.shutdown(5)
        servers.close()
