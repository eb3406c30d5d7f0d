"""The ASGI core under hostile or broken requests, in process: no traceback or internal detail
in any response (full or streamed), the API key checked before admission, body limits."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from shoal.api.admission import AdmissionControl
from shoal.api.app import _api_key_guard
from shoal.api.asgi import MAX_BODY_BYTES, App, Request, Response, StreamingResponse
from shoal.entrypoints.serve_args import config_from_args, make_serve_parser

SECRET = "secret-detail /srv/shoal/internal.py line 42"


async def _call(
    app: App, path: str, body: bytes = b"{}", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One POST through the ASGI app: (status, headers, the whole response body)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[dict[str, Any]] = []
    forever = asyncio.Event()

    async def receive() -> dict[str, Any]:
        if pending:
            return pending.pop()
        await forever.wait()  # the client stays connected
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    raw_headers = [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    scope = {"type": "http", "method": "POST", "path": path, "headers": raw_headers}
    await app(scope, receive, send)
    start = sent[0]
    out_headers = {k.decode(): v.decode() for k, v in start["headers"]}
    return start["status"], out_headers, b"".join(m.get("body", b"") for m in sent[1:])


async def _broken(request: Request) -> Response:
    raise RuntimeError(SECRET)


async def _broken_stream(request: Request) -> StreamingResponse:
    async def events() -> AsyncIterator[bytes]:
        yield b'{"ok": 1}'
        raise KeyError(SECRET)

    return StreamingResponse(events())


def _app(**kwargs: Any) -> App:
    app = App(**kwargs)
    app.route("POST", "/full", _broken, watch_disconnect=True)
    app.route("POST", "/stream", _broken_stream, watch_disconnect=True)
    return app


def test_an_internal_error_reaches_the_client_without_details() -> None:
    status, _, body = asyncio.run(_call(_app(), "/full"))
    assert status == 500
    error = json.loads(body)["error"]
    assert error["type"] == "InternalServerError"
    assert "secret" not in body.decode() and "Traceback" not in body.decode()


def test_an_internal_error_mid_stream_ends_the_stream_without_details() -> None:
    status, _, body = asyncio.run(_call(_app(), "/stream"))
    assert status == 200
    events = [line[6:] for line in body.decode().split("\n\n") if line.startswith("data: ")]
    assert events[0] == '{"ok": 1}' and events[-1] == "[DONE]"
    assert json.loads(events[1])["error"]["code"] == 500
    assert "secret" not in body.decode() and "Traceback" not in body.decode()


def test_the_api_key_is_checked_before_a_request_takes_an_admission_place() -> None:
    admission = AdmissionControl(1, None)
    app = App(admission)

    async def ok(request: Request) -> Response:
        return Response(b"{}")

    app.route("POST", "/v1/x", ok, admit=True, guard=_api_key_guard("k3y"))
    for given in ("", "Bearer k3z", "Bearer k3y ", "bearer k3y", "Bearer \xe9\xe9\xe9"):
        headers = {"authorization": given} if given else {}
        status, _, body = asyncio.run(_call(app, "/v1/x", headers=headers))
        assert status == 401 and json.loads(body)["error"]["type"] == "AuthenticationError"
    assert admission.in_flight() == 0 and admission.rejected() == 0
    assert asyncio.run(_call(app, "/v1/x", headers={"authorization": "Bearer k3y"}))[0] == 200
    assert admission.in_flight() == 0  # released once the response went out
    # x-api-key, as some clients send it: the key alone, no "Bearer".
    for given, status in (("k3y", 200), ("Bearer k3y", 401), ("k3z", 401), ("", 401)):
        got = asyncio.run(_call(app, "/v1/x", headers={"x-api-key": given}))[0]
        assert got == status, given
    admission.close()


def test_a_full_run_answers_503_with_retry_after_and_releases_on_error() -> None:
    admission = AdmissionControl(1, None)
    app = _app(admission=admission)
    app.route("POST", "/admitted", _broken, admit=True)
    assert asyncio.run(_call(app, "/admitted"))[0] == 500
    assert admission.in_flight() == 0  # a failing handler gives its place back
    assert admission.try_acquire()
    status, headers, body = asyncio.run(_call(app, "/admitted"))
    assert status == 503 and headers["retry-after"] == "1"
    assert json.loads(body)["error"]["type"] == "ServiceUnavailableError"
    admission.close()


def test_body_limit_from_content_length_and_from_bytes_read() -> None:
    app = _app(max_body_bytes=10)
    status, _, body = asyncio.run(_call(app, "/full", body=b"x" * 11))
    assert status == 413 and json.loads(body)["error"]["code"] == 413
    headers = {"content-length": "999999"}
    assert asyncio.run(_call(app, "/full", body=b"{}", headers=headers))[0] == 413
    assert asyncio.run(_call(app, "/full", headers={"content-length": "x"}))[0] == 400


def test_max_request_body_bytes_is_a_validated_flag() -> None:
    args = make_serve_parser().parse_args(["--max-request-body-bytes", "123"])
    assert args.max_request_body_bytes == 123
    assert make_serve_parser().parse_args([]).max_request_body_bytes == MAX_BODY_BYTES
    with pytest.raises(ValueError, match="--max-request-body-bytes"):
        config_from_args(make_serve_parser().parse_args(["--max-request-body-bytes", "0"]))
