"""`shoal top` in a real terminal: tmux at 80x24 against a running server with an API key.
The screen shows the engines' figures, q and Ctrl-C end it with exit code 0, a wrong key is
named on screen. `render_lines` alone: never wider than the terminal."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from shoal.entrypoints.top import render_lines
from tests.serving.api_helpers import TIMEOUT_S, running_server, wait_until

KEY = "top-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}

needs_tmux = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")


@pytest.fixture(scope="module")
def url(tiny_model_dir: str) -> Iterator[str]:
    with running_server(tiny_model_dir, "--data-parallel-size", "2", "--api-key", KEY) as server:
        assert server.url is not None
        yield server.url


class Terminal:
    """One tmux server (its own socket under the test's tmp dir) running one command."""

    def __init__(self, tmp_path: Path, command: list[str]) -> None:
        self.socket = str(tmp_path / "tmux.sock")
        self.status_file = tmp_path / "status"
        shell = " ".join(command) + f"; echo $? > {self.status_file}"
        self._tmux("new-session", "-d", "-x", "80", "-y", "24", shell)

    def _tmux(self, *args: str) -> str:
        result = subprocess.run(
            ["tmux", "-S", self.socket, *args], capture_output=True, text=True, timeout=30
        )
        return result.stdout

    def screen(self) -> str:
        return self._tmux("capture-pane", "-p")

    def wait_for(self, predicate: Callable[[str], bool]) -> str:
        deadline = time.monotonic() + TIMEOUT_S
        while not predicate(screen := self.screen()):
            assert time.monotonic() < deadline, f"not on the screen in time:\n{screen}"
            time.sleep(0.1)
        return screen

    def keys(self, *keys: str) -> None:
        self._tmux("send-keys", *keys)

    def exit_status(self) -> int:
        wait_until(self.status_file.exists)
        wait_until(lambda: self.status_file.read_text().strip() != "")
        return int(self.status_file.read_text())

    def close(self) -> None:
        self._tmux("kill-server")


def _top(url: str, *flags: str) -> list[str]:
    return [sys.executable, "-m", "shoal.entrypoints.cli", "top", url, *flags]


@needs_tmux
@pytest.mark.parametrize("quit_keys", [("q",), ("C-c",)], ids=["q", "ctrl-c"])
def test_top_shows_the_engines_and_quits_cleanly(
    url: str, tmp_path: Path, quit_keys: tuple[str, ...]
) -> None:
    model = httpx.get(f"{url}/v1/models", headers=AUTH).json()["data"][0]["id"]
    body = {"model": model, "prompt": "top", "max_tokens": 6, "ignore_eos": True}
    for _ in range(3):
        response = httpx.post(f"{url}/v1/completions", json=body, headers=AUTH, timeout=TIMEOUT_S)
        assert response.status_code == 200
    received = httpx.get(f"{url}/dashboard/data", headers=AUTH).json()["requests"]
    terminal = Terminal(tmp_path, _top(url, "--api-key", KEY, "--interval", "0.2"))
    try:
        screen = terminal.wait_for(lambda s: "EngineCore_1" in s)
        lines = screen.splitlines()
        assert lines[0].startswith(f"shoal top  {url}")
        engine_rows = [line.split() for line in lines if line.startswith("EngineCore_")]
        assert [row[:2] for row in engine_rows] == [["EngineCore_0", "up"], ["EngineCore_1", "up"]]
        # RUN and WAIT of idle engines, and the requests the server received.
        assert all(row[2:4] == ["0", "0"] for row in engine_rows)
        assert f"received {received['received_total']:.0f}" in screen
        assert "ApiServer_0" in screen and "time to first token" in screen
        assert all(len(line) <= 80 for line in lines)
        terminal.keys(*quit_keys)
        assert terminal.exit_status() == 0
    finally:
        terminal.close()


@needs_tmux
def test_top_names_a_wrong_key(url: str, tmp_path: Path) -> None:
    terminal = Terminal(tmp_path, _top(url, "--api-key", "wrong"))
    try:
        terminal.wait_for(lambda s: "HTTP 401" in s and "--api-key" in s)
        terminal.keys("q")
        assert terminal.exit_status() == 0
    finally:
        terminal.close()


def test_bad_arguments_name_the_flag() -> None:
    for args, flag in ((["ftp://host"], "url"), (["--interval", "0"], "--interval")):
        result = subprocess.run(
            [sys.executable, "-m", "shoal.entrypoints.cli", "top", *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 2
        assert flag in result.stderr


def _view(num_engines: int) -> dict[str, object]:
    latency = {"p50": 0.0123, "p90": 0.05, "p99": 1.5, "count": 1000.0}
    engine = {
        "state": "up",
        "running": 123.0,
        "waiting": 4567.0,
        "kv_cache_usage": 0.999,
        "prefix_cache_hit_rate": None,
        "prompt_tokens_per_s": 123456.7,
        "generation_tokens_per_s": 98765.4,
        "ttft_s": latency,
        "itl_s": latency,
    }
    return {
        "model": "a-model-with-a-rather-long-name-that-goes-on-and-on" * 2,
        "engines": [{**engine, "engine": k} for k in range(num_engines)],
        "totals": {
            "running": 1.0,
            "waiting": 2.0,
            "prompt_tokens_per_s": 3.0,
            "generation_tokens_per_s": 4.0,
        },
        "latency_window_s": 300.0,
        "latency": {"ttft_s": latency, "itl_s": latency},
        "requests": {
            "received_total": 10.0,
            "in_flight": 1,
            "rejected_total": 0,
            "finished_total": {"stop": 1.0, "length": 2.0, "abort": 3.0, "error": 4.0},
        },
        "servers": [{"name": f"ApiServer_{i}", "in_flight": i} for i in range(4)],
        "errors": [{"time": time.time(), "server": 0, "kind": "engine dead", "message": "x" * 200}],
    }


def test_every_line_fits_80_columns_and_24_rows_at_8_engines() -> None:
    lines = render_lines(_view(8), None, "http://127.0.0.1:8000")
    assert all(len(line) < 80 for line in lines)
    assert len(lines) <= 24
    many = render_lines(_view(20), "timed out", "http://127.0.0.1:8000")
    assert "... 12 more engines" in many
    assert any("timed out" in line for line in many)
