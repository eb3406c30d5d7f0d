"""`shoal serve` with 2 API servers and 2 engines (+ the DP coordinator), end to end over HTTP.

On both frontends (`[python]`, `[rust]`: one native process instead of the 2 API servers,
routing over the same coordinator's loads)."""

from __future__ import annotations

import re
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.serving.conftest import (
    RUST_FRONTEND_BINARY,
    TINY_FLAGS,
    ServeProcess,
    files_under,
    frontend_flags,
    start_serve,
)

ROLES = ["ApiServer_0", "ApiServer_1", "EngineCore_0", "EngineCore_1", "DPCoordinator"]
# One running sequence per engine: concurrent requests queue, so the load stays visible.
FLAGS = ["--api-server-count", "2", "--data-parallel-size", "2", "--max-num-seqs", "1"]
NO_EOS = {"ignore_eos": True}


@pytest.fixture(scope="module")
def server(tiny_model_dir: str, frontend: str) -> Iterator[ServeProcess]:
    extra_flags, env = frontend_flags(frontend)
    rpc_base = tempfile.mkdtemp(prefix="shoal-topology-")
    argv = [tiny_model_dir, *TINY_FLAGS, *FLAGS, "--shutdown-timeout", "5", *extra_flags]
    server = start_serve(argv, rpc_base=rpc_base, env=env)
    try:
        yield server
    finally:
        if server.proc.poll() is None:
            server.stop(signal.SIGTERM, 60)
        server.kill_everything()
        leftovers = files_under(rpc_base)
        shutil.rmtree(rpc_base, ignore_errors=True)
    assert leftovers == [], "socket or metrics files left behind"


@pytest.fixture(scope="module")
def client(server: ServeProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=60)


def _model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def _engine_gauges(url: str, name: str) -> dict[int, float]:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    pattern = re.compile(rf'^shoal:{name}{{[^}}]*engine="(\d+)"}} (\S+)$', re.M)
    return {int(k): float(v) for k, v in pattern.findall(text)}


def test_every_role_runs_as_a_named_process(server: ServeProcess, frontend: str) -> None:
    if frontend == "python":
        roles = ROLES
    else:  # the native frontend in place of the API servers
        roles = [r for r in ROLES if not r.startswith("ApiServer_")]
        names = {p.name() for p in server.descendants()}
        assert RUST_FRONTEND_BINARY in names, names
    for role in roles:
        assert server.child_named(role).is_running()
    assert "shoal is ready at http://127.0.0.1:" in server.log


def test_completion_and_streaming_chat(server: ServeProcess, client: openai.OpenAI) -> None:
    model = _model(client)
    completion = client.completions.create(
        model=model, prompt="Hello", max_tokens=6, extra_body=NO_EOS
    )
    assert completion.usage is not None and completion.usage.completion_tokens == 6
    assert completion.choices[0].finish_reason == "length"
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=5,
        stream=True,
        extra_body=NO_EOS,
    )
    finishes = [c.choices[0].finish_reason for c in stream if c.choices]
    assert finishes[-1] == "length"


def test_concurrent_requests_spread_over_both_engines(server: ServeProcess) -> None:
    """8 long streams at once: each engine runs one and queues the rest; the least-loaded
    routing of the API servers (own counts + the coordinator's DPStats) splits them."""
    assert server.url is not None
    url = server.url
    model = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
    stop = threading.Event()
    first_chunks = threading.Semaphore(0)
    errors: list[BaseException] = []

    def stream_one(i: int) -> None:
        body = {
            "model": model,
            "prompt": f"request {i}",
            "max_tokens": 200,
            "stream": True,
            "ignore_eos": True,
        }
        try:
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
                sent = False
                for line in r.iter_lines():
                    if line.startswith("data:") and not sent:
                        first_chunks.release()
                        sent = True
                    if stop.is_set():
                        return  # disconnect: the API server aborts the request
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=stream_one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 120
        while True:
            running = _engine_gauges(url, "num_requests_running")
            waiting = _engine_gauges(url, "num_requests_waiting")
            loads = {k: running[k] + waiting[k] for k in running}
            if sum(loads.values()) == 8 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert sum(loads.values()) == 8, loads
        assert min(loads.values()) >= 2, f"unbalanced: {loads}"
        assert all(running[k] == 1 for k in running), running
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    assert not errors, errors
    # Disconnected streams are aborted in the engines: both go idle again.
    deadline = time.monotonic() + 60
    while sum(_engine_gauges(url, "num_requests_running").values()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert sum(_engine_gauges(url, "num_requests_running").values()) == 0


def test_a_second_server_on_the_same_port_fails_clearly(
    server: ServeProcess, tiny_model_dir: str
) -> None:
    assert server.url is not None
    port = server.url.rsplit(":", 1)[1]
    second = start_serve([tiny_model_dir, *TINY_FLAGS, "--port", port], wait_ready=False)
    try:
        code = second.wait(60)
    finally:
        second.kill_everything()
    assert code != 0
    assert f"127.0.0.1:{port} is already in use" in second.log
    assert "shoal is ready" not in second.log
    # The first server is untouched.
    assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200


def test_sigint_stops_every_process(server: ServeProcess, frontend: str) -> None:
    pids = {p.pid for p in server.descendants()}
    # The native frontend: one process in place of the 2 API servers.
    assert len(pids) >= (len(ROLES) if frontend == "python" else len(ROLES) - 1)
    assert server.stop(signal.SIGINT, 60) == 0
    assert server.leftovers() == []
    assert "shoal stopped" in server.log
