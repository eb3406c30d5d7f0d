"""An engine whose step hangs: the API server's stall watchdog turns /health 503 and fails the
stuck requests with 503 within --engine-stall-timeout (+ one watchdog period); a slow but
progressing engine (heartbeats) is not declared hung."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import pytest

from shoal.runtime.addresses import get_engine_client_zmq_addr
from shoal.runtime.managers import APIServerProcessManager
from shoal.serving.args import config_from_args, make_serve_parser
from shoal.serving.engine_proc import CoreEngineProcManager
from shoal.serving.launcher import bind_listen_socket
from tests.serving.api_helpers import TIMEOUT_S, wait_until
from tests.serving.conftest import TINY_FLAGS
from tests.serving.engine_faults import run_engine_core_hanging_on_hang
from tests.serving.test_api_engine_death import _health, _stream_in_background, _wait_for_end

STALL_TIMEOUT_S = 3.0


@pytest.fixture
def url(tiny_model_dir: str) -> Iterator[str]:
    """One API server over one engine that hangs on requests whose id contains "hang"."""
    args = make_serve_parser().parse_args([tiny_model_dir, *TINY_FLAGS])
    args.shutdown_timeout = 0.5
    args.engine_stall_timeout = STALL_TIMEOUT_S
    sock = bind_listen_socket("127.0.0.1", 0)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    engines = CoreEngineProcManager(
        config_from_args(args),
        1,
        ready_timeout_s=TIMEOUT_S,
        target_fn=run_engine_core_hanging_on_hang,
    )
    api_servers: APIServerProcessManager | None = None
    try:
        inputs = [get_engine_client_zmq_addr(True, "127.0.0.1")]
        outputs = [get_engine_client_zmq_addr(True, "127.0.0.1")]
        api_servers = APIServerProcessManager(url, sock, args, 1, inputs, outputs)
        engines.send_addresses(*api_servers.gather_actual_addresses(TIMEOUT_S))
        engines.wait_for_ready(TIMEOUT_S)
        wait_until(lambda: _health(url) == 200)
        yield url
    finally:
        if api_servers is not None:
            api_servers.shutdown(5)
        engines.shutdown(2)  # the hung engine ignores SIGTERM: killed after 2 s
        sock.close()


def test_a_hung_engine_turns_health_503_and_fails_its_requests(url: str) -> None:
    # Progress first: a long stream (many steps, well over the stall timeout in total on a
    # slow machine, each step short) finishes normally.
    model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
    body = {"model": model, "prompt": "slow", "max_tokens": 100, "ignore_eos": True}
    assert httpx.post(f"{url}/v1/completions", json=body, timeout=TIMEOUT_S).status_code == 200
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
