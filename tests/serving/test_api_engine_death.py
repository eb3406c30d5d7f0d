"""An engine that dies under an API server: streams end with an error, /health turns 503.

The topology is built by hand (APIServerProcessManager + CoreEngineProcManager, no launcher),
so nothing tears the API server down when its engine dies and its behaviour can be observed.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Iterator

import httpx
import pytest

from shoal.entrypoints.serve_args import make_serve_parser
from tests.serving.api_helpers import (
    TIMEOUT_S,
    Topology,
    hand_built_topology,
    health_status,
    sse_payloads,
    wait_until,
)
from tests.serving.conftest import TINY_FLAGS
from tests.serving.engine_faults import engine_target, failing_on_boom

LONG = {"prompt": "A long answer", "max_tokens": 200, "ignore_eos": True, "stream": True}


@pytest.fixture
def topology(tiny_model_dir: str) -> Iterator[Topology]:
    args = make_serve_parser().parse_args([tiny_model_dir, *TINY_FLAGS])
    args.shutdown_timeout = 1.0
    with hand_built_topology(args, engine_target(failing_on_boom), engine_grace_s=10) as t:
        yield t


_health = health_status


def _stream_in_background(url: str, headers: dict[str, str]) -> tuple[threading.Event, list[str]]:
    first, payloads = threading.Event(), []
    model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]

    def consume() -> None:
        body = {"model": model, **LONG}
        with httpx.stream(
            "POST", f"{url}/v1/completions", json=body, headers=headers, timeout=TIMEOUT_S
        ) as r:
            for payload in sse_payloads(r):
                payloads.append(payload)
                first.set()
        first.set()

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    return first, payloads


def _expect_dead(url: str, payloads: list[str], reader_done: threading.Event) -> None:
    assert reader_done.wait(TIMEOUT_S), "the stream hung after the engine died"
    assert payloads[-1] == "[DONE]"
    error = json.loads(payloads[-2])["error"]
    assert error["code"] == 503 and "engine" in error["message"]
    wait_until(lambda: _health(url) == 503)
    body = httpx.get(f"{url}/health").json()["error"]
    assert body["type"] == "ServiceUnavailableError"
    model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
    refused = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": "x"})
    assert refused.status_code == 503
    assert "engine" in refused.json()["error"]["message"]


def _wait_for_end(payloads: list[str]) -> threading.Event:
    done = threading.Event()
    threading.Thread(
        target=lambda: (
            wait_until(lambda: bool(payloads) and payloads[-1] == "[DONE]"),
            done.set(),
        ),
        daemon=True,
    ).start()
    return done


def test_killed_engine_fails_streams_and_health(topology: Topology) -> None:
    first, payloads = _stream_in_background(topology.url, {})
    assert first.wait(TIMEOUT_S)
    engine_pid = topology.engines.processes[0].pid
    assert engine_pid is not None
    os.kill(engine_pid, signal.SIGKILL)  # no ENGINE_CORE_DEAD: the lost connection tells
    _expect_dead(topology.url, payloads, _wait_for_end(payloads))


def test_engine_fatal_error_fails_streams_and_health(topology: Topology) -> None:
    # The failing request itself makes the engine die (ENGINE_CORE_DEAD, then exit 1).
    first, payloads = _stream_in_background(topology.url, {"x-request-id": "boom"})
    _expect_dead(topology.url, payloads, _wait_for_end(payloads))
    topology.engines.processes[0].join(TIMEOUT_S)
    assert topology.engines.processes[0].exitcode == 1
