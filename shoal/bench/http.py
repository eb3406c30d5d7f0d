"""A minimal asyncio HTTP/1.1 client for benchmarks: keep-alive connections, httptools parsing,
server-sent events delivered by callback with the arrival time of the bytes that carried them.

Why not httpx or aiohttp: the load generator shares the machine's cores with the server under
test, so its cost per streamed chunk is part of what is measured. Here a chunk costs one
`data_received` call, one C-level parse and one callback; no coroutine switch per chunk.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast
from urllib.parse import urlsplit

import httptools

# (payload of one `data:` line, perf_counter() when its bytes arrived)
EventCallback = Callable[[bytes, float], None]


class HTTPClientError(Exception):
    """The connection failed or the response was not valid HTTP."""


@dataclass
class Response:
    """A finished response. `body` is empty when events were delivered by callback."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    keep_alive: bool = True


class _Exchange:
    """Parser callbacks of one request/response on a connection."""

    def __init__(self, on_event: EventCallback | None) -> None:
        self.on_event = on_event
        self.response = Response(0)
        self.done: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        self.received_any = False
        self._body: list[bytes] = []
        self._pending = b""  # an SSE event split across reads
        self.now = 0.0  # arrival time of the bytes being parsed
        self.parser = httptools.HttpResponseParser(self)

    # httptools callbacks ------------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        self.response.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.response.status = self.parser.get_status_code()

    def on_body(self, data: bytes) -> None:
        if self.on_event is None or self.response.status != 200:
            self._body.append(data)
            return
        # SSE: events end with a blank line; the servers under test write "\n\n".
        buffer = self._pending + data if self._pending else data
        *events, self._pending = buffer.split(b"\n\n")
        for event in events:
            for line in event.split(b"\n"):
                if line.startswith(b"data:"):
                    self.on_event(line[5:].strip(), self.now)

    def on_message_complete(self) -> None:
        self.response.body = b"".join(self._body)
        self.response.keep_alive = self.parser.should_keep_alive()
        if not self.done.done():
            self.done.set_result(self.response)


class Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._exchange: _Exchange | None = None

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        loop = asyncio.get_running_loop()
        try:
            _, protocol = await loop.create_connection(cls, host, port)
        except OSError as e:
            raise HTTPClientError(f"cannot connect to {host}:{port}: {e}") from e
        return protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses but have its methods.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        exchange = self._exchange
        if exchange is None:
            return
        exchange.received_any = True
        exchange.now = time.perf_counter()
        try:
            exchange.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(HTTPClientError(f"invalid HTTP response: {e}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(HTTPClientError(f"connection closed before the response ended: {exc}"))

    def _fail(self, error: Exception) -> None:
        if self._exchange is not None and not self._exchange.done.done():
            self._exchange.done.set_exception(error)
        if self.transport is not None:
            self.transport.close()
        self.closed = True

    async def request(
        self,
        method: str,
        host: str,
        path: str,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        on_event: EventCallback | None = None,
    ) -> tuple[Response, bool]:
        """Send one request and wait for the whole response. `on_event`: SSE `data:`
        payloads of a 200 response go there instead of into `body`. Returns the response
        and whether any byte of it arrived (a failed reused connection with none can be
        retried)."""
        if self.transport is None or self.closed:
            raise HTTPClientError("connection is closed")
        exchange = _Exchange(on_event)
        self._exchange = exchange
        lines = [f"{method} {path} HTTP/1.1", f"host: {host}", f"content-length: {len(body)}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        try:
            response = await exchange.done
        except HTTPClientError:
            if exchange.received_any:
                raise
            raise _NothingReceived() from None
        finally:
            self._exchange = None
        return response, exchange.received_any

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True


class _NothingReceived(HTTPClientError):
    """The connection failed before any byte of the response arrived."""


class HTTPClient:
    """A pool of keep-alive connections to one `http://host:port` base URL."""

    def __init__(self, base_url: str) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"--base-url: expected http://host[:port], got {base_url!r}")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.host_header = f"{self.host}:{self.port}"
        self.base_path = parts.path.rstrip("/")
        self._idle: list[Connection] = []

    async def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        on_event: EventCallback | None = None,
    ) -> Response:
        """One request on a pooled connection. A reused connection that the server closed
        while idle (keep-alive timeout) is retried once on a fresh one."""
        full_path = self.base_path + path
        while self._idle:
            connection = self._idle.pop()
            if connection.closed:
                continue
            try:
                response, _ = await connection.request(
                    method, self.host_header, full_path, body, headers, on_event
                )
            except _NothingReceived:
                continue  # closed by the server while idle: try another
            return self._release(connection, response)
        connection = await Connection.open(self.host, self.port)
        try:
            response, _ = await connection.request(
                method, self.host_header, full_path, body, headers, on_event
            )
        except BaseException:
            connection.close()
            raise
        return self._release(connection, response)

    def _release(self, connection: Connection, response: Response) -> Response:
        if response.keep_alive and not connection.closed:
            self._idle.append(connection)
        else:
            connection.close()
        return response

    async def get(self, path: str) -> Response:
        return await self.request("GET", path)

    def close(self) -> None:
        for connection in self._idle:
            connection.close()
        self._idle.clear()


async def wait_for_health(base_url: str, timeout_s: float, path: str = "/health") -> float:
    """Poll GET `path` until it answers 200; returns the seconds waited. `TimeoutError` names
    the last failure after `timeout_s`."""
    client = HTTPClient(base_url)
    start = time.perf_counter()
    last = "no answer"
    try:
        while True:
            try:
                response = await client.get(path)
                if response.status == 200:
                    return time.perf_counter() - start
                last = f"status {response.status}"
            except HTTPClientError as e:
                last = str(e)
            if time.perf_counter() - start > timeout_s:
                raise TimeoutError(f"{base_url}{path} not healthy after {timeout_s} s ({last})")
            await asyncio.sleep(0.02)
    finally:
        client.close()
