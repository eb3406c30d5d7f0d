"""The OpenAPI 3.1 document served at GET /openapi.json, generated from the msgspec Structs.

Request and response schemas come from `msgspec.json.schema_components`, so the document
never drifts from what the server decodes. Every error response is the OpenAI error body
(`ErrorResponse`). It describes the routes of `shoal.api.server.build_app`.
"""

from __future__ import annotations

from typing import Any

import msgspec

import shoal
from shoal.api.embeddings import EmbeddingRequest, EmbeddingResponse
from shoal.api.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    ErrorResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
)
from shoal.api.responses import ResponsesRequest

_REF = "#/components/schemas/{name}"
_SCHEMA_TYPES = (
    CompletionRequest,
    ChatCompletionRequest,
    TokenizeRequest,
    DetokenizeRequest,
    CompletionResponse,
    ChatCompletionResponse,
    ModelList,
    ErrorResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    ModelCard,
    ResponsesRequest,
)

# (method, path, summary, request Struct, success Struct, error statuses, needs the API key)
_ROUTES: tuple[tuple[str, str, str, type | None, type | None, tuple[int, ...], bool], ...] = (
    (
        "post",
        "/v1/completions",
        "Text completion (stream: true answers with server-sent events)",
        CompletionRequest,
        CompletionResponse,
        (400, 401, 404, 413, 503),
        True,
    ),
    (
        "post",
        "/v1/chat/completions",
        "Chat completion (stream: true answers with server-sent events)",
        ChatCompletionRequest,
        ChatCompletionResponse,
        (400, 401, 404, 413, 503),
        True,
    ),
    (
        "post",
        "/v1/embeddings",
        "Embeddings of texts or token ids (pooled final hidden states, L2-normalized)",
        EmbeddingRequest,
        EmbeddingResponse,
        (400, 401, 404, 413, 503),
        True,
    ),
    (
        "post",
        "/v1/responses",
        "OpenAI's Responses API, text only (stream: true answers with its events)",
        ResponsesRequest,
        None,
        (400, 401, 404, 413, 503),
        True,
    ),
    ("get", "/v1/models", "The served model", None, ModelList, (401,), True),
    ("get", "/v1/models/{model}", "One model's card", None, ModelCard, (401, 404), True),
    (
        "get",
        "/health",
        (
            "200 while every engine is alive; with --restart-dead-engines also 200 (a "
            "'degraded' JSON body) while one restarts and another serves; else 503"
        ),
        None,
        None,
        (503,),
        False,
    ),
    ("get", "/metrics", "Prometheus text of the whole run", None, None, (), False),
    ("get", "/version", "The shoal version", None, None, (), False),
    ("get", "/openapi.json", "This document", None, None, (), False),
    (
        "post",
        "/tokenize",
        "Text or chat messages to token ids",
        TokenizeRequest,
        None,
        (400,),
        False,
    ),
    ("post", "/detokenize", "Token ids to text", DetokenizeRequest, None, (400,), False),
)
_ERROR_TEXT = {
    400: "bad request (the error's param names the field)",
    401: "missing or wrong API key",
    404: "unknown model",
    413: "request body too large (--max-request-body-bytes)",
    503: "an engine died, or the run is full (--max-num-queued-requests; see Retry-After)",
}


def _ref(type_: type) -> dict[str, str]:
    return {"$ref": _REF.format(name=type_.__name__)}


def _operation(
    summary: str,
    request: type | None,
    success: type | None,
    errors: tuple[int, ...],
    secured: bool,
) -> dict[str, Any]:
    ok: dict[str, Any] = {"description": "success"}
    if success is not None:
        ok["content"] = {"application/json": {"schema": _ref(success)}}
        if request in (CompletionRequest, ChatCompletionRequest):
            ok["content"]["text/event-stream"] = {"schema": {"type": "string"}}
    responses: dict[str, Any] = {"200": ok}
    for status in errors:
        responses[str(status)] = {
            "description": _ERROR_TEXT[status],
            "content": {"application/json": {"schema": _ref(ErrorResponse)}},
        }
    operation: dict[str, Any] = {"summary": summary, "responses": responses}
    if request is not None:
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": _ref(request)}},
        }
    if secured:
        operation["security"] = [{"bearer": []}]
    return operation


def build_openapi(api_key: bool) -> dict[str, Any]:
    """The OpenAPI document; `api_key`: the /v1 routes require `Authorization: Bearer`."""
    _, components = msgspec.json.schema_components(_SCHEMA_TYPES, ref_template=_REF)
    paths: dict[str, dict[str, Any]] = {}
    for method, path, summary, request, success, errors, secured in _ROUTES:
        paths.setdefault(path, {})[method] = _operation(
            summary, request, success, errors, secured and api_key
        )
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "shoal", "version": shoal.__version__},
        "paths": paths,
        "components": {"schemas": components},
    }
    if api_key:
        document["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return document
