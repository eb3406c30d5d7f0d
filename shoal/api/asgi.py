"""A small raw-ASGI application core: routing, JSON/SSE responses, OpenAI error bodies, disconnects.

Each HTTP request: run the route's guard on the headers (API key), read the whole body (at
most `App.max_body_bytes`: 413 as soon as the declared or received size exceeds it), take
an admission place for generation routes (503 + Retry-After when the run is full), then run
the handler and a disconnect watcher side by side. A client that goes away cancels the
handler, whose generators abort their engine requests in `finally`. Errors map to OpenAI's
body `{"error": {message, type, param, code}}`; no traceback ever reaches a client.

Shutdown: requests still running at the drain deadline are failed by the engine layer
(`ServerShuttingDownError`: a 503, or a stream's final error event and `[DONE]`) and end by
themselves. uvicorn cancels, a little later, only what still did not end; such a request is
answered 503 if nothing was sent yet, else its connection is closed, and nothing is re-raised
(uvicorn would log the cancellation as a traceback).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec

from shoal.api.access_log import header, log_access, status_recorder
from shoal.api.admission import RETRY_AFTER_S, AdmissionControl
from shoal.api.cors import CorsPolicy
from shoal.api.protocol import ErrorInfo, ErrorResponse, validation_param
from shoal.engine.client import EngineDeadError, ServerShuttingDownError
from shoal.logger import init_logger

logger = init_logger(__name__)

# Default request body limit: a max_model_len prompt as JSON token ids or text is well under
# a MiB for the context lengths shoal serves; 4 MiB leaves room without inviting floods.
MAX_BODY_BYTES = 4 << 20
_JSON = b"application/json"
_json_encoder = msgspec.json.Encoder()

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

_ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    405: "MethodNotAllowed",
    413: "RequestTooLargeError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


class HTTPError(Exception):
    """Answer the request with `status`, an OpenAI error body and extra `headers`."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.headers = headers or []

    def response(self) -> Response:
        return Response(
            error_body(self.status, self.message, self.param), self.status, headers=self.headers
        )


def error_body(status: int, message: str, param: str | None = None) -> bytes:
    info = ErrorInfo(message, _ERROR_TYPES.get(status, "Error"), param, status)
    return _json_encoder.encode(ErrorResponse(info))


def error_for(exc: BaseException) -> tuple[int, bytes]:
    """Status and body for an exception raised while serving a request."""
    if isinstance(exc, HTTPError):
        return exc.status, error_body(exc.status, exc.message, exc.param)
    if isinstance(exc, msgspec.ValidationError):
        return 400, error_body(400, str(exc), validation_param(str(exc)))
    if isinstance(exc, msgspec.DecodeError):
        return 400, error_body(400, f"the request body is not valid JSON: {exc}")
    if isinstance(exc, ValueError):
        return 400, error_body(400, str(exc), validation_param(str(exc)))
    if isinstance(exc, ServerShuttingDownError):
        return 503, error_body(503, str(exc))
    if isinstance(exc, EngineDeadError):
        return 503, error_body(503, f"the engine is not available: {exc}")
    logger.error("unhandled error while serving a request", exc_info=exc)
    return 500, error_body(500, "internal server error (see the server log)")


class Request:
    """One HTTP request with its body already read."""

    __slots__ = ("scope", "body", "headers")

    def __init__(self, scope: Scope, body: bytes) -> None:
        self.scope = scope
        self.body = body
        self.headers: dict[str, str] = {
            k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]
        }

    @property
    def path(self) -> str:
        return str(self.scope["path"])

    def json(self, type_: type[Any]) -> Any:
        """The body decoded as `type_`; msgspec errors become 400s (see `error_for`)."""
        if not self.body:
            raise HTTPError(400, "the request body is empty; expected a JSON object")
        return msgspec.json.decode(self.body, type=type_)


class Response:
    """A complete response (`content_type` empty: no Content-Type header, for no body)."""

    def __init__(
        self,
        body: bytes,
        status: int = 200,
        content_type: bytes = _JSON,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        self.body, self.status = body, status
        self.headers = [(b"content-type", content_type)] if content_type else []
        self.headers += headers or []

    async def send(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status, "headers": self.headers})
        await send({"type": "http.response.body", "body": self.body})


