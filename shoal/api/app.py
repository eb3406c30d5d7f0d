"""The ASGI app of one API server: `build_app` wires every route (the API-key guard, admission,
the body limit, Retry-After with --restart-dead-engines) from the `ServerConfig`, and the small
routes live here; the generation routes are in shoal.api.routes, the process around the app in
shoal.api.server.

With --restart-dead-engines, `EngineDeadError` from a generation route becomes 503 with
`Retry-After` (`_retry_later`); without it, 503 as shoal.api.asgi maps it.
With SHOAL_SERVER_DEV_MODE=1, `GET /debug/kv_cache` runs every live engine's block-pool
integrity check (a UTILITY call) and reports its block counts.
"""

from __future__ import annotations

import asyncio
import functools
import secrets
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

import shoal
from shoal.api.admission import RETRY_AFTER_S, AdmissionControl
from shoal.api.asgi import (
    App,
    HTTPError,
    Request,
    Response,
    StreamingResponse,
    error_body,
    error_for,
    json_response,
)
from shoal.api.cors import CorsPolicy
from shoal.api.dashboard import DashboardView, add_dashboard_routes
from shoal.api.embeddings import create_embedding
from shoal.api.metrics import metric_prefixes
from shoal.api.openapi import build_openapi
from shoal.api.process_metrics import render_process_metrics
from shoal.api.protocol import (
    DetokenizeRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
    now_s,
)
from shoal.api.responses import create_response
from shoal.api.routes import (
    ServingContext,
    create_chat_completion,
    create_completion,
)
from shoal.config import ServerConfig
from shoal.engine.client import EngineDeadError
from shoal.envs import ENVS
from shoal.logger import init_logger

logger = init_logger(__name__)


def build_app(
    ctx: ServingContext, config: ServerConfig, admission: AdmissionControl | None = None
) -> App:
    """The ASGI app with every route; `/v1/*` needs `Authorization: Bearer <api_key>` when
    `config.api_key` is set; the generation routes hold an `admission` place while they run;
    bodies over `config.max_request_body_bytes` get 413."""
    cors = CorsPolicy(
        config.allowed_origins,
        config.allowed_methods,
        config.allowed_headers,
        config.allow_credentials,
    )
    app = App(admission, config.max_request_body_bytes, cors, config.access_log)
    guard = _api_key_guard(config.api_key) if config.api_key else None

    def v1(
        handler: Callable[[ServingContext, Request], Awaitable[Response | StreamingResponse]],
    ) -> Callable[[Request], Awaitable[Response | StreamingResponse]]:
        if config.restart_dead_engines:  # a dead engine comes back: tell clients when to retry
            return functools.partial(_retry_later, handler, ctx)
        return functools.partial(handler, ctx)

    for path, handler in (
        ("/v1/completions", create_completion),
        ("/v1/chat/completions", create_chat_completion),
        ("/v1/responses", create_response),
        ("/v1/embeddings", create_embedding),
    ):
        app.route("POST", path, v1(handler), watch_disconnect=True, admit=True, guard=guard)
    app.route("GET", "/v1/models", v1(list_models), guard=guard)
    app.route("GET", "/v1/models/", v1(retrieve_model), guard=guard, prefix=True)
    app.route("GET", "/health", functools.partial(health, ctx))
    app.route("GET", "/metrics", functools.partial(metrics_route, ctx, admission))
    view = DashboardView(
        ctx.engine.metrics, ctx.model_name, admission, lambda: ctx.engine.client.down
    )
    add_dashboard_routes(app, view, config.api_key)
    app.route("GET", "/version", version)
    openapi = Response(msgspec.json.encode(build_openapi(api_key=bool(config.api_key))))
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
    """A guard refusing (401) requests without `Authorization: Bearer <api_key>` or
    `x-api-key: <api_key>` (what Anthropic-style clients and some proxies send); the
    comparison takes the same time wherever the given value first differs."""
    expected = f"Bearer {api_key}".encode()
    expected_key = api_key.encode()

    def check(request: Request) -> None:
        given = request.headers.get("authorization", "").encode("latin-1")
        given_key = request.headers.get("x-api-key", "").encode("latin-1")
        # Both compared, always: no timing difference tells which header was tried.
        bearer_ok = secrets.compare_digest(given, expected)
        key_ok = secrets.compare_digest(given_key, expected_key)
        if not (bearer_ok or key_ok):
            raise HTTPError(
                401, "invalid or missing API key (Authorization: Bearer <key>, or x-api-key)"
            )

    return check


def _model_card(ctx: ServingContext) -> ModelCard:
    return ModelCard(
        ctx.model_name, now_s(), ctx.engine.max_model_len, root=ctx.tokenizer.name_or_path or None
    )


async def list_models(ctx: ServingContext, request: Request) -> Response:
    return json_response(ModelList([_model_card(ctx)]))


async def retrieve_model(ctx: ServingContext, request: Request) -> Response:
    """`GET /v1/models/{id}`: the served model's card; 404 naming `model` for another id
    (the id may hold slashes, as Hugging Face names do)."""
    model_id = urllib.parse.unquote(request.path.removeprefix("/v1/models/"))
    if model_id != ctx.model_name:
        raise HTTPError(404, f"The model `{model_id}` does not exist.", "model")
    return json_response(_model_card(ctx))


async def health(ctx: ServingContext, request: Request) -> Response:
    """200 (no body, no Content-Type) while every engine is alive; 503 (with the reason) once one died. With
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
    return Response(b"", 200, content_type=b"")  # no body, so no JSON label


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
    shoal.api.metrics). `x-shoal-server` names the one that answered. `?prefix=vllm` or
    `?prefix=shoal`: only that set of names (400 naming `prefix` for another value)."""
    prefixes = metric_prefixes(request.scope.get("query_string", b""))
    cache_config = [(e.block_size, e.num_blocks) for e in ctx.engine.client.engines]
    text = ctx.engine.metrics.render(ctx.model_name, cache_config, prefixes)
    if "shoal:" in prefixes:
        text += _admission_metrics(admission, ctx.model_name)
    text += render_process_metrics()
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
