"""`shoal serve` under faults: an engine killed mid-stream, SIGINT under load, an engine that
cannot start, a signal during start-up. Real processes; nothing may be left behind. The
tests of what the frontend sees (an engine's death, a drain) run on both frontends
(`[python]`, `[rust]`)."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.serving.conftest import ServeProcess


class Streams:
    """`n` concurrent streaming completions; records every SSE payload per stream."""

    def __init__(self, url: str, n: int, max_tokens: int) -> None:
        model = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
        self.events: list[list[str]] = [[] for _ in range(n)]
        self.errors: list[BaseException] = []
        self._first = threading.Semaphore(0)
        self.threads = [
            threading.Thread(target=self._run, args=(url, model, i, max_tokens), daemon=True)
            for i in range(n)
        ]
        for t in self.threads:
            t.start()

    def _run(self, url: str, model: str, i: int, max_tokens: int) -> None:
        body = {
            "model": model,
            "prompt": f"stream {i}",
            "max_tokens": max_tokens,
            "stream": True,
            "ignore_eos": True,
        }
        try:
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        if not self.events[i]:
                            self._first.release()
                        self.events[i].append(line[len("data: ") :])
        except httpx.HTTPError as e:  # a dropped connection is a hang-free end too
            self.errors.append(e)

    def wait_first_chunks(self, count: int | None = None, timeout_s: float = 120) -> None:
        """Until `count` streams (default all) have received their first chunk."""
        deadline = time.monotonic() + timeout_s
        for _ in range(len(self.threads) if count is None else count):
            assert self._first.acquire(timeout=max(deadline - time.monotonic(), 0.1))

    def join(self, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        for t in self.threads:
            t.join(max(deadline - time.monotonic(), 0.1))
        assert not any(t.is_alive() for t in self.threads), "a stream hung"

    @staticmethod
    def finish_reason(events: list[str]) -> str | None:
        payloads = [json.loads(e) for e in events if e != "[DONE]"]
        reasons = [c["finish_reason"] for p in payloads for c in p.get("choices", [])]
        return reasons[-1] if reasons else None

    @staticmethod
    def error(events: list[str]) -> str | None:
        for e in events:
            if e != "[DONE]" and "error" in (payload := json.loads(e)):
                return str(payload["error"]["message"])
        return None


def test_engine_killed_mid_stream(serve: Callable[..., ServeProcess], frontend: str) -> None:
    server = serve("--data-parallel-size", "2", frontend=frontend)
    assert server.url is not None
    streams = Streams(server.url, n=4, max_tokens=200)
    streams.wait_first_chunks()
    server.child_named("EngineCore_1").kill()  # SIGKILL: no chance to say goodbye
    streams.join()
    code = server.wait(60)
    assert code != 0
    assert "EngineCore_1" in server.log and "died with exit code -9" in server.log
    errors = [Streams.error(ev) for ev in streams.events]
    assert any(errors), f"no stream got an error event: {streams.events}"
    for events, error in zip(streams.events, errors, strict=True):
        # Every stream ends: with an error event, or finished before the failure was seen.
        assert error is not None or Streams.finish_reason(events) == "length"
    assert server.leftovers() == []


def test_sigint_under_load_drains_then_stops_everything(
    serve: Callable[..., ServeProcess], frontend: str
) -> None:
    shutdown_timeout_s = 60.0
    flags = ["--api-server-count", "2", "--shutdown-timeout", str(shutdown_timeout_s)]
    server = serve(*flags, frontend=frontend)
    assert server.url is not None
    streams = Streams(server.url, n=4, max_tokens=60)
    streams.wait_first_chunks()
    started = time.monotonic()
    server.proc.send_signal(signal.SIGINT)
    streams.join()
    assert server.wait(shutdown_timeout_s + 30) == 0
    elapsed_s = time.monotonic() - started
    # In-flight requests were drained to completion, not cut off.
    assert [Streams.finish_reason(ev) for ev in streams.events] == ["length"] * 4
    assert not streams.errors
    assert elapsed_s < shutdown_timeout_s  # it did not wait out the whole drain window
    assert server.leftovers() == []
    assert "received SIGINT" in server.log


def test_engine_that_cannot_start_is_named(
    serve: Callable[..., ServeProcess], tmp_path: Path, tiny_model_dir: str
) -> None:
    # The engine cannot build this model; the API server's tokenizer is fine.
    (tmp_path / "config.json").write_text('{"architectures": ["NoSuchModel"]}')
    server = serve("--tokenizer", tiny_model_dir, model=str(tmp_path), wait_ready=False)
    code = server.wait(120)
    assert code != 0
    assert "EngineCore_0" in server.log and "exited with code 1" in server.log
    assert "shoal is ready" not in server.log
    assert server.leftovers() == []


def test_sigterm_during_start_up_stops_cleanly(serve: Callable[..., ServeProcess]) -> None:
    server = serve("--data-parallel-size", "2", wait_ready=False)
    server.wait_for_log(r"started 2 engine process", 120)
    server.seen_pids |= {p.pid for p in server.descendants()}
    assert server.stop(signal.SIGTERM, 60) == 0
    assert "shoal is ready" not in server.log
    assert server.leftovers() == []


def test_sigint_with_short_drain_cuts_long_requests_off(
    serve: Callable[..., ServeProcess], frontend: str
) -> None:
    # One running sequence: 4 long streams take far longer than the 1 s drain window.
    server = serve("--shutdown-timeout", "1", "--max-num-seqs", "1", frontend=frontend)
    assert server.url is not None
    streams = Streams(server.url, n=4, max_tokens=240)
    streams.wait_first_chunks(count=1)
    started = time.monotonic()
    server.proc.send_signal(signal.SIGINT)
    streams.join(60)  # every stream ends: finished, aborted, or its connection closed
    assert server.wait(60) == 0
    assert time.monotonic() - started < 30  # 1 s drain + exit grace, not the requests' length
    unfinished = [ev for ev in streams.events if Streams.finish_reason(ev) != "length"]
    assert unfinished, "the drain window was not short enough to cut anything off"
    assert server.leftovers() == []