def json_response(
    obj: Any, status: int = 200, headers: list[tuple[bytes, bytes]] | None = None
) -> Response:
    return Response(_json_encoder.encode(obj), status, headers=headers)


class StreamingResponse:
    """Server-sent events: each item of `events` is one encoded `data:` payload, or with
    `framed` one or more complete events (`data: ...\n\n` each, written at once). An error
    after the headers went out is sent as a final `data: {"error": ...}` event. `done`: end
    with `data: [DONE]` (the Chat and Completions APIs; the Responses API does not)."""

    def __init__(
        self,
        events: AsyncIterator[bytes],
        headers: list[tuple[bytes, bytes]] | None = None,
        framed: bool = False,
        done: bool = True,
    ) -> None:
        self.events = events
        self.framed = framed
        self.done = done
        self.headers = [
            (b"content-type", b"text/event-stream"),
            (b"cache-control", b"no-cache"),
            *(headers or []),
        ]

    async def send(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.headers})
        try:
            if self.framed:
                async for data in self.events:
                    await send({"type": "http.response.body", "body": data, "more_body": True})
            else:
                async for payload in self.events:
                    await send(
                        {
                            "type": "http.response.body",
                            "body": b"data: " + payload + b"\n\n",
                            "more_body": True,
                        }
                    )
        except Exception as e:
            _, body = error_for(e)
            await send(
                {
                    "type": "http.response.body",
                    "body": b"data: " + body + b"\n\n",
                    "more_body": True,
                }
            )
        await send(
            {"type": "http.response.body", "body": b"data: [DONE]\n\n" if self.done else b""}
        )


Handler = Callable[[Request], Awaitable[Response | StreamingResponse]]
# Runs before admission and the handler; raises HTTPError to refuse (the API key check).
Guard = Callable[[Request], None]


class App:
    """The ASGI callable: `(method, path) -> handler`, plus lifespan hooks."""

    def __init__(
        self,
        admission: AdmissionControl | None = None,
        max_body_bytes: int = MAX_BODY_BYTES,
        cors: CorsPolicy | None = None,
        access_log: bool = False,
    ) -> None:
        """`cors`: answer preflights and label cross-origin responses (None: no CORS).
        `access_log`: one INFO line per request (client, method, path, status, time)."""
        self.routes: dict[tuple[str, str], Handler] = {}
        # (method, path prefix) -> handler, for paths with a parameter (/v1/models/{id}).
        self._prefixes: dict[tuple[str, str], Handler] = {}
        self.cors = cors
        self.access_log = access_log
        self._watched: set[tuple[str, str]] = set()
        self._admitted: set[tuple[str, str]] = set()
        self._guards: dict[tuple[str, str], Guard] = {}
        self.admission = admission
        self.max_body_bytes = max_body_bytes
        self.on_shutdown: list[Callable[[], Awaitable[None]]] = []

    def route(
        self,
        method: str,
        path: str,
        handler: Handler,
        watch_disconnect: bool = False,
        admit: bool = False,
        guard: Guard | None = None,
        prefix: bool = False,
    ) -> None:
        """Serve `method path` with `handler`. `watch_disconnect`: cancel the handler when
        the client goes away (generation routes; quick routes skip the watcher's cost).
        `admit`: the request holds an admission place until its response is done.
        `guard`: a check run first (HTTPError refuses the request). `prefix`: `path` ends
        with "/" and the route serves every longer path under it (exact routes win)."""
        if prefix:
            self._prefixes[(method, path)] = handler
        else:
            self.routes[(method, path)] = handler
        if watch_disconnect:
            self._watched.add((method, path))
        if admit:
            self._admitted.add((method, path))
        if guard is not None:
            self._guards[(method, path)] = guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                for hook in self.on_shutdown:
                    with contextlib.suppress(Exception):
                        await hook()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        """CORS and the access log around `_serve`."""
        start = time.monotonic()
        status: list[int] = []
        if self.access_log:
            send = status_recorder(send, status)
        origin = header(scope, b"origin")
        if self.cors is not None and origin is not None:
            if scope["method"] == "OPTIONS" and header(scope, b"access-control-request-method"):
                code, headers = self.cors.preflight(origin, Request(scope, b"").headers)
                body = b"OK" if code == 200 else b"Disallowed CORS request"
                await Response(body, code, b"text/plain; charset=utf-8", headers).send(send)
                if self.access_log:
                    log_access(scope, status, start)
                return
            send = self.cors.wrap(send, origin)
        try:
            await self._serve(scope, receive, send)
        finally:
            if self.access_log:
                log_access(scope, status, start)

    def _lookup(self, method: str, path: str) -> tuple[tuple[str, str], Handler] | None:
        handler = self.routes.get((method, path))
        if handler is not None:
            return (method, path), handler
        for (m, prefix), handler in self._prefixes.items():
            if m == method and path.startswith(prefix) and len(path) > len(prefix):
                return (m, prefix), handler
        return None

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        found = self._lookup(scope["method"], scope["path"])
        if found is None:
            path = scope["path"]
            known = any(p == path for _, p in self.routes) or any(
                path.startswith(p) and len(path) > len(p) for _, p in self._prefixes
            )
            status = 405 if known else 404
            message = (
                f"method {scope['method']} is not allowed on {scope['path']}"
                if known
                else f"no route {scope['path']}"
            )
            await Response(error_body(status, message), status).send(send)
            return
        key, handler = found
        guard = self._guards.get(key)
        try:
            if guard is not None:
                guard(Request(scope, b""))  # headers only: refuse before reading any body
        except HTTPError as e:
            await e.response().send(send)
            return
        body = await _read_body(scope, receive, self.max_body_bytes)
        if body is None:
            return  # disconnected while sending the body
        if isinstance(body, HTTPError):
            await body.response().send(send)
            return
        request = Request(scope, body)
        admission = self.admission if key in self._admitted else None
        if admission is not None and not admission.try_acquire():
            retry = [(b"retry-after", str(RETRY_AFTER_S).encode())]
            await HTTPError(503, admission.refusal_message(), headers=retry).response().send(send)
            return
        progress = _Progress()
        try:
            work = self._respond(handler, request, send, progress)
            if key in self._watched:
                await _run_until_disconnect(work, receive)
            else:
                await work
        except asyncio.CancelledError:
            # Only uvicorn cancels a request's own task (a disconnect cancels the inner one):
            # its shutdown grace ended and this response had not ended by itself.
            await _cut_off(request, progress, send)
        finally:
            if admission is not None:
                admission.release()

    async def _respond(
        self, handler: Handler, request: Request, send: Send, progress: _Progress
    ) -> None:
        try:
            response = await handler(request)
        except Exception as e:
            status, body = error_for(e)
            response = Response(body, status)
        progress.response_started = True
        await response.send(send)


