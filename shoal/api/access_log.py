"""The API server's access log (`--enable-access-log`): one INFO line per HTTP request."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from shoal.logger import init_logger

logger = init_logger(__name__)

Send = Callable[[dict[str, Any]], Awaitable[None]]


def header(scope: dict[str, Any], name: bytes) -> str | None:
    """The first value of request header `name` (lower case), or None."""
    for key, value in scope["headers"]:
        if key.lower() == name:
            return str(value.decode("latin-1"))
    return None


def status_recorder(send: Send, status: list[int]) -> Send:
    """`send`, appending the response's status code to `status` when it starts."""

    async def send_recording_status(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            status.append(int(message["status"]))
        await send(message)

    return send_recording_status


def log_access(scope: dict[str, Any], status: list[int], start: float) -> None:
    """`127.0.0.1:51234 "POST /v1/completions HTTP/1.1" 200 31.9ms` (status "-" when the
    request ended before a response started; `start`: time.monotonic() at arrival)."""
    client = scope.get("client")
    peer = f"{client[0]}:{client[1]}" if client else "-"
    query = scope.get("query_string", b"")
    path = scope["path"] + (f"?{query.decode('latin-1')}" if query else "")
    logger.info(
        '%s "%s %s HTTP/%s" %s %.1fms',
        peer, scope["method"], path, scope.get("http_version", "1.1"),
        status[0] if status else "-", 1e3 * (time.monotonic() - start),
    )  # fmt: skip
