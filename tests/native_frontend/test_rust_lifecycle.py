"""`shoal serve --frontend rust` as processes: the missing binary (an immediate, named error),
SIGTERM's drain, SIGKILL of the launcher and kill -9 of the frontend (docs/native-frontend.md,
"Lifecycle"). Real processes on the tiny random-weight model; nothing may be left behind.

The tests that run the binary skip, naming the build command, when it is not built
(tests/native_frontend/conftest.py::rust_binary; SHOAL_RUST_TARGET_DIR picks another build).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import tempfile
import time
from collections.abc import Iterator

import psutil
import pytest

import shoal
from shoal import envs
from shoal.config import ServerConfig
from shoal.runtime import frontend as frontend_module
from shoal.runtime.frontend import (
    BUILD_COMMAND,
    find_frontend_binary,
    frontend_args_json,
    frontend_command,
    native_frontend_args,
)
from tests.helpers import make_tiny_model_dir
from tests.serving.conftest import (
    RUST_FRONTEND_BINARY,
    TINY_FLAGS,
    ServeProcess,
    frontend_flags,
    start_serve,
)
from tests.serving.test_faults import Streams

STOP_TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_tiny_model_dir(str(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture
def rpc_base() -> Iterator[str]:
    """A private SHOAL_RPC_BASE_PATH, so a test can check that its run left no file (and a
    SIGKILLed launcher's files do not trip the suite's own leak check)."""
    base = tempfile.mkdtemp(prefix="shoal-rust-rpc-")
    yield base
    shutil.rmtree(base, ignore_errors=True)


def _files_under(path: str) -> list[str]:
    return [os.path.join(root, f) for root, _, files in os.walk(path) for f in files]


def _rust_serve(model_dir: str, rpc_base: str, *flags: str) -> ServeProcess:
    """A ready `shoal serve --frontend rust` on the tiny model (skips when not built)."""
    extra, env = frontend_flags("rust")
    return start_serve([model_dir, *TINY_FLAGS, *flags, *extra], rpc_base=rpc_base, env=env)


def _frontend_process(server: ServeProcess) -> psutil.Process:
    """The live native frontend among the launcher's children."""
    for child in server.descendants():
        try:
            if RUST_FRONTEND_BINARY in (child.name(), os.path.basename(child.cmdline()[0])):
                return child
        except (psutil.Error, IndexError):
            continue
    raise AssertionError(f"no {RUST_FRONTEND_BINARY} process among the children:\n{server.log}")


# ------------------------------------------------------------------ finding the binary


@pytest.fixture
def no_binary_anywhere(tmp_path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """No SHOAL_RUST_FRONTEND_PATH, no workspace build, an empty PATH: returns that PATH."""
    monkeypatch.delenv("SHOAL_RUST_FRONTEND_PATH", raising=False)
    monkeypatch.setattr(frontend_module, "WORKSPACE_BINARY", str(tmp_path / "none" / "x"))
    monkeypatch.setenv("PATH", str(tmp_path))
    envs.refresh()
    yield str(tmp_path)
    monkeypatch.undo()
    envs.refresh()


def _executable(path: str) -> str:
    with open(path, "w") as f:
        f.write("#!/bin/sh\nexit 0\n")
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)
    return path


def test_no_binary_anywhere_names_the_build_command(no_binary_anywhere: str) -> None:
    with pytest.raises(FileNotFoundError) as info:
        find_frontend_binary()
    assert BUILD_COMMAND in str(info.value) and "scripts/bootstrap.sh" in str(info.value)


