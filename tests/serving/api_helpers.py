"""Helpers of the API-server tests: a module-long `shoal serve`, metrics parsing, SSE reading."""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx

from shoal.engine.manager import CoreEngineProcManager
from shoal.entrypoints.launcher import bind_listen_socket
from shoal.entrypoints.serve_args import config_from_args
from shoal.runtime.addresses import get_engine_client_zmq_addr
from shoal.runtime.managers import APIServerProcessManager
from tests.serving.conftest import TINY_FLAGS, ServeProcess, frontend_flags, start_serve

TIMEOUT_S = 60.0


@contextlib.contextmanager
def running_server(
    model_dir: str | None, *flags: str, tiny: bool = True, frontend: str = "python"
) -> Iterator[ServeProcess]:
    """`shoal serve` on the tiny model for a whole test module (`tiny`: random weights and
    TINY_FLAGS; else the checkpoint's own weights and only `flags`; `model_dir` None: the
    default model), its HTTP side served by
    `frontend` ("python" or "rust": `frontend_flags`, which skips rust when not built).

    Its IPC directory lives under a private base, not the suite's: the per-test leak check
    fails on any socket file under the suite's base, and this server outlives single tests.
    On exit: SIGTERM, exit code 0, no process and no file left."""
    extra_flags, env = frontend_flags(frontend)
    base = tempfile.mkdtemp(prefix="shoal-api-rpc-")
    saved = os.environ["SHOAL_RPC_BASE_PATH"]
    os.environ["SHOAL_RPC_BASE_PATH"] = base
    try:
        server = start_serve(
            [*([model_dir] if model_dir else []), *(TINY_FLAGS if tiny else []), *flags]
            + extra_flags,
            env=env,
        )
    finally:
        os.environ["SHOAL_RPC_BASE_PATH"] = saved
    try:
        yield server
        assert server.stop(signal.SIGTERM, TIMEOUT_S) == 0, server.log
        assert server.leftovers() == []
        assert [f for _, _, files in os.walk(base) for f in files] == []
    finally:
        server.kill_everything()
        with contextlib.suppress(OSError):
            for root, dirs, _ in os.walk(base, topdown=False):
                for d in dirs:
                    os.rmdir(os.path.join(root, d))
            os.rmdir(base)


def metric(text: str, name: str, labels: str = "") -> float:
    """The value of the first `shoal:<name>{...}` sample whose labels contain `labels`."""
    pattern = rf"^shoal:{re.escape(name)}{{[^}}]*{re.escape(labels)}[^}}]*}} (\S+)$"
    match = re.search(pattern, text, re.M)
    assert match, f"{name}{{{labels}}} not in /metrics:\n{text}"
    return float(match.group(1))


def get_metrics(url: str) -> tuple[str, str]:
    """(/metrics text, the API server that answered: its `x-shoal-server` header, "" when
    the answer has none) over a fresh connection."""
    response = httpx.get(f"{url}/metrics", timeout=TIMEOUT_S)
    response.raise_for_status()
    return response.text, response.headers.get("x-shoal-server", "")


def wait_until(predicate: Callable[[], bool], timeout_s: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def sse_payloads(response: httpx.Response) -> Iterator[str]:
    """The `data:` payloads of a streaming response, `[DONE]` included."""
    for line in response.iter_lines():
        if line.startswith("data: "):
            yield line[len("data: ") :]


@dataclass
class Topology:
    """One API server over one engine, wired by hand (no launcher), so the API server stays
    up after its engine dies and can be observed."""

    url: str
    api_servers: APIServerProcessManager
    engines: CoreEngineProcManager


def health_status(url: str) -> int:
    try:
        return httpx.get(f"{url}/health", timeout=5).status_code
    except httpx.TransportError:
        return 0


@contextlib.contextmanager
def hand_built_topology(
    args: argparse.Namespace, engine_target: Callable[..., None], engine_grace_s: float
) -> Iterator[Topology]:
    """Start `engine_target` as EngineCore_0 and one API server for `args`; shut both down
    after (the engine gets `engine_grace_s` after SIGTERM before it is killed). The API
    server gets the namespace itself (the seed's contract of `run_api_server_worker_proc`),
    where the launcher hands it a `ServerConfig`: both paths stay exercised."""
    sock = bind_listen_socket("127.0.0.1", 0)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    engines = CoreEngineProcManager(
        config_from_args(args), 1, ready_timeout_s=TIMEOUT_S, target_fn=engine_target
    )
    api_servers: APIServerProcessManager | None = None
    try:
        inputs = [get_engine_client_zmq_addr(True, "127.0.0.1")]
        outputs = [get_engine_client_zmq_addr(True, "127.0.0.1")]
        api_servers = APIServerProcessManager(url, sock, args, 1, inputs, outputs)
        engines.send_addresses(*api_servers.gather_actual_addresses(TIMEOUT_S))
        engines.wait_for_ready(TIMEOUT_S)
        wait_until(lambda: health_status(url) == 200)
        yield Topology(url, api_servers, engines)
    finally:
        if api_servers is not None:
            api_servers.shutdown(10)
        engines.shutdown(engine_grace_s)
        sock.close()
