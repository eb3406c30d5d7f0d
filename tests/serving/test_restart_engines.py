"""`shoal serve --restart-dead-engines`: a killed engine is replaced while the others keep
serving; only its requests fail (503 + Retry-After, or an error event); crash loops and
signals during a restart still stop the run cleanly. Real processes; nothing may be left."""

from __future__ import annotations

import re
import shutil
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil
import pytest

from shoal.entrypoints.serve_args import make_serve_parser
from shoal.runtime.restart import EngineRestartPolicy as RestartPolicy
from tests.serving.api_helpers import TIMEOUT_S, wait_until
from tests.serving.conftest import ServeProcess
from tests.serving.test_faults import Streams

RESTART = "--restart-dead-engines"
# Long enough that every stream is still running when its engine is killed.
LONG_TOKENS = 240


def _engine_gauges(url: str, name: str) -> dict[int, float]:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    pattern = re.compile(rf'^shoal:{name}{{[^}}]*engine="(\d+)"}} (\S+)$', re.M)
    return {int(k): float(v) for k, v in pattern.findall(text)}


def _health(url: str) -> httpx.Response:
    return httpx.get(f"{url}/health", timeout=10)


def _model(url: str) -> str:
    return str(httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"])


def _complete(url: str, max_tokens: int = 4, stream: bool = False) -> httpx.Response:
    body = {"model": _model(url), "prompt": "hi", "max_tokens": max_tokens, "ignore_eos": True}
    if stream:
        body["stream"] = True
    return httpx.post(f"{url}/v1/completions", json=body, timeout=TIMEOUT_S)


def _replacement(server: ServeProcess, role: str, old_pid: int) -> psutil.Process:
    """The new process `role` (another pid than `old_pid`), once it is running; recorded
    for the leftover check."""
    found: list[psutil.Process] = []

    def started() -> bool:
        try:
            found[:] = [server.child_named(role)]
        except AssertionError:
            return False
        return found[0].pid != old_pid

    wait_until(started, timeout_s=60)
    server.seen_pids.add(found[0].pid)
    return found[0]


def _wait_both_engines_running(url: str) -> dict[int, float]:
    running: dict[int, float] = {}

    def both() -> bool:
        running.update(_engine_gauges(url, "num_requests_running"))
        return len(running) == 2 and min(running.values()) >= 1

    wait_until(both)
    return running


def _assert_retry_later(response: httpx.Response, *words: str) -> None:
    assert response.status_code == 503, response.text
    assert int(response.headers["retry-after"]) >= 1
    error = response.json()["error"]
    assert error["type"] == "ServiceUnavailableError" and error["code"] == 503
    for word in words:
        assert word in error["message"], error["message"]


def test_a_killed_engine_is_restarted_while_the_other_keeps_streaming(
    serve: Callable[..., ServeProcess],
) -> None:
    server = serve("--data-parallel-size", "2", RESTART)
    assert server.url is not None
    url = server.url
    streams = Streams(url, n=4, max_tokens=LONG_TOKENS)
    streams.wait_first_chunks()
    on_engine_1 = _wait_both_engines_running(url)[1]
    old = server.child_named("EngineCore_1")
    old_pid = old.pid
    old.kill()  # SIGKILL: it says nothing; the launcher tells the API servers
    # Hold the replacement in its start-up, so "engine 1 is down" lasts for the checks below.
    new = _replacement(server, "EngineCore_1", old_pid)
    new.suspend()
    try:
        wait_until(lambda: _health(url).headers.get("content-type") == "application/json")
        health = _health(url)
        assert health.status_code == 200  # engine 0 still serves: degraded, not down
        assert health.json()["status"] == "degraded"
        assert "engine 1 died" in health.json()["engines_down"]["1"]
        # New requests go to the live engine meanwhile.
        for _ in range(3):
            assert _complete(url).status_code == 200
        streams.join()
    finally:
        new.resume()
    errors = [Streams.error(events) for events in streams.events]
    failed = [e for e in errors if e is not None]
    # Exactly the streams of engine 1 failed, with a message that says so and to retry.
    assert len(failed) == on_engine_1, streams.events
    for message in failed:
        assert "engine 1 died" in message and "retry" in message, message
    for events, error in zip(streams.events, errors, strict=True):
        if error is None:
            assert Streams.finish_reason(events) == "length", events
            assert len(events) > LONG_TOKENS // 2  # streamed to the end
    assert not streams.errors

    server.wait_for_log(r"EngineCore_1 \(pid \d+\) is ready again", 120)
    wait_until(lambda: _health(url).status_code == 200 and _health(url).content == b"")
    # Both engines take requests again.
    again = Streams(url, n=4, max_tokens=LONG_TOKENS)
    again.wait_first_chunks()
    _wait_both_engines_running(url)
    again.join()
    assert [Streams.finish_reason(ev) for ev in again.events] == ["length"] * 4
    assert server.child_named("EngineCore_1").pid == new.pid
    assert f"EngineCore_1 (PID: {old_pid}) died with exit code -9; restarting it" in server.log

    assert server.stop(signal.SIGTERM, 60) == 0
    assert server.leftovers() == []


def test_the_only_engine_killed_means_503_with_retry_after_until_it_is_back(
    serve: Callable[..., ServeProcess],
) -> None:
    server = serve(RESTART)
    assert server.url is not None
    url = server.url
    assert _health(url).status_code == 200
    in_flight: list[httpx.Response] = []
    thread = threading.Thread(
        target=lambda: in_flight.append(_complete(url, max_tokens=LONG_TOKENS)), daemon=True
    )
    thread.start()
    wait_until(lambda: _engine_gauges(url, "num_requests_running").get(0, 0) >= 1)
    old = server.child_named("EngineCore_0")
    old_pid = old.pid
    old.kill()
    new = _replacement(server, "EngineCore_0", old_pid)
    new.suspend()
    try:
        thread.join(TIMEOUT_S)
        (response,) = in_flight
        _assert_retry_later(response, "engine 0 died", "retry")
        # No engine can serve: health and new requests (streaming too) are 503 + Retry-After.
        _assert_retry_later(_health(url), "no engine is available")
        _assert_retry_later(_complete(url), "no engine is available")
        _assert_retry_later(_complete(url, stream=True), "no engine is available")
    finally:
        new.resume()
    server.wait_for_log(r"EngineCore_0 \(pid \d+\) is ready again", 120)
    wait_until(lambda: _health(url).status_code == 200)
    response = _complete(url, max_tokens=8)
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 8
    assert httpx.get(f"{url}/debug/kv_cache").status_code == 404  # dev mode is off
    assert server.stop(signal.SIGTERM, 60) == 0
    assert server.leftovers() == []


def test_sigterm_during_a_restart_stops_everything(serve: Callable[..., ServeProcess]) -> None:
    server = serve("--data-parallel-size", "2", RESTART, "--shutdown-timeout", "1")
    old = server.child_named("EngineCore_1")
    old_pid = old.pid
    old.kill()
    # Held in its start-up: the restart is surely in progress when the signal comes, and
    # the stuck replacement must still be stopped (killed at the deadline).
    _replacement(server, "EngineCore_1", old_pid).suspend()
    started = time.monotonic()
    assert server.stop(signal.SIGTERM, 60) == 0
    assert time.monotonic() - started < 1 + 2 + 5  # drain + exit grace + slack
    assert "is ready again" not in server.log
    assert server.leftovers() == []


def test_other_children_stay_watched_during_a_restart(
    serve: Callable[..., ServeProcess],
) -> None:
    server = serve("--data-parallel-size", "2", RESTART)
    old = server.child_named("EngineCore_1")
    old.kill()
    _replacement(server, "EngineCore_1", old.pid).suspend()  # the restart stays in progress
    server.child_named("DPCoordinator").kill()
    assert server.wait(60) == 1
    assert "Process DPCoordinator" in server.log and "died with exit code -9" in server.log
    assert server.leftovers() == []  # the held replacement is killed too


def test_an_engine_that_cannot_restart_ends_the_run_naming_it(
    serve: Callable[..., ServeProcess], tmp_path: Path, tiny_model_dir: str
) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    server = serve("--data-parallel-size", "2", RESTART, model=str(model))
    # The model files go bad (a broken deploy): the replacement fails while loading.
    (model / "config.json").write_text('{"architectures": ["NoSuchModel"]}')
    old = server.child_named("EngineCore_1")
    old.kill()
    assert server.wait(120) == 1
    assert f"EngineCore_1 (PID: {old.pid}) died with exit code -9; restarting it" in server.log
    assert re.search(r"EngineCore_1 \(pid \d+\) exited with code 1 after a restart", server.log)
    assert server.leftovers() == []


def test_too_many_restarts_in_the_window_end_the_run(
    serve: Callable[..., ServeProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHOAL_MAX_ENGINE_RESTARTS", "1")
    server = serve(RESTART)
    assert server.url is not None
    first = server.child_named("EngineCore_0")
    first.kill()
    second = _replacement(server, "EngineCore_0", first.pid)
    server.wait_for_log(r"EngineCore_0 \(pid \d+\) is ready again", 120)
    wait_until(lambda: _health(server.url or "").status_code == 200)
    second.kill()
    assert server.wait(60) == 1
    assert re.search(
        rf"EngineCore_0 \(PID: {second.pid}\) died with exit code -9; not restarting it again: "
        r"it was restarted 1 time\(s\) in the last 600 s",
        server.log,
    )
    assert server.leftovers() == []


def test_restart_policy_counts_restarts_per_engine_within_the_window() -> None:
    policy = RestartPolicy(max_restarts=2, window_s=10.0)
    assert policy.allow(0, 100.0) and policy.allow(0, 105.0)
    assert not policy.allow(0, 109.0)  # a third within 10 s
    assert policy.allow(1, 109.0)  # another engine has its own budget
    assert policy.allow(0, 110.5)  # the first restart left the window
    assert policy.restarts(0) == 2


def test_the_flag_is_off_by_default_and_documented() -> None:
    parser = make_serve_parser()
    assert parser.parse_args([]).restart_dead_engines is False
    assert parser.parse_args([RESTART]).restart_dead_engines is True
    assert RESTART in parser.format_help()
