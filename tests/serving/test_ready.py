"""Ready means ready: a server that says it is ready answers its first request at once, and
nothing a killed start-up leaves behind blocks the next one (docs/serving.md, "Ready means
ready").

Every server here runs with a fresh home directory and no C++ compiler reachable (PATH holds
only the virtual environment's bin, CC and CXX point at /bin/false), so a kernel compiled or
a cache written at run time shows up: the engine must still load the native kernels
(installed with shoal) and the home directory must stay empty.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.serving.conftest import TINY_FLAGS, ServeProcess, start_serve

pytestmark = pytest.mark.slow

# A hang detector, not a speed target: before kernels were built at install, the first
# request compiled them (40-110 s) or waited for ever on a dead process's lock file.
FIRST_REQUEST_DEADLINE_S = 30.0
NATIVE_LINE = re.compile(r"native kernels: (avx2|avx512|avx512bf16)\b")


def _no_compiler_env(home: Path) -> dict[str, str]:
    return {
        "HOME": str(home),
        "XDG_CACHE_HOME": "",
        "XDG_CONFIG_HOME": "",
        "TORCH_EXTENSIONS_DIR": "",
        "PATH": os.path.dirname(sys.executable),
        "CC": "/bin/false",
        "CXX": "/bin/false",
    }


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "home"
    path.mkdir()
    return path


@pytest.fixture
def servers(tiny_model_dir: str, tmp_path: Path) -> Iterator[list[ServeProcess]]:
    """Servers a test starts; whatever is left is killed after it. Each uses a private IPC
    base (a start killed by SIGKILL cannot remove its socket files: the test checks them)."""
    started: list[ServeProcess] = []
    yield started
    for server in started:
        server.kill_everything()


def _start(
    servers: list[ServeProcess], model: str, home: Path, rpc_base: Path, wait_ready: bool
) -> ServeProcess:
    rpc_base.mkdir(exist_ok=True)
    server = start_serve(
        [model, *TINY_FLAGS],
        wait_ready=wait_ready,
        rpc_base=str(rpc_base),
        env=_no_compiler_env(home),
        new_session=True,
    )
    servers.append(server)
    return server


def _model(url: str) -> str:
    return str(httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"])


def _first_request_is_prompt(url: str) -> None:
    """/health 200, then a completion answered well inside the deadline."""
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200
    start = time.monotonic()
    body = {"model": _model(url), "prompt": "hello there", "max_tokens": 8, "temperature": 0}
    response = httpx.post(
        f"{url}/v1/completions",
        json=body,
        timeout=FIRST_REQUEST_DEADLINE_S,
    )
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 8
    assert time.monotonic() - start < FIRST_REQUEST_DEADLINE_S


def _kill_group(server: ServeProcess) -> None:
    server.seen_pids |= {p.pid for p in server.descendants()}
    os.killpg(server.proc.pid, signal.SIGKILL)
    server.wait(30)
    assert server.leftovers() == [], "a process outlived its killed process group"


def _stream_then_kill(server: ServeProcess) -> None:
    """Kill the whole group in the middle of the server's first (streamed) request."""
    assert server.url is not None
    got_chunk = threading.Event()
    model = _model(server.url)

    def client() -> None:
        body = {"model": model, "prompt": "once", "max_tokens": 200, "stream": True}
        try:
            with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        got_chunk.set()
        except httpx.HTTPError:
            pass  # the server died under it: expected

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    assert got_chunk.wait(30), server.log
    _kill_group(server)
    thread.join(30)


# Where each start is killed: (log line waited for, or None for at once; kill mid-request).
KILL_POINTS = [
    ("at once", None, False),
    ("as the engine starts", r"EngineCore_0.*OpenMP threads wait", False),
    ("after the kernels load", NATIVE_LINE.pattern, False),
    ("after the weights load", r"EngineCore_0.*loaded .* in [\d.]+ s", False),
    ("during the warm-up", r"warm-up: \d+ ms", False),
    ("during the first request", None, True),
]


def test_starts_killed_at_any_point_leave_nothing_that_blocks_the_next(
    servers, tiny_model_dir: str, home: Path, tmp_path: Path
) -> None:
    # What a run-time build used to leave: a lock held by a dead process, a half-written
    # module. shoal no longer looks there; none of it may matter.
    stale = home / ".cache" / "shoal" / "native" / "shoal_native_0123456789abcdef"
    stale.mkdir(parents=True)
    (stale / "lock").write_text("")
    (stale / "shoal_native_0123456789abcdef.so").write_bytes(b"\x7fELF half written")
    rpc_base = tmp_path / "rpc"
    for name, pattern, mid_request in KILL_POINTS:
        server = _start(servers, tiny_model_dir, home, rpc_base, wait_ready=mid_request)
        if pattern is not None:
            server.wait_for_log(pattern, 120)
        elif not mid_request:
            time.sleep(0.3)
        if mid_request:
            _stream_then_kill(server)
        else:
            _kill_group(server)
        servers.remove(server)
        # Socket files of a SIGKILLed run stay (nothing ran to remove them); a new run
        # makes its own private directory, so they cannot collide. Cleared per start here.
        for leftover in rpc_base.rglob("*"):
            if leftover.is_file() or leftover.is_socket():
                leftover.unlink()
        print(f"killed {name}")
    server = _start(servers, tiny_model_dir, home, rpc_base, wait_ready=True)
    assert NATIVE_LINE.search(server.log), server.log
    assert server.url is not None
    _first_request_is_prompt(server.url)
    assert server.stop(signal.SIGTERM, 60) == 0, server.log
    assert server.leftovers() == []
    assert "Traceback" not in server.log, server.log


def test_two_servers_started_side_by_side_from_a_fresh_home_both_answer(
    servers, tiny_model_dir: str, home: Path, tmp_path: Path
) -> None:
    both = [
        _start(servers, tiny_model_dir, home, tmp_path / f"rpc{i}", wait_ready=False)
        for i in range(2)
    ]
    urls = [server.wait_ready() for server in both]
    for server, url in zip(both, urls, strict=True):
        assert NATIVE_LINE.search(server.log), server.log
        _first_request_is_prompt(url)
    for server in both:
        assert server.stop(signal.SIGTERM, 60) == 0, server.log
        assert server.leftovers() == []
    # Nothing compiled, cached or recorded under the home directory.
    written = [str(p.relative_to(home)) for p in home.rglob("*")]
    assert written == [], json.dumps(written)
