"""The API-server process: `run_api_server_worker_proc` and the routes of its ASGI app.

Start-up of `ApiServer_<i>`: bind ROUTER + PULL and report them (EngineClient), load the
tokenizer, wait for every engine's EngineReady (deadline), then serve HTTP with uvicorn
(uvloop, httptools) on the listening socket inherited from the launcher. SIGTERM / SIGINT:
before serving, exit at once; while serving, stop accepting and let in-flight requests run
for `--shutdown-timeout` seconds (the engines keep generating for them: the launcher stops
them only after the API servers), then fail the rest (`_DrainingServer`): each is aborted in
its engine and its client gets a 503, or a stream a final error event and `[DONE]`; exit 0.
This process never imports torch.

With --restart-dead-engines, `EngineDeadError` from a generation route becomes 503 with
`Retry-After` (`_retry_later`); without it, 503 as shoal.api.asgi maps it.
With SHOAL_SERVER_DEV_MODE=1, `GET /debug/kv_cache` runs every live engine's block-pool
integrity check (a UTILITY call) and reports its block counts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import secrets
import signal
import socket
from collections.abc import Awaitable, Callable
from types import FrameType
from typing import Any

import msgspec
import uvicorn
import uvloop

import shoal
from shoal.api.admission import RETRY_AFTER_S, AdmissionControl
from shoal.api.asgi import (
    MAX_BODY_BYTES,
    App,
    HTTPError,
    Request,
    Response,
    StreamingResponse,
    error_body,
    error_for,
    json_response,
)
from shoal.api.async_engine import AsyncEngine
from shoal.api.metrics import MetricsStore
from shoal.api.openapi import build_openapi
from shoal.api.protocol import (
    DetokenizeRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
    now_s,
)
from shoal.api.routes import (
    ServingContext,
    create_chat_completion,
    create_completion,
)
from shoal.engine.client import EngineClient, EngineDeadError
from shoal.envs import ENVS
from shoal.logger import init_logger
from shoal.model_source import resolve_model
from shoal.processing.tokenizer import Tokenizer
from shoal.runtime.addresses import ipc_path
from shoal.runtime.child import exit_now, init_child_process

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
    args: argparse.Namespace,
    client_config: dict[str, Any] | None = None,
    **uvicorn_kwargs: Any,
) -> None:
    """Entry point of process `ApiServer_<client_index>` (see the module docstring).

    `client_config`: `input_address`, `output_address`, `client_index`, `client_count`,
    `actual_address_pipe` and optionally `stats_update_address` (from
    `APIServerProcessManager`). `args`: the `shoal serve` namespace (shoal.entrypoints.serve_args).
    Exits 0 after a signal-initiated shutdown, without interpreter teardown (`exit_now`);
    raises (exit 1) when start-up fails.
    """
    config = dict(client_config or {})
    init_child_process(f"ApiServer_{int(config.get('client_index', 0))}")
    _Signals.install()
    uvloop.run(run_server_worker(listen_address, sock, args, config, **uvicorn_kwargs))
    exit_now(0)  # served and shut down: skip the ~0.3 s of interpreter teardown


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
    args: argparse.Namespace,
    client_config: dict[str, Any],
    **uvicorn_kwargs: Any,
) -> None:
    """Bind, wait for the engines, serve until a signal; always closes the engine link."""
    _Signals.loop, _Signals.stop = asyncio.get_running_loop(), asyncio.Event()
    if _Signals.received:
        return
    client = EngineClient(
        client_config,
        int(getattr(args, "data_parallel_size", 1)),
        stall_timeout_s=getattr(args, "engine_stall_timeout", None) or None,
        restart_engines=bool(getattr(args, "restart_dead_engines", False)),
    )
    metrics: MetricsStore | None = None
    admission: AdmissionControl | None = None
    engine: AsyncEngine | None = None
    server: _DrainingServer | None = None
    try:
        tokenizer = await asyncio.to_thread(Tokenizer.from_model, args.tokenizer or args.model)
        timeout_s = getattr(args, "engine_ready_timeout", None) or ENVS.engine_ready_timeout_s
        if not await _unless_stopped(client.wait_for_engines(timeout_s)):
            logger.info("shutdown requested during start-up")
            return
        shared_dir = _metrics_dir(args, client_config)
        metrics = MetricsStore(client.num_engines, shared_dir, client.client_index)
        admission = AdmissionControl(
            getattr(args, "max_num_queued_requests", None),
            shared_dir,
            client.client_index,
            int(client_config.get("client_count", 1)),
        )
        engine = AsyncEngine(client, tokenizer, metrics, int(getattr(args, "stream_interval", 1)))
        ctx = ServingContext(engine, tokenizer, _served_model_name(args, client))
        app = build_app(ctx, args, admission)
        drain_s = float(getattr(args, "shutdown_timeout", 5.0))
        server = _DrainingServer(_uvicorn_config(app, args, uvicorn_kwargs), engine, drain_s)
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


def _uvicorn_config(
    app: App, args: argparse.Namespace, overrides: dict[str, Any]
) -> uvicorn.Config:
    drain_s = float(getattr(args, "shutdown_timeout", 5.0))
    options: dict[str, Any] = {
        "loop": "uvloop",  # informational: the loop is already uvloop (uvloop.run)
        "http": "httptools",
        "lifespan": "on",
        "log_level": getattr(args, "uvicorn_log_level", "warning"),
        "access_log": False,
        "timeout_keep_alive": ENVS.http_timeout_keep_alive_s,
        # The backstop behind `_DrainingServer`'s deadline (drain_s): requests failed there
        # get `_FINAL_EVENTS_S` to send their error before uvicorn cancels what is left.
        "timeout_graceful_shutdown": drain_s + _FINAL_EVENTS_S,
    }
    options.update(overrides)
    return uvicorn.Config(app, **options)


def _metrics_dir(args: argparse.Namespace, client_config: dict[str, Any]) -> str | None:
    """Where the API servers of this run share metrics: `args.metrics_dir`, else the private
    IPC directory of the run (next to our input socket; removed by the launcher)."""
    explicit = getattr(args, "metrics_dir", None)
    if explicit:
        return str(explicit)
    path = ipc_path(str(client_config.get("input_address", "")))
    if path is None:
        if int(client_config.get("client_count", 1)) > 1:
            logger.warning("no shared metrics directory: /metrics covers this server only")
        return None
    return os.path.dirname(path)


def _served_model_name(args: argparse.Namespace, client: EngineClient) -> str:
    if getattr(args, "served_model_name", None):
        return str(args.served_model_name)
    if client.engines and client.engines[0].model_name:
        return client.engines[0].model_name
    return resolve_model(args.model).name


# ----------------------------------------------------------------------------- the app


def build_app(
    ctx: ServingContext, args: argparse.Namespace, admission: AdmissionControl | None = None
) -> App:
    """The ASGI app with every route; `/v1/*` needs `Authorization: Bearer <api_key>` when
    `args.api_key` is set; the generation routes hold an `admission` place while they run;
    bodies over `args.max_request_body_bytes` get 413."""
    max_body = getattr(args, "max_request_body_bytes", None) or MAX_BODY_BYTES
    app = App(admission, max_body)
    api_key = getattr(args, "api_key", None)
    guard = _api_key_guard(api_key) if api_key else None

    restarts = bool(getattr(args, "restart_dead_engines", False))

    def v1(
        handler: Callable[[ServingContext, Request], Awaitable[Response | StreamingResponse]],
    ) -> Callable[[Request], Awaitable[Response | StreamingResponse]]:
        if restarts:  # a dead engine comes back: tell clients when to retry
            return functools.partial(_retry_later, handler, ctx)
        return functools.partial(handler, ctx)

    for path, handler in (
        ("/v1/completions", create_completion),
        ("/v1/chat/completions", create_chat_completion),
    ):
        app.route("POST", path, v1(handler), watch_disconnect=True, admit=True, guard=guard)
    app.route("GET", "/v1/models", v1(list_models), guard=guard)
    app.route("GET", "/health", functools.partial(health, ctx))
    app.route("GET", "/metrics", functools.partial(metrics_route, ctx, admission))
    app.route("GET", "/version", version)
    openapi = Response(msgspec.json.encode(build_openapi(api_key=bool(api_key))))
    app.route("GET", "/openapi.json", functools.partial(_constant, openapi))
    app.route("POST", "/tokenize", functools.partial(tokenize, ctx))
    app.route("POST", "/detokenize", functools.partial(detokenize, ctx))
    if ENVS.server_dev_mode:
        logger.warning("SHOAL_SERVER_DEV_MODE is set: serving GET /debug/kv_cache")
        app.route("GET", "/debug/kv_cache", functools.partial(debug_kv_cache, ctx))
    return app


_RETRY_AFTER = [(b"retry-after", str(RETRY_AFTER_S).encode())]


async def _retry_later(
    handler: Callable[[ServingContext, Request], Awaitable[Response | StreamingResponse]],
    ctx: ServingContext,
    request: Request,
) -> Response | StreamingResponse:
    """`handler`, with an engine death before the response started (a dead engine, no live
    engine, or the request's own engine died: --restart-dead-engines) answered by 503, an
    OpenAI error body and `Retry-After`. Streams that already started end with an error
    event instead (shoal.api.asgi)."""
    try:
        return await handler(ctx, request)
    except EngineDeadError as e:  # ServerShuttingDownError too: retry on another server
        status, body = error_for(e)
        return Response(body, status, headers=list(_RETRY_AFTER))


def _api_key_guard(api_key: str) -> Callable[[Request], None]:
    """A guard refusing (401) requests without `Authorization: Bearer <api_key>`; the
    comparison takes the same time wherever the given value first differs."""
    expected = f"Bearer {api_key}".encode()

    def check(request: Request) -> None:
        given = request.headers.get("authorization", "").encode("latin-1")
        if not secrets.compare_digest(given, expected):
            raise HTTPError(401, "invalid or missing API key (Authorization: Bearer <key>)")

    return check


async def list_models(ctx: ServingContext, request: Request) -> Response:
    card = ModelCard(
        ctx.model_name, now_s(), ctx.engine.max_model_len, root=ctx.tokenizer.name_or_path or None
    )
    return json_response(ModelList([card]))


async def health(ctx: ServingContext, request: Request) -> Response:
    """200 (empty) while every engine is alive; 503 (with the reason) once one died. With
    --restart-dead-engines: 200 with `{"status": "degraded", "engines_down": {k: reason}}`
    while some engines restart and another serves; 503 + Retry-After while none can."""
    reason = ctx.engine.dead_reason
    if reason is not None:
        return Response(error_body(503, f"the engine is not available: {reason}"), 503)
    reason = ctx.engine.unavailable_reason
    if reason is not None:
        body = error_body(503, f"the engine is not available: {reason}")
        return Response(body, 503, headers=list(_RETRY_AFTER))
    down = ctx.engine.client.down
    if down:
        engines_down = {str(k): down[k] for k in sorted(down)}
        return json_response({"status": "degraded", "engines_down": engines_down})
    return Response(b"", 200)


async def debug_kv_cache(ctx: ServingContext, request: Request) -> Response:
    """Development only (SHOAL_SERVER_DEV_MODE=1): per engine `{engine_index, num_blocks,
    num_free_blocks, integrity}`, from the engine's own block pool between two steps;
    `integrity` is "ok" or the failed invariant (or why the engine could not answer)."""
    client = ctx.engine.client

    async def one(k: int) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "engine_index": k,
            "num_blocks": None,
            "num_free_blocks": None,
            "integrity": "",
        }
        try:
            output = await client.call_utility(k, "kv_cache_status")
        except (EngineDeadError, TimeoutError) as e:
            entry["integrity"] = f"unavailable: {e or 'no answer in time'}"
            return entry
        if output.kv_cache is None:
            entry["integrity"] = f"unavailable: {output.error}"
            return entry
        status = output.kv_cache
        entry.update(
            num_blocks=status.num_blocks,
            num_free_blocks=status.num_free_blocks,
            integrity=status.integrity,
        )
        return entry

    results = await asyncio.gather(*(one(k) for k in range(client.num_engines)))
    return json_response(list(results))


async def metrics_route(
    ctx: ServingContext, admission: AdmissionControl | None, request: Request
) -> Response:
    """Prometheus text; every API server of the run answers with the same figures (see
    shoal.api.metrics). `x-shoal-server` names the one that answered."""
    text = ctx.engine.metrics.render(ctx.model_name)
    text += _admission_metrics(admission, ctx.model_name)
    role = f"ApiServer_{ctx.engine.client.client_index}".encode()
    return Response(
        text.encode(),
        content_type=b"text/plain; version=0.0.4; charset=utf-8",
        headers=[(b"x-shoal-server", role)],
    )


def _admission_metrics(admission: AdmissionControl | None, model_name: str) -> str:
    """Admission figures over every API server (shoal.api.admission)."""
    if admission is None:
        return ""
    label = "{" + f"model_name={msgspec.json.encode(model_name).decode()}" + "}"
    return (
        "# HELP shoal:api_requests_in_flight Generation requests admitted and not finished.\n"
        "# TYPE shoal:api_requests_in_flight gauge\n"
        f"shoal:api_requests_in_flight{label} {admission.in_flight()}\n"
        "# HELP shoal:api_requests_rejected_total Requests refused by "
        "--max-num-queued-requests.\n"
        "# TYPE shoal:api_requests_rejected_total counter\n"
        f"shoal:api_requests_rejected_total{label} {admission.rejected()}\n"
    )


async def _constant(response: Response, request: Request) -> Response:
    return response


async def version(request: Request) -> Response:
    return json_response({"version": shoal.__version__})


async def tokenize(ctx: ServingContext, request: Request) -> Response:
    """`{prompt | messages, add_special_tokens}` -> `{tokens, count, max_model_len}`."""
    body: TokenizeRequest = request.json(TokenizeRequest)
    ctx.check_model(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise ValueError("prompt: give exactly one of prompt and messages")
    if body.messages is not None:
        text = ctx.tokenizer.apply_chat_template(
            body.messages,
            add_generation_prompt=body.add_generation_prompt,
            chat_template=body.chat_template,
        )
        tokens = ctx.tokenizer.encode(text, add_special_tokens=False)
    else:
        assert body.prompt is not None
        tokens = ctx.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
    return json_response(
        {"tokens": tokens, "count": len(tokens), "max_model_len": ctx.engine.max_model_len}
    )


async def detokenize(ctx: ServingContext, request: Request) -> Response:
    """`{tokens}` -> `{prompt}`; 400 naming `tokens` for ids outside the vocabulary."""
    body: DetokenizeRequest = request.json(DetokenizeRequest)
    ctx.check_model(body.model)
    vocab_size = ctx.tokenizer.vocab_size
    for i, token in enumerate(body.tokens):
        if not 0 <= token < vocab_size:
            raise HTTPError(
                400,
                f"tokens: id {token} at position {i} is not in the vocabulary [0, {vocab_size})",
                "tokens",
            )
    return json_response({"prompt": ctx.tokenizer.decode(body.tokens, skip_special_tokens=False)})
