"""The API-server process: `run_api_server_worker_proc`, from start-up to exit.

Start-up of `ApiServer_<i>`: bind ROUTER + PULL and report them (EngineClient), load the
tokenizer, wait for every engine's EngineReady (deadline), then serve HTTP with uvicorn
(uvloop, httptools) on the listening socket inherited from the launcher. SIGTERM / SIGINT:
before serving, exit at once; while serving, stop accepting and let in-flight requests run
for `--shutdown-timeout` seconds (the engines keep generating for them: the launcher stops
them only after the API servers), then fail the rest (`_DrainingServer`): each is aborted in
its engine and its client gets a 503, or a stream a final error event and `[DONE]`; exit 0.
This process never imports torch. Its settings are one `ServerConfig` (shoal.config); its
routes are wired by shoal.api.app.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
from collections.abc import Awaitable
from types import FrameType
from typing import Any

import uvicorn
import uvloop

from shoal.api.admission import AdmissionControl
from shoal.api.app import build_app
from shoal.api.asgi import App
from shoal.api.async_engine import AsyncEngine
from shoal.api.metrics import MetricsStore
from shoal.api.routes import ServingContext
from shoal.config import ServerConfig
from shoal.engine.client import EngineClient
from shoal.envs import ENVS
from shoal.logger import init_logger
from shoal.model_source import resolve_model
from shoal.processing.tokenizer import Tokenizer
from shoal.runtime.addresses import ipc_path
from shoal.runtime.child import exit_now, init_child_process
from shoal.runtime.restart import EngineRestartPolicy

logger = init_logger(__name__)

# After the drain deadline: how long the failed requests get to send their error (a stream's
# final event and [DONE]) before uvicorn cancels what is left. Well under the launcher's
# EXIT_GRACE_S (2 s), after which it kills this process.
_FINAL_EVENTS_S = 0.5
# After uvicorn returned: how long request tasks it cancelled get to run their cleanup
# (engine aborts, admission release) before the engine link and the shared files close.
_CANCELLED_CLEANUP_S = 0.5


def run_api_server_worker_proc(
    listen_address: str,
    sock: socket.socket,
    args: ServerConfig | argparse.Namespace,
    client_config: dict[str, Any] | None = None,
    **uvicorn_kwargs: Any,
) -> None:
    """Entry point of process `ApiServer_<client_index>` (see the module docstring).

    `client_config`: `input_address`, `output_address`, `client_index`, `client_count`,
    `actual_address_pipe` and optionally `stats_update_address` (from
    `APIServerProcessManager`). `args`: the `ServerConfig` the launcher built, or (the seed's
    contract) the `shoal serve` namespace, converted here once. Exits 0 after a
    signal-initiated shutdown, without interpreter teardown (`exit_now`); raises (exit 1)
    when start-up fails (`ValueError` naming the flag for a bad namespace).
    """
    client_config = dict(client_config or {})
    init_child_process(f"ApiServer_{int(client_config.get('client_index', 0))}")
    config = _server_config(args)
    _Signals.install()
    uvloop.run(run_server_worker(listen_address, sock, config, client_config, **uvicorn_kwargs))
    exit_now(0)  # served and shut down: skip the ~0.3 s of interpreter teardown


def _server_config(args: ServerConfig | argparse.Namespace) -> ServerConfig:
    if isinstance(args, ServerConfig):
        return args
    # A namespace of `shoal serve` flags: mapped where the flags are defined (imported here
    # only: the launcher hands every API server a ServerConfig).
    from shoal.entrypoints.serve_args import server_config_from_args

    return server_config_from_args(args)


class _Signals:
    """The first SIGTERM / SIGINT sets `stop` (start-up waits on it); uvicorn takes the
    signals over while it serves and hands them back here when it returns."""

    received = False
    stop: asyncio.Event | None = None
    loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def install(cls) -> None:
        signal.signal(signal.SIGTERM, cls.handle)
        signal.signal(signal.SIGINT, cls.handle)

    @classmethod
    def handle(cls, signum: int, frame: FrameType | None) -> None:
        cls.received = True
        if cls.stop is not None and cls.loop is not None:
            cls.loop.call_soon_threadsafe(cls.stop.set)


async def run_server_worker(
    listen_address: str,
    sock: socket.socket,
    config: ServerConfig,
    client_config: dict[str, Any],
    **uvicorn_kwargs: Any,
) -> None:
    """Bind, wait for the engines, serve until a signal; always closes the engine link."""
    _Signals.loop, _Signals.stop = asyncio.get_running_loop(), asyncio.Event()
    if _Signals.received:
        return
    client = EngineClient(
        client_config,
        config.data_parallel_size,
        stall_timeout_s=config.stall_timeout_s,
        restart_policy=EngineRestartPolicy.for_server(config),
    )
    metrics: MetricsStore | None = None
    admission: AdmissionControl | None = None
    engine: AsyncEngine | None = None
    server: _DrainingServer | None = None
    try:
        tokenizer = await asyncio.to_thread(Tokenizer.from_model, config.tokenizer or config.model)
        if config.chat_template is not None:  # --chat-template replaces the tokenizer's
            tokenizer.chat_template = config.chat_template
        if not await _unless_stopped(client.wait_for_engines(config.ready_timeout_s)):
            logger.info("shutdown requested during start-up")
            return
        shared_dir = _metrics_dir(client_config)
        metrics = MetricsStore(client.num_engines, shared_dir, client.client_index)
        admission = AdmissionControl(
            config.max_num_queued_requests,
            shared_dir,
            client.client_index,
            int(client_config.get("client_count", 1)),
        )
        engine = AsyncEngine(client, tokenizer, metrics, config.stream_interval)
        engine.tensor_queue = client_config.get("tensor_queue")
        ctx = ServingContext(engine, tokenizer, _served_model_name(config, client))
        if config.enable_auto_tool_choice:
            ctx.tool_parser = config.tool_call_parser
        app = build_app(ctx, config, admission)
        server = _DrainingServer(
            _uvicorn_config(app, config, uvicorn_kwargs), engine, config.shutdown_timeout_s
        )
        logger.info("serving %s at %s", ctx.model_name, listen_address)
        await server.serve(sockets=[sock])
    finally:
        if server is not None:
            await server.wait_for_request_tasks(_CANCELLED_CLEANUP_S)
        if engine is not None:
            await engine.abort_all()
        await client.close()
        if metrics is not None:
            metrics.close()
        if admission is not None:
            admission.close()
        sock.close()
    logger.info("shut down")


async def _unless_stopped(work: Awaitable[Any]) -> bool:
    """Await `work` unless a shutdown signal comes first (then cancel it; False)."""
    assert _Signals.stop is not None
    task = asyncio.ensure_future(work)
    stopper = asyncio.ensure_future(_Signals.stop.wait())
    await asyncio.wait((task, stopper), return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return False
    task.result()
    return True


class _DrainingServer(uvicorn.Server):
    """uvicorn's server with shoal's drain deadline. On SIGTERM / SIGINT uvicorn stops
    accepting, closes idle connections and waits for the open responses; `drain_s`
    (`--shutdown-timeout`) seconds later every request still in flight is failed with
    `ServerShuttingDownError`, so that its handler answers it (a 503, or a stream's final
    error event and `[DONE]`) and its response ends cleanly. uvicorn's own timeout
    (`timeout_graceful_shutdown`, `_FINAL_EVENTS_S` later) cancels only what did not end."""

    def __init__(self, config: uvicorn.Config, engine: AsyncEngine, drain_s: float) -> None:
        super().__init__(config)
        self.engine = engine
        self.drain_s = drain_s

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        deadline = asyncio.get_running_loop().call_later(self.drain_s, self._drain_deadline)
        try:
            await super().shutdown(sockets)
        finally:
            deadline.cancel()  # everything ended before it

    def _drain_deadline(self) -> None:
        reason = (
            f"the server is shutting down: the request did not finish within the drain "
            f"window (--shutdown-timeout {self.drain_s:g} s); retry it"
        )
        count = self.engine.end_in_flight(reason)
        if count:
            logger.warning(
                "drain deadline (--shutdown-timeout %g s) passed: failing %d request(s) still "
                "in flight",
                self.drain_s,
                count,
            )

    async def wait_for_request_tasks(self, timeout_s: float) -> None:
        """Let request tasks that outlived `serve` (uvicorn cancelled them at its timeout, or
        it returned early on a second signal) finish their cleanup, for up to `timeout_s`."""
        tasks = set(self.server_state.tasks)
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s)


def _uvicorn_config(app: App, config: ServerConfig, overrides: dict[str, Any]) -> uvicorn.Config:
    drain_s = config.shutdown_timeout_s
    options: dict[str, Any] = {
        "loop": "uvloop",  # informational: the loop is already uvloop (uvloop.run)
        "http": "httptools",
        "lifespan": "on",
        "log_level": config.uvicorn_log_level,
        "access_log": False,
        "timeout_keep_alive": ENVS.http_timeout_keep_alive_s,
        # The backstop behind `_DrainingServer`'s deadline (drain_s): requests failed there
        # get `_FINAL_EVENTS_S` to send their error before uvicorn cancels what is left.
        "timeout_graceful_shutdown": drain_s + _FINAL_EVENTS_S,
    }
    options.update(overrides)
    return uvicorn.Config(app, **options)


def _metrics_dir(client_config: dict[str, Any]) -> str | None:
    """Where the API servers of this run share metrics (and admission counts): the private
    IPC directory of the run (next to our input socket; removed by the launcher)."""
    path = ipc_path(str(client_config.get("input_address", "")))
    if path is None:
        if int(client_config.get("client_count", 1)) > 1:
            logger.warning("no shared metrics directory: /metrics covers this server only")
        return None
    return os.path.dirname(path)


def _served_model_name(config: ServerConfig, client: EngineClient) -> str:
    if config.served_model_name:
        return config.served_model_name
    if client.engines and client.engines[0].model_name:
        return client.engines[0].model_name
    return resolve_model(config.model).name