def test_the_binary_is_looked_up_env_then_workspace_then_path(
    no_binary_anywhere: str, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    on_path = _executable(os.path.join(no_binary_anywhere, RUST_FRONTEND_BINARY))
    assert find_frontend_binary() == on_path
    workspace = _executable(str(tmp_path / "workspace-build"))
    monkeypatch.setattr(frontend_module, "WORKSPACE_BINARY", workspace)
    assert find_frontend_binary() == workspace
    configured = _executable(str(tmp_path / "configured"))
    monkeypatch.setenv("SHOAL_RUST_FRONTEND_PATH", configured)
    envs.refresh()
    assert find_frontend_binary() == configured
    # A variable naming nothing usable is an error, not a silent fall-back.
    monkeypatch.setenv("SHOAL_RUST_FRONTEND_PATH", str(tmp_path / "missing"))
    envs.refresh()
    with pytest.raises(FileNotFoundError, match="SHOAL_RUST_FRONTEND_PATH"):
        find_frontend_binary()


def test_args_json_carries_what_the_binary_cannot_work_out(tiny_model_dir: str) -> None:
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    server = ServerConfig(
        model=tiny_model_dir,
        chat_template=template,
        api_key="s3cret",
        max_num_queued_requests=7,
        max_request_body_bytes=1234,
        shutdown_timeout_s=9.5,
        engine_ready_timeout_s=42.0,
        frontend="rust",
    )
    payload = json.loads(frontend_args_json(native_frontend_args(server)))
    assert payload["model_path"] == payload["tokenizer_path"] == tiny_model_dir
    assert payload["model_format"] == "hf"
    # What the engines report (and the Python server shows) for an unnamed directory.
    assert payload["served_model_name"] == tiny_model_dir
    assert payload["chat_template"] == template
    assert (payload["api_key"], payload["max_num_queued_requests"]) == ("s3cret", 7)
    assert payload["max_request_body_bytes"] == 1234
    assert payload["shutdown_timeout_s"] == payload["shutdown_timeout"] == 9.5
    assert payload["engine_ready_timeout_secs"] == 42.0
    assert payload["version"] == shoal.__version__ and payload["frontend"] == "rust"
    named = json.loads(
        frontend_args_json(
            native_frontend_args(ServerConfig(model=tiny_model_dir, served_model_name="tiny"))
        )
    )
    assert named["served_model_name"] == "tiny"
    # The logged command line hides the key.
    cmd = frontend_command(
        "/bin/x", 3, native_frontend_args(server), "ipc:///a", "ipc:///b", 0, 1, 1
    )
    logged = frontend_module._redacted(cmd)
    assert "s3cret" in " ".join(cmd) and "s3cret" not in " ".join(logged)


def test_a_missing_binary_stops_serve_at_once_before_any_engine(tiny_model_dir: str) -> None:
    missing = os.path.join(tempfile.gettempdir(), "no-such-dir", RUST_FRONTEND_BINARY)
    started = time.monotonic()
    server = start_serve(
        [tiny_model_dir, *TINY_FLAGS, "--frontend", "rust"],
        wait_ready=False,
        env={"SHOAL_RUST_FRONTEND_PATH": missing},
    )
    try:
        assert server.wait(30) == 2, server.log
        # At once: no model load, no engine process (a start takes several seconds).
        assert time.monotonic() - started < 15
        assert BUILD_COMMAND in server.log, server.log
        assert "EngineCore" not in server.log and "engine process" not in server.log, server.log
        assert "Traceback" not in server.log, server.log
        assert server.leftovers() == []
    finally:
        server.kill_everything()


def test_rust_frontend_refuses_engines_on_other_hosts(tiny_model_dir: str) -> None:
    flags = ["--frontend", "rust", "--data-parallel-size", "2", "--data-parallel-size-local", "1"]
    server = start_serve([tiny_model_dir, *TINY_FLAGS, *flags], wait_ready=False)
    try:
        assert server.wait(30) == 2, server.log
        assert "--frontend: rust serves engines on this host only" in server.log, server.log
    finally:
        server.kill_everything()


# ------------------------------------------------------------------ the running binary


def test_sigterm_drains_a_stream_in_flight_and_leaves_nothing(
    tiny_model_dir: str, rpc_base: str
) -> None:
    flags = ["--shutdown-timeout", "60", "--api-server-count", "2"]
    server = _rust_serve(tiny_model_dir, rpc_base, *flags)
    try:
        assert server.url is not None
        assert "--api-server-count 2 is ignored" in server.log
        frontend_pid = _frontend_process(server).pid
        max_tokens = 48
        streams = Streams(server.url, n=2, max_tokens=max_tokens)
        streams.wait_first_chunks()
        started = time.monotonic()
        assert server.stop(signal.SIGTERM, STOP_TIMEOUT_S) == 0, server.log
        streams.join()
        assert streams.errors == [], streams.errors
        for events in streams.events:
            assert events[-1] == "[DONE]", events[-3:]
            assert Streams.error(events) is None, events[-3:]
            assert Streams.finish_reason(events) == "length", events[-3:]
        # The drain ended when the streams did, not at the 60 s deadline.
        assert time.monotonic() - started < 30
        assert not _alive(frontend_pid)
        assert server.leftovers() == []
        assert _files_under(rpc_base) == []
        assert "Traceback" not in server.log, server.log
    finally:
        server.kill_everything()


def test_sigkill_of_the_launcher_leaves_no_process(tiny_model_dir: str, rpc_base: str) -> None:
    server = _rust_serve(tiny_model_dir, rpc_base, "--data-parallel-size", "2")
    try:
        assert server.url is not None
        frontend_pid = _frontend_process(server).pid
        assert frontend_pid in server.seen_pids
        streams = Streams(server.url, n=2, max_tokens=200)
        streams.wait_first_chunks()
        server.proc.send_signal(signal.SIGKILL)
        assert server.wait(30) == -signal.SIGKILL
        # PR_SET_PDEATHSIG takes the frontend; the sweeper takes the engines and coordinator.
        assert server.leftovers(timeout_s=10) == []
        streams.join()
    finally:
        server.kill_everything()


def test_kill_9_of_the_frontend_stops_the_run_naming_it(tiny_model_dir: str, rpc_base: str) -> None:
    server = _rust_serve(tiny_model_dir, rpc_base)
    try:
        _frontend_process(server).send_signal(signal.SIGKILL)
        code = server.wait(STOP_TIMEOUT_S)
        assert code != 0, server.log
        assert "RustFrontend" in server.log and "died with exit code -9" in server.log, server.log
        assert server.leftovers() == []
        assert _files_under(rpc_base) == []
    finally:
        server.kill_everything()


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
