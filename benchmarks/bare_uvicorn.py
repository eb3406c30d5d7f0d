"""Front-end baseline: a bare uvicorn app (uvloop + httptools, as shoal's API servers run it)
that streams OpenAI completion chunks with no engine behind it.

POST /v1/completions (and /v1/chat/completions) answers a streamed request with `max_tokens`
SSE chunks in the OpenAI chunk format (shoal's field order and sizes, a word per chunk), the
usage chunk when `stream_options.include_usage` is set, then `data: [DONE]`. Between chunks
the handler yields to the event loop once (`asyncio.sleep(0)`), so concurrent streams
interleave chunk by chunk as they do behind an engine that emits one token per step;
`--burst` sends each stream's chunks back to back instead. `--tick-ms T` paces the streams
like an engine's steps: every T ms each open stream sends its next chunk, one write per
stream per tick, so the client wakes once per chunk as it does against shoal (the per-token
cost of a Python front end at an engine's pace rather than flat out). GET /health and
/v1/models answer like shoal's, so `shoal bench serve` runs against it unchanged.

    python benchmarks/bare_uvicorn.py --port 8001 [--workers 2] [--tick-ms 10]

With `--workers N` the parent binds the socket once and forks N workers titled
`bare::Worker_<i>` that share it (as shoal's API servers share the launcher's socket).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import signal
import socket
import sys
import time
import uuid
from typing import Any

import msgspec
import uvicorn
import uvloop

MODEL = "bare-uvicorn"
WORDS = [f" w{i}" for i in range(64)]


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Choice(msgspec.Struct):
    index: int
    text: str
    logprobs: None = None
    finish_reason: str | None = None
    stop_reason: None = None


class Delta(msgspec.Struct, omit_defaults=True):
    role: str | None = None
    content: str | None = None


class ChatChoice(msgspec.Struct):
    index: int
    delta: Delta
    logprobs: None = None
    finish_reason: str | None = None
    stop_reason: None = None


class Chunk(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[Any]
    usage: Usage | None = None
    object: str = "text_completion"


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class Body(msgspec.Struct):
    prompt: str | list[int] | None = None
    messages: list[Any] | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None


_encode = msgspec.json.Encoder().encode
_decode_body = msgspec.json.Decoder(Body).decode
_JSON = [(b"content-type", b"application/json")]
_SSE = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


def _prompt_tokens(body: Body) -> int:
    if isinstance(body.prompt, list):
        return len(body.prompt)
    return len((body.prompt or "").split()) or 1


class Ticker:
    """A shared clock: `await tick()` returns at the next multiple of `period_s`."""

    def __init__(self, period_s: float) -> None:
        self.period_s = period_s
        self._next: asyncio.Future[None] | None = None
        self._last = 0.0  # the deadline of the last tick

    async def tick(self) -> None:
        if self._next is None:
            loop = asyncio.get_running_loop()
            self._next = loop.create_future()
            when = (loop.time() // self.period_s + 1) * self.period_s
            # Timers may fire a little early, before the multiple they were set for: never
            # schedule the same tick twice.
            when = max(when, self._last + self.period_s)
            self._last = when
            loop.call_at(when, self._fire, self._next)
        await self._next

    def _fire(self, future: asyncio.Future[None]) -> None:
        self._next = None
        future.set_result(None)


class App:
    """The raw ASGI app."""

    def __init__(self, burst: bool, tick_ms: float = 0.0) -> None:
        self.burst = burst
        self.ticker = Ticker(tick_ms / 1000) if tick_ms > 0 else None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        path, method = scope["path"], scope["method"]
        if method == "GET" and path == "/health":
            await _respond(send, 200, b"")
        elif method == "GET" and path == "/v1/models":
            card = {"id": MODEL, "object": "model", "created": int(time.time())}
            await _respond(send, 200, _encode({"object": "list", "data": [card]}))
        elif method == "POST" and path in ("/v1/completions", "/v1/chat/completions"):
            body = await _read_body(receive)
            await self._complete(_decode_body(body), path.endswith("chat/completions"), send)
        else:
            await _respond(send, 404, b'{"error": {"message": "no route"}}')

    async def _complete(self, body: Body, is_chat: bool, send: Any) -> None:
        num_tokens = body.max_completion_tokens or body.max_tokens or 16
        usage = Usage(_prompt_tokens(body), num_tokens, _prompt_tokens(body) + num_tokens)
        request_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        kind = "chat.completion.chunk" if is_chat else "text_completion"
        if not body.stream:
            choice = Choice(0, "".join(WORDS[i % 64] for i in range(num_tokens)), None, "length")
            await _respond(send, 200, _encode(Chunk(request_id, created, MODEL, [choice], usage)))
            return
        await send({"type": "http.response.start", "status": 200, "headers": _SSE})
        for i in range(num_tokens):
            reason = "length" if i == num_tokens - 1 else None
            text = WORDS[i % 64]
            choice = (
                ChatChoice(0, Delta(content=text), None, reason)
                if is_chat
                else Choice(0, text, None, reason)
            )
            payload = _encode(Chunk(request_id, created, MODEL, [choice], None, kind))
            if self.ticker is not None:
                await self.ticker.tick()
            await send(_body(b"data: " + payload + b"\n\n"))
            if not self.burst and self.ticker is None:
                await asyncio.sleep(0)
        if body.stream_options is not None and body.stream_options.include_usage:
            payload = _encode(Chunk(request_id, created, MODEL, [], usage, kind))
            await send(_body(b"data: " + payload + b"\n\n"))
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})


def _body(data: bytes) -> dict[str, Any]:
    return {"type": "http.response.body", "body": data, "more_body": True}


async def _respond(send: Any, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": _JSON})
    await send({"type": "http.response.body", "body": body})


async def _read_body(receive: Any) -> bytes:
    parts = []
    while True:
        message = await receive()
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(parts)


def _serve(sock: socket.socket, burst: bool, title: str, tick_ms: float = 0.0) -> None:
    """One worker: uvicorn on the shared socket until SIGTERM / SIGINT."""
    with contextlib.suppress(ImportError):
        import setproctitle

        setproctitle.setproctitle(title)
    # uvicorn re-raises the signal that stopped it once it has shut down; with a no-op
    # handler in place the worker then exits 0 instead of dying by SIGTERM.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    signal.signal(signal.SIGINT, lambda signum, frame: None)
    config = uvicorn.Config(
        App(burst, tick_ms),
        loop="uvloop",
        http="httptools",
        lifespan="on",
        log_level="warning",
        access_log=False,
        timeout_keep_alive=5,
    )
    uvloop.run(uvicorn.Server(config).serve(sockets=[sock]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--workers", type=int, default=1, help="processes sharing the socket")
    parser.add_argument("--burst", action="store_true", help="no yield between chunks")
    parser.add_argument(
        "--tick-ms", type=float, default=0.0, help="pace: one chunk per stream every T ms"
    )
    args = parser.parse_args(argv)
    if args.workers < 1:
        raise SystemExit("--workers: must be at least 1")
    if args.tick_ms < 0:
        raise SystemExit("--tick-ms: must be >= 0")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(2048)
    print(f"bare uvicorn listening on http://{args.host}:{sock.getsockname()[1]}", flush=True)
    if args.workers == 1:
        _serve(sock, args.burst, "bare::Worker_0", args.tick_ms)
        return 0
    ctx = multiprocessing.get_context("fork")
    workers = [
        ctx.Process(
            target=_serve, args=(sock, args.burst, f"bare::Worker_{i}", args.tick_ms), daemon=True
        )
        for i in range(args.workers)
    ]
    for worker in workers:
        worker.start()
    stop = [False]

    def on_signal(signum: int, frame: Any) -> None:
        stop[0] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not stop[0] and all(w.is_alive() for w in workers):
        time.sleep(0.05)
    for worker in workers:
        if worker.pid is not None and worker.is_alive():
            os.kill(worker.pid, signal.SIGTERM)
    for worker in workers:
        worker.join(5)
        if worker.is_alive():
            worker.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
