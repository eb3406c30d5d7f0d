"""/metrics across 2 API servers, client disconnects aborting in the engine, SIGTERM draining.

On both frontends (`[python]`, `[rust]`: one native process instead of the 2 API servers)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator

import httpx
import openai
import pytest

from tests.serving.api_helpers import (
    TIMEOUT_S,
    get_metrics,
    metric,
    running_server,
    sse_payloads,
    wait_until,
)
from tests.serving.conftest import ServeProcess

LONG = {"max_tokens": 200, "ignore_eos": True, "temperature": 0}


@pytest.fixture(scope="module")
def server(tiny_model_dir: str, frontend: str) -> Iterator[ServeProcess]:
    with running_server(tiny_model_dir, "--api-server-count", "2", frontend=frontend) as server:
        yield server


@pytest.fixture(scope="module")
def model(url: str) -> str:
    return httpx.get(f"{url}/v1/models").json()["data"][0]["id"]


def _without_process_metrics(text: str) -> str:
    """The run's figures: `process_*` samples are each process's own (CPU time moves)."""
    return "\n".join(line for line in text.splitlines() if "process_" not in line)


def _metrics_from_every_server(url: str, num_servers: int) -> dict[str, str]:
    """/metrics as answered by each of `num_servers` API servers (fresh connections land on
    any), without the process figures."""
    seen: dict[str, str] = {}
    for _ in range(200):
        text, role = get_metrics(url)
        seen[role] = _without_process_metrics(text)
        if len(seen) == num_servers:
            return seen
    pytest.fail(f"only {sorted(seen)} answered /metrics")


def _idle(url: str) -> Callable[[], bool]:
    def check() -> bool:
        text, _ = get_metrics(url)
        return (
            metric(text, "num_requests_running", 'engine="0"') == 0
            and metric(text, "num_requests_waiting", 'engine="0"') == 0
            and metric(text, "kv_cache_blocks_free", 'engine="0"')
            == metric(text, "kv_cache_blocks_total", 'engine="0"')
        )

    return check


def test_every_api_server_reports_the_same_totals(url: str, model: str, frontend: str) -> None:
    before, _ = get_metrics(url)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=TIMEOUT_S)
    prompts = ["a", "b c", "d e f", "g h i j"]
    threads = [
        threading.Thread(
            target=client.completions.create,
            kwargs={
                "model": model,
                "prompt": p,
                "max_tokens": 5,
                "extra_body": {"ignore_eos": True},
            },
        )
        for p in prompts
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wait_until(_idle(url))
    # The native frontend is one process for every connection.
    texts = _metrics_from_every_server(url, 2 if frontend == "python" else 1)
    first = next(iter(texts.values()))
    assert all(text == first for text in texts.values())

    def grew(name: str, labels: str = "") -> float:
        return metric(first, name, labels) - metric(before, name, labels)

    assert grew("requests_received_total") == 4
    assert grew("request_success_total", 'finished_reason="length"') == 4
    assert grew("generation_tokens_total") == 20
    assert grew("time_to_first_token_seconds_count") == 4
    assert grew("inter_token_latency_seconds_count") == 16
    assert grew("e2e_request_latency_seconds_count") == 4
    for name in ("queue", "prefill", "decode", "inference"):
        assert grew(f"request_{name}_time_seconds_count") == 4
    assert grew("request_generation_tokens_sum") == 20
    assert grew("request_params_max_tokens_sum") == 20
    assert metric(first, "kv_cache_blocks_total", 'engine="0"') == 256
    assert metric(first, "iteration_generation_requests", 'engine="0"') >= 0
    # Every step that scheduled tokens: at least one per generated token past the prefills.
    assert grew("iteration_tokens_total_count") >= 4
    assert grew("prefix_cache_queries_total") >= grew("prompt_tokens_total") > 0


def test_streaming_client_disconnect_aborts_the_request(url: str, model: str) -> None:
    before, _ = get_metrics(url)
    body = {"model": model, "prompt": "Tell me a long story", "stream": True, **LONG}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=TIMEOUT_S) as r:
        events = sse_payloads(r)
        next(events)
        next(events)
    # The connection is closed: the engine must drop the request and free its KV blocks.
    _expect_one_abort(url, before)


def test_non_streaming_client_disconnect_aborts_the_request(url: str, model: str) -> None:
    before, _ = get_metrics(url)
    body = {"model": model, "prompt": "Another long story", **LONG}
    # The tiny model needs far more than 50 ms for 200 tokens: the client gives up first.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", json=body, timeout=httpx.Timeout(5, read=0.05))
    _expect_one_abort(url, before)


def _expect_one_abort(url: str, before: str) -> None:
    def aborted() -> bool:
        text, _ = get_metrics(url)
        return metric(text, "request_success_total", 'finished_reason="abort"') == (
            metric(before, "request_success_total", 'finished_reason="abort"') + 1
        )

    wait_until(aborted)
    wait_until(_idle(url))
    after, _ = get_metrics(url)
    assert metric(after, "request_success_total", 'finished_reason="length"') == metric(
        before, "request_success_total", 'finished_reason="length"'
    )
    assert (
        metric(after, "generation_tokens_total") - metric(before, "generation_tokens_total")
        < LONG["max_tokens"]
    )


def test_sigterm_lets_an_in_flight_stream_finish(
    serve: Callable[..., ServeProcess], frontend: str
) -> None:
    server = serve("--shutdown-timeout", "30", frontend=frontend)
    url = server.url
    model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
    body = {"model": model, "prompt": "Drain me", "stream": True, **LONG, "max_tokens": 60}
    started, finish = threading.Event(), []

    def consume() -> None:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=TIMEOUT_S) as r:
            for payload in sse_payloads(r):
                started.set()
                finish.append(payload)

    reader = threading.Thread(target=consume)
    reader.start()
    assert started.wait(TIMEOUT_S)
    server.proc.send_signal(signal.SIGTERM)
    reader.join(TIMEOUT_S)
    assert finish[-1] == "[DONE]"
    assert '"finish_reason":"length"' in finish[-2], finish[-2]
    assert server.wait(TIMEOUT_S) == 0
