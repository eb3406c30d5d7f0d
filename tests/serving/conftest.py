"""Fixtures of the serving tests: a real `shoal serve` subprocess on a free port.

`start_serve(argv)` runs `python -m shoal.entrypoints.cli serve ... --port 0`, reads its log (stderr and
stdout merged) on a thread, and returns once the launcher logs "shoal is ready at <url>".
`ServeProcess.stop()` sends a signal and waits; `kill_everything()` is the safety net that
leaves no process of the run behind.

Both frontends: a test that asks for the `frontend` fixture runs once per entry of FRONTENDS
(`[python]`, `[rust]`); `frontend_flags(frontend)` gives the flags and environment of a
server on it (the rust case skips with the build command when the binary is not built). A
test of a feature the native frontend does not implement carries
`@pytest.mark.python_only("why")`: its rust case skips, saying so.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing import resource_tracker

import openai
import psutil
import pytest

from tests.helpers import make_tiny_model_dir

READY_RE = re.compile(r"shoal is ready at (http://\S+)")
STARTUP_TIMEOUT_S = 240.0
# Flags of a small, fast server on the tiny random-weight model.
# The official client's timeout in the module fixtures below.
CLIENT_TIMEOUT_S = 60.0
TINY_FLAGS = ["--load-format", "dummy", "--num-blocks", "256", "--max-model-len", "256"]
# What `shoal serve --frontend` takes; the serving tests of the HTTP surface run on each.
FRONTENDS = ("python", "rust")
RUST_FRONTEND_BINARY = "shoal-frontend"


def frontend_flags(frontend: str) -> tuple[list[str], dict[str, str]]:
    """The extra flags and environment of a `shoal serve` whose HTTP side is `frontend`.
    "rust": `--frontend rust` with SHOAL_RUST_FRONTEND_PATH set to the workspace's build
    (tests/native_frontend/conftest.py::rust_binary, which skips when it is not built)."""
    if frontend == "python":
        return [], {}
    if frontend != "rust":
        raise ValueError(f"frontend: expected one of {FRONTENDS}, got {frontend!r}")
    from tests.native_frontend.conftest import rust_binary

    binary = rust_binary(RUST_FRONTEND_BINARY)
    return ["--frontend", "rust"], {"SHOAL_RUST_FRONTEND_PATH": binary}


class ServeProcess:
    """A running `shoal serve` and its collected log."""

    def __init__(
        self,
        argv: list[str],
        rpc_base: str | None = None,
        env: dict[str, str] | None = None,
        new_session: bool = False,
    ) -> None:
        """`env`: variables set (or, with value "", removed) over os.environ. `new_session`:
        the server leads its own process group (a test can kill the whole group)."""
        self.argv = argv
        full_env = dict(os.environ)
        if rpc_base is not None:
            full_env["SHOAL_RPC_BASE_PATH"] = rpc_base
        for key, value in (env or {}).items():
            if value == "":
                full_env.pop(key, None)
            else:
                full_env[key] = value
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "shoal.entrypoints.cli", "serve", *argv],
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            start_new_session=new_session,
        )
        self.lines: list[str] = []
        self.url: str | None = None
        self._changed = threading.Condition()
        self._eof = False
        # Every process of the run, recorded while it is alive (for the leftover check).
        self.seen_pids: set[int] = {self.proc.pid}
        threading.Thread(target=self._read, name="serve-log", daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._eof = True
            self._changed.notify_all()

    @property
    def log(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def wait_for_log(self, pattern: str | re.Pattern[str], timeout_s: float) -> re.Match[str]:
        """The first log line matching `pattern`; fails with the log on timeout or exit."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                for line in self.lines:
                    if match := regex.search(line):
                        return match
                remaining = deadline - time.monotonic()
                if self._eof or remaining <= 0:
                    why = "exited" if self._eof else "timed out"
                    pytest.fail(f"shoal serve {why} before logging {regex.pattern!r}:\n{self.log}")
                self._changed.wait(min(remaining, 1.0))

    def wait_ready(self, timeout_s: float = STARTUP_TIMEOUT_S) -> str:
        self.url = self.wait_for_log(READY_RE, timeout_s).group(1)
        self.seen_pids |= {p.pid for p in self.descendants()}
        return self.url

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def child_named(self, role: str) -> psutil.Process:
        """The live process whose title is `shoal::<role>`."""
        for child in self.descendants():
            try:
                if f"shoal::{role}" in " ".join(child.cmdline()):
                    return child
            except psutil.Error:
                continue
        raise AssertionError(f"no process {role} among the children of shoal serve")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60.0) -> int:
        """Send `sig` to the launcher and wait for it to exit; returns its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.wait(timeout_s)

    def wait(self, timeout_s: float = 60.0) -> int:
        code = self.proc.wait(timeout_s)
        with self._changed:
            self._changed.wait_for(lambda: self._eof, timeout=10)
        return code

    def leftovers(self, timeout_s: float = 10.0) -> list[psutil.Process]:
        """Processes of the run still alive after `timeout_s` (zombies do not count)."""
        deadline = time.monotonic() + timeout_s
        while True:
            alive = [p for p in _processes(self.seen_pids) if _is_running(p)]
            if not alive or time.monotonic() > deadline:
                return alive
            time.sleep(0.1)

    def kill_everything(self) -> None:
        victims = _processes(self.seen_pids | {p.pid for p in self.descendants()})
        for proc in victims:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(victims, timeout=10)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


def _processes(pids: set[int]) -> list[psutil.Process]:
    found = []
    for pid in pids:
        try:
            found.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            continue
    return found


def _is_running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def start_serve(
    argv: list[str],
    wait_ready: bool = True,
    rpc_base: str | None = None,
    env: dict[str, str] | None = None,
    new_session: bool = False,
) -> ServeProcess:
    """Start `shoal serve` (with `--port 0` unless `argv` names a port).

    `rpc_base`: the server's SHOAL_RPC_BASE_PATH. A server that outlives one test needs its
    own (the suite's per-test leak check flags any socket file in the shared one). `env` and
    `new_session`: as for `ServeProcess`."""
    if "--port" not in argv:
        argv = [*argv, "--port", "0"]
    server = ServeProcess(argv, rpc_base, env, new_session)
    if wait_ready:
        try:
            server.wait_ready()
        except BaseException:
            server.kill_everything()
            raise
    return server


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "python_only(reason): a feature the native frontend does not implement; the test's "
        "[rust] case skips",
    )


def pytest_runtest_setup(item: pytest.Item) -> None:
    marker = item.get_closest_marker("python_only")
    callspec = getattr(item, "callspec", None)
    if marker is None or callspec is None or callspec.params.get("frontend") != "rust":
        return
    reason = marker.kwargs.get("reason") or (marker.args[0] if marker.args else "")
    pytest.skip(f"python frontend only (docs/native-frontend.md): {reason}")


@pytest.fixture(scope="module", params=FRONTENDS)
def frontend(request: pytest.FixtureRequest) -> str:
    """Which frontend serves HTTP (`shoal serve --frontend`): each test that asks for it
    runs once per entry of FRONTENDS."""
    return str(request.param)


@pytest.fixture(scope="session", autouse=True)
def _resource_tracker_started_before_leak_checks() -> None:
    # Spawning a child starts multiprocessing's resource tracker, which lives as long as the
    # pytest process: start it before the first per-test leak snapshot so it is not reported.
    resource_tracker.ensure_running()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_tiny_model_dir(str(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture
def serve(tiny_model_dir: str) -> Iterator[Callable[..., ServeProcess]]:
    """`serve(*flags, wait_ready=True, model=None, frontend="python")`: a `shoal serve` on
    the tiny model (or `model`) with `frontend` serving HTTP; stopped (and anything left
    killed) after the test."""
    started: list[ServeProcess] = []

    def _start(
        *flags: str, wait_ready: bool = True, model: str | None = None, frontend: str = "python"
    ) -> ServeProcess:
        extra_flags, env = frontend_flags(frontend)
        argv = [model or tiny_model_dir, *TINY_FLAGS, *flags, *extra_flags]
        server = start_serve(argv, wait_ready=wait_ready, env=env)
        started.append(server)
        return server

    yield _start
    for server in started:
        if server.proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                server.stop(signal.SIGTERM, 60)
        server.kill_everything()


def files_under(path: str) -> list[str]:
    return [os.path.join(root, f) for root, _, files in os.walk(path) for f in files]


# The fixtures of a module that serves one `server` (its own module-scoped fixture) to many
# tests: its base URL, an official `openai` client on it, and the model id it serves.
@pytest.fixture(scope="module")
def url(server: ServeProcess) -> str:
    assert server.url is not None
    return server.url


@pytest.fixture(scope="module")
def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=CLIENT_TIMEOUT_S)


@pytest.fixture(scope="module")
def model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id