class _Progress:
    """How far one request's response got (for a cut-off at the end of the shutdown grace)."""

    __slots__ = ("response_started",)

    def __init__(self) -> None:
        self.response_started = False


async def _cut_off(request: Request, progress: _Progress, send: Send) -> None:
    """End a request uvicorn cancelled at the end of its shutdown grace, without re-raising:
    a 503 if nothing was sent yet; else uvicorn closes the connection (a stream stuck here
    could not take its final error event: its client stopped reading)."""
    logger.warning("%s cut off: still running at the end of the shutdown grace", request.path)
    if not progress.response_started:
        body = error_body(503, "the server is shutting down; retry the request")
        await Response(body, 503).send(send)


async def _read_body(scope: Scope, receive: Receive, limit: int) -> bytes | HTTPError | None:
    """The whole body; an HTTPError(413) as soon as the declared Content-Length or the bytes
    received so far exceed `limit` (the rest is never read); None if the client left."""
    too_large = HTTPError(413, f"the request body exceeds {limit} bytes (--max-request-body-bytes)")
    for name, value in scope["headers"]:
        if name.lower() == b"content-length":
            try:
                if int(value) > limit:
                    return too_large
            except ValueError:
                return HTTPError(400, "the Content-Length header is not a number")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return too_large
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _run_until_disconnect(work: Awaitable[None], receive: Receive) -> None:
    """Run `work`; if the client disconnects first, cancel it (its `finally` blocks abort
    the engine requests)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(receive))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
        watcher.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        except Exception:
            # Sending failed (the connection broke mid-response): nothing left to tell.
            logger.debug("response not completed", exc_info=True)


async def _wait_for_disconnect(receive: Receive) -> None:
    # After the body, uvicorn's receive() blocks until the client goes away (or the response
    # is complete, by which time `work` is done and this watcher is cancelled).
    while (await receive())["type"] != "http.disconnect":
        pass
