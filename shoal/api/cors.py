"""CORS for the API server: preflight answers and the headers of cross-origin responses
(`--allowed-origins`, `--allowed-methods`, `--allowed-headers`, `--allow-credentials`), with
the semantics of Starlette's `CORSMiddleware`, which vLLM's server uses."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

Send = Callable[[dict[str, Any]], Awaitable[None]]

ALL_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")
# How long a browser may cache a preflight answer.
MAX_AGE_S = 600


class CorsPolicy:
    """Which cross-origin requests a browser may make. "*" in a list allows any value."""

    def __init__(
        self,
        allowed_origins: Sequence[str] = ("*",),
        allowed_methods: Sequence[str] = ("*",),
        allowed_headers: Sequence[str] = ("*",),
        allow_credentials: bool = False,
    ) -> None:
        self.any_origin = "*" in allowed_origins
        self.origins = frozenset(allowed_origins)
        self.methods = (
            ALL_METHODS if "*" in allowed_methods else tuple(m.upper() for m in allowed_methods)
        )
        self.any_header = "*" in allowed_headers
        self.headers = frozenset(h.lower() for h in allowed_headers)
        self.allow_credentials = allow_credentials
        # "*" cannot be combined with credentials: the origin is echoed instead.
        self._star = self.any_origin and not allow_credentials

    def is_allowed_origin(self, origin: str) -> bool:
        return self.any_origin or origin in self.origins

    def preflight(
        self, origin: str, headers: dict[str, str]
    ) -> tuple[int, list[tuple[bytes, bytes]]]:
        """The status and headers answering an OPTIONS preflight from `origin`: 200 when the
        origin, the requested method and every requested header are allowed, else 400."""
        out = self._origin_headers(origin) if self.is_allowed_origin(origin) else []
        out += [
            (b"access-control-allow-methods", ", ".join(self.methods).encode()),
            (b"access-control-max-age", str(MAX_AGE_S).encode()),
        ]
        requested = headers.get("access-control-request-headers", "")
        if self.any_header and requested:
            out.append((b"access-control-allow-headers", requested.encode("latin-1")))
        elif not self.any_header:
            out.append((b"access-control-allow-headers", ", ".join(sorted(self.headers)).encode()))
        method = headers.get("access-control-request-method", "").upper()
        asked = {h.strip().lower() for h in requested.split(",") if h.strip()}
        ok = (
            self.is_allowed_origin(origin)
            and method in self.methods
            and (self.any_header or asked <= self.headers | _SAFELISTED)
        )
        return (200 if ok else 400), out

    def wrap(self, send: Send, origin: str) -> Send:
        """`send`, adding the CORS headers to the response start of an allowed origin."""
        if not self.is_allowed_origin(origin):
            return send
        extra = self._origin_headers(origin)

        async def send_with_cors(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        return send_with_cors

    def _origin_headers(self, origin: str) -> list[tuple[bytes, bytes]]:
        if self._star:
            out = [(b"access-control-allow-origin", b"*")]
        else:
            out = [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")]
        if self.allow_credentials:
            out.append((b"access-control-allow-credentials", b"true"))
        return out


# Request headers a browser never asks permission for (the CORS-safelisted ones).
_SAFELISTED = frozenset({"accept", "accept-language", "content-language", "content-type"})
