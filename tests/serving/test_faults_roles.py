"""kill -9 of each process role of `shoal serve` under load (API server, coordinator, launcher)
and hundreds of clients vanishing mid-stream. Real processes; nothing may be left behind."""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import signal
import tempfile
from collections.abc import Callable

import httpx
import pytest

from tests.serving.api_helpers import get_metrics, metric, wait_until
from tests.serving.conftest import TINY_FLAGS, ServeProcess, start_serve
from tests.serving.test_faults import Streams

TOPOLOGY = ["--api-server-count", "2", "--data-parallel-size", "2"]


@pytest.mark.parametrize("role", ["ApiServer_1", "DPCoordinator"])
def test_kill_9_of_a_role_under_load_stops_the_run_naming_it(
    serve: Callable[..., ServeProcess], role: str
) -> None:
    server = serve(*TOPOLOGY)
    assert server.url is not None
    streams = Streams(server.url, n=4, max_tokens=200)
    streams.wait_first_chunks()
    server.child_named(role).send_signal(signal.SIGKILL)
    streams.join()  # every stream ends (finished, error event or dropped connection)
    assert server.wait(60) != 0
    assert role in server.log and "died with exit code -9" in server.log
    assert server.leftovers() == []


def test_kill_9_of_the_launcher_takes_every_child_with_it(tiny_model_dir: str) -> None:
    # A private IPC base: nothing cleans the socket files of a SIGKILLed launcher (the next
    # run sweeps them), and the suite's leak check watches its own base.
    base = tempfile.mkdtemp(prefix="shoal-kill9-")
    server = start_serve([tiny_model_dir, *TINY_FLAGS, *TOPOLOGY], rpc_base=base)
    try:
        assert server.url is not None
        # launcher, 2 servers, 2 engines, coordinator (+ multiprocessing's resource tracker)
        assert len(server.seen_pids) >= 1 + 2 + 2 + 1
        streams = Streams(server.url, n=2, max_tokens=200)
        streams.wait_first_chunks()
        server.proc.send_signal(signal.SIGKILL)
        assert server.wait(30) == -signal.SIGKILL
        assert server.leftovers(timeout_s=10) == []  # the parent-death watch
        streams.join()
    finally:
        server.kill_everything()
        shutil.rmtree(base, ignore_errors=True)


async def _vanish(client: httpx.AsyncClient, url: str, model: str, i: int) -> None:
    """Stream a long completion and go away after the first chunk or a random moment."""
    body = {"model": model, "prompt": f"client {i}", "max_tokens": 200, "ignore_eos": True}
    body["stream"] = True

    async def first_chunk() -> None:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    return

    # Gone before, or while, the answer started.
    with contextlib.suppress(TimeoutError, httpx.HTTPError):
        await asyncio.wait_for(first_chunk(), timeout=random.uniform(0.05, 2.0))


async def _crowd(url: str, model: str, n: int) -> None:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        await asyncio.gather(*(_vanish(client, url, model, i) for i in range(n)))


def test_hundreds_of_clients_vanishing_mid_stream_leak_no_kv_block(
    serve: Callable[..., ServeProcess],
) -> None:
    server = serve("--api-server-count", "2")
    assert server.url is not None
    url = server.url
    model = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
    random.seed(5)
    asyncio.run(_crowd(url, model, 250))

    def all_blocks_free() -> bool:
        text, _ = get_metrics(url)
        return (
            metric(text, "num_requests_running", 'engine="0"') == 0
            and metric(text, "num_requests_waiting", 'engine="0"') == 0
            and metric(text, "kv_cache_blocks_free", 'engine="0"')
            == metric(text, "kv_cache_blocks_total", 'engine="0"')
            and metric(text, "api_requests_in_flight") == 0
        )

    wait_until(all_blocks_free, timeout_s=120)
    text, _ = get_metrics(url)
    assert metric(text, "request_success_total", 'finished_reason="abort"') > 0
    # Still serving normally afterwards.
    body = {"model": model, "prompt": "after", "max_tokens": 4}
    assert httpx.post(f"{url}/v1/completions", json=body, timeout=60).status_code == 200


def test_a_second_signal_during_the_drain_is_only_logged(
    serve: Callable[..., ServeProcess],
) -> None:
    server = serve("--shutdown-timeout", "60")
    assert server.url is not None
    streams = Streams(server.url, n=2, max_tokens=60)
    streams.wait_first_chunks()
    server.proc.send_signal(signal.SIGTERM)
    server.wait_for_log("received SIGTERM", 30)
    server.proc.send_signal(signal.SIGINT)  # an impatient operator: must not cut the drain
    streams.join()
    assert server.wait(90) == 0
    assert "already shutting down" in server.log
    assert [Streams.finish_reason(ev) for ev in streams.events] == ["length"] * 2
    assert server.leftovers() == []
