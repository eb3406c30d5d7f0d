"""Admission control and request limits over HTTP: `--max-num-queued-requests` shared by two
API servers (503 + Retry-After, nothing hangs, the count returns to 0), the body size limit
(413 while reading), and the shared counter file itself.

The HTTP tests run against both frontends (`[python]`, `[rust]`: one native process, which
counts for every connection itself)."""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import pytest

from shoal.api.admission import AdmissionControl
from tests.serving.api_helpers import TIMEOUT_S, get_metrics, metric, running_server, wait_until
from tests.serving.conftest import ServeProcess

LIMIT = 2
BODY_LIMIT = 65536


@pytest.fixture(scope="module")
def server(tiny_model_dir: str, frontend: str) -> Iterator[ServeProcess]:
    flags = ["--api-server-count", "2", "--max-num-queued-requests", str(LIMIT)]
    flags += ["--max-request-body-bytes", str(BODY_LIMIT)]
    with running_server(tiny_model_dir, *flags, frontend=frontend) as server:
        yield server


@pytest.fixture(scope="module")
def model(url: str) -> str:
    return httpx.get(f"{url}/v1/models", timeout=TIMEOUT_S).json()["data"][0]["id"]


class _Outcome:
    def __init__(self) -> None:
        self.status = 0
        self.retry_after: str | None = None
        self.body: dict | None = None
        self.finish_reason: str | None = None
        self.first_chunk = threading.Event()


def _stream(url: str, model: str, outcome: _Outcome) -> None:
    body = {"model": model, "prompt": "hi", "max_tokens": 200, "ignore_eos": True, "stream": True}
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=TIMEOUT_S) as r:
            outcome.status = r.status_code
            outcome.retry_after = r.headers.get("retry-after")
            if r.status_code != 200:
                outcome.body = json.loads(r.read())
                return
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    outcome.first_chunk.set()
                    choices = json.loads(line[6:]).get("choices", [])
                    if choices and choices[0]["finish_reason"]:
                        outcome.finish_reason = choices[0]["finish_reason"]
    finally:
        outcome.first_chunk.set()


def test_the_limit_holds_across_api_servers_under_streaming_load(
    url: str, model: str, frontend: str
) -> None:
    outcomes = [_Outcome() for _ in range(10)]
    threads = [threading.Thread(target=_stream, args=(url, model, o)) for o in outcomes]
    # Fill the run first, so the rest surely finds it full, then send them all at once.
    for t, o in zip(threads[:LIMIT], outcomes[:LIMIT], strict=True):
        t.start()
        assert o.first_chunk.wait(TIMEOUT_S)
    for t in threads[LIMIT:]:
        t.start()
    for t in threads:
        t.join(TIMEOUT_S * 2)
    assert not any(t.is_alive() for t in threads), "a request hung"
    served = [o for o in outcomes if o.status == 200]
    refused = [o for o in outcomes if o.status == 503]
    assert len(served) + len(refused) == len(outcomes), [o.status for o in outcomes]
    assert outcomes[0] in served and outcomes[1] in served and refused
    assert all(o.finish_reason == "length" for o in served)
    for o in refused:
        assert o.retry_after == "1"
        assert o.body is not None and o.body["error"]["type"] == "ServiceUnavailableError"
        assert "--max-num-queued-requests" in o.body["error"]["message"]
    # Both servers report the one global count: back to 0, the refusals counted once (the
    # native frontend is one process).
    num_servers = 2 if frontend == "python" else 1
    servers = set()

    def drained_everywhere() -> bool:
        text, name = get_metrics(url)
        servers.add(name)
        assert metric(text, "api_requests_rejected_total") >= len(refused)
        return metric(text, "api_requests_in_flight") == 0 and len(servers) == num_servers

    wait_until(drained_everywhere)


def test_a_body_over_the_limit_is_413_before_it_is_read(url: str, model: str) -> None:
    big = {"model": model, "prompt": "x" * (BODY_LIMIT + 1), "max_tokens": 1}
    response = httpx.post(f"{url}/v1/completions", json=big, timeout=TIMEOUT_S)
    assert response.status_code == 413
    error = response.json()["error"]
    assert error["code"] == 413 and "--max-request-body-bytes" in error["message"]
    # A client that claims a huge body and sends only its head is answered at once.
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=TIMEOUT_S) as conn:
        conn.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000000000\r\n\r\n{"
        )
        head = conn.recv(65536)
    assert head.startswith(b"HTTP/1.1 413"), head


def test_a_body_under_the_limit_is_served(url: str, model: str) -> None:
    body = {"model": model, "prompt": "x " * 50, "max_tokens": 2}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=TIMEOUT_S)
    assert response.status_code == 200, response.text


def test_counters_are_shared_through_the_directory(tmp_path) -> None:
    first = AdmissionControl(2, str(tmp_path), client_index=0, client_count=2)
    second = AdmissionControl(2, str(tmp_path), client_index=1, client_count=2)
    try:
        assert first.try_acquire() and second.try_acquire()
        assert not first.try_acquire() and not second.try_acquire()
        assert first.in_flight() == second.in_flight() == 2
        assert first.rejected() == second.rejected() == 2
        second.release()
        assert first.try_acquire()
        first.release()
        first.release()
        assert second.in_flight() == 0
    finally:
        first.close()
        second.close()


def test_no_limit_admits_everything_and_bad_limits_are_named() -> None:
    control = AdmissionControl(None, None)
    assert all(control.try_acquire() for _ in range(100))
    assert control.in_flight() == 100
    control.close()
    with pytest.raises(ValueError, match="--max-num-queued-requests"):
        AdmissionControl(0, None)


def test_after_close_release_is_a_no_op_and_nothing_is_admitted(tmp_path) -> None:
    # A request task that outlives its server's shutdown still releases its place: the
    # memory it would write is unmapped by then, which must not raise.
    control = AdmissionControl(4, str(tmp_path), client_index=0, client_count=2)
    assert control.try_acquire() and control.try_acquire()
    path = control.path
    control.close()
    control.release()
    assert path is not None and not os.path.exists(path)
    assert not control.try_acquire()
    assert "shutting down" in control.refusal_message()
    assert control.in_flight() == 0 and control.rejected() == 0
    control.close()  # twice: still fine
