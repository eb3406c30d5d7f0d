"""SIGTERM with streams in flight: a drain that lets them finish, and a deadline that ends the
rest with a final error event and `data: [DONE]` (docs/reliability.md, "Draining on SIGTERM").

Real `shoal serve` processes on the tiny random-weight model, on both frontends (`[python]`,
`[rust]`; the suite's fixtures check that no process and no IPC socket file is left behind),
and, in process, the ASGI app's backstop
for a request uvicorn cancels at the very end of the shutdown.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from shoal.api.admission import AdmissionControl
from shoal.api.asgi import App, Handler, Request, Response, StreamingResponse
from tests.serving.api_helpers import get_metrics, metric, wait_until
from tests.serving.conftest import ServeProcess

TIMEOUT_S = 120.0


@dataclass
class _Stream:
    """What one streaming client saw: every SSE payload, and how the connection ended."""

    payloads: list[str] = field(default_factory=list)
    status: int | None = None
    # The transport error that ended the response early (a cut connection), if any.
    failure: BaseException | None = None
    started: threading.Event = field(default_factory=threading.Event)  # headers received
    first_chunk: threading.Event = field(default_factory=threading.Event)

    @property
    def error(self) -> dict[str, object] | None:
        """The `error` object of an error event, if the stream carried one."""
        for payload in self.payloads:
            if payload != "[DONE]" and "error" in (event := json.loads(payload)):
                return dict(event["error"])
        return None

    @property
    def usage(self) -> dict[str, int] | None:
        for payload in self.payloads:
            if payload != "[DONE]" and (usage := json.loads(payload).get("usage")):
                return dict(usage)
        return None


class _Clients:
    """`n` concurrent streaming requests, alternating completions and chat completions."""

    def __init__(self, url: str, n: int, max_tokens: int) -> None:
        self.model = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
        self.streams = [_Stream() for _ in range(n)]
        self.threads = [
            threading.Thread(target=self._run, args=(url, i, max_tokens), daemon=True)
            for i in range(n)
        ]
        for thread in self.threads:
            thread.start()

    def _run(self, url: str, i: int, max_tokens: int) -> None:
        stream = self.streams[i]
        body: dict[str, object] = {
            "model": self.model,
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if i % 2:
            path = "/v1/chat/completions"
            body["messages"] = [{"role": "user", "content": f"drain {i}"}]
        else:
            path = "/v1/completions"
            body["prompt"] = f"drain {i}"
        try:
            with httpx.stream("POST", url + path, json=body, timeout=TIMEOUT_S) as response:
                stream.status = response.status_code
                stream.started.set()
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        stream.payloads.append(line[len("data: ") :])
                        stream.first_chunk.set()
        except httpx.HTTPError as e:  # e.g. RemoteProtocolError: the body was cut short
            stream.failure = e
        finally:  # never leave the test waiting on a failed stream
            stream.started.set()
            stream.first_chunk.set()

    def wait_in_flight(self, first_chunk: bool = True) -> None:
        """Until every stream has its response headers and, with `first_chunk`, its first
        event (a completion's first tokens; a chat stream's role chunk)."""
        for stream in self.streams:
            assert (stream.first_chunk if first_chunk else stream.started).wait(TIMEOUT_S)
        assert all(s.status == 200 and s.failure is None for s in self.streams), self.streams

    def join(self) -> None:
        for thread in self.threads:
            thread.join(TIMEOUT_S)
        assert not any(t.is_alive() for t in self.threads), "a stream hung"


class _Blocking:
    """One non-streaming completion on a thread: its status and JSON body."""

    def __init__(self, url: str, model: str, max_tokens: int) -> None:
        self.status: int | None = None
        self.error: dict[str, object] | None = None
        body = {"model": model, "prompt": "drain me", "max_tokens": max_tokens, "ignore_eos": True}
        self.thread = threading.Thread(target=self._run, args=(url, body), daemon=True)
        self.thread.start()

    def _run(self, url: str, body: dict[str, object]) -> None:
        response = httpx.post(f"{url}/v1/completions", json=body, timeout=TIMEOUT_S)
        self.status = response.status_code
        self.error = response.json().get("error")

    def join(self) -> None:
        self.thread.join(TIMEOUT_S)
        assert not self.thread.is_alive(), "the request hung"


def _load(url: str) -> tuple[float, float, float]:
    """(requests admitted and not finished, running in the engine, waiting in the engine),
    from /metrics."""
    text = get_metrics(url)[0]
    names = ("api_requests_in_flight", "num_requests_running", "num_requests_waiting")
    return tuple(metric(text, name) for name in names)  # type: ignore[return-value]


def _sigterm(server: ServeProcess) -> float:
    server.proc.send_signal(signal.SIGTERM)
    return time.monotonic()


def test_sigterm_lets_every_in_flight_stream_finish(
    serve: Callable[..., ServeProcess], frontend: str
) -> None:
    server = serve("--shutdown-timeout", "60", frontend=frontend)
    assert server.url is not None
    max_tokens = 48
    clients = _Clients(server.url, n=4, max_tokens=max_tokens)
    clients.wait_in_flight()
    started = _sigterm(server)
    clients.join()
    assert server.wait(TIMEOUT_S) == 0, server.log
    for stream in clients.streams:
        assert stream.status == 200 and stream.failure is None, stream
        assert stream.error is None, stream.payloads
        assert stream.payloads[-1] == "[DONE]", stream.payloads
        assert stream.usage is not None and stream.usage["completion_tokens"] == max_tokens
    # The drain ended when the streams did, not at the 60 s deadline.
    assert time.monotonic() - started < 30
    assert "Traceback" not in server.log, server.log
    assert server.leftovers() == []


def test_sigterm_past_the_deadline_ends_each_stream_with_an_error_event(
    serve: Callable[..., ServeProcess], frontend: str
) -> None:
    drain_s = 1.0
    # Requests far longer than the drain window: 2,000 tokens each (seconds of work each on
    # the tiny model), at most 2 running at a time, the others waiting in the engine.
    server = serve(
        "--shutdown-timeout",
        str(drain_s),
        "--max-model-len",
        "2048",
        "--max-num-seqs",
        "2",
        frontend=frontend,
    )
    assert server.url is not None
    url = server.url
    clients = _Clients(url, n=4, max_tokens=2000)
    blocking = _Blocking(url, clients.model, max_tokens=2000)
    wait_until(lambda: _load(url) == (5, 2, 3))  # all admitted: 2 running, 3 waiting
    clients.wait_in_flight(first_chunk=False)
    started = _sigterm(server)
    clients.join()
    blocking.join()
    assert server.wait(TIMEOUT_S) == 0, server.log
    # Prompt: the drain window plus the processes' exit, not the requests' length; and the
    # API server ended by itself, not killed at the launcher's deadline.
    assert time.monotonic() - started < drain_s + 5
    assert "force killing" not in server.log, server.log
    for stream in clients.streams:
        assert stream.status == 200 and stream.failure is None, (stream.failure, stream.payloads)
        error = stream.error
        assert error is not None, stream.payloads[-3:]
        assert error["code"] == 503 and error["type"] == "ServiceUnavailableError", error
        assert "shutting down" in str(error["message"]), error
        # The error event is the last event before [DONE], which ends the response.
        assert stream.payloads[-1] == "[DONE]", stream.payloads[-3:]
        assert "error" in json.loads(stream.payloads[-2]), stream.payloads[-3:]
    # Some were cut off mid-generation (more than a chat stream's role chunk went out).
    assert max(len(stream.payloads) for stream in clients.streams) > 10
    # The non-streaming request had sent nothing yet: a 503 with an OpenAI error body.
    assert blocking.status == 503, blocking.error
    assert blocking.error is not None
    assert blocking.error["type"] == "ServiceUnavailableError", blocking.error
    assert "shutting down" in str(blocking.error["message"]), blocking.error
    assert "Traceback" not in server.log, server.log
    assert server.leftovers() == []


# ----------------------------------------------------------------------------- in process


async def _cancel_mid_request(handler: Handler, admission: AdmissionControl) -> list[Any]:
    """Run one admitted POST through the app until `handler` is waiting forever, close the
    admission file (the server's own shutdown went first), cancel the request's task as
    uvicorn does at the end of its shutdown grace, and return what was sent. Fails if the
    task raises (uvicorn would log it as a traceback)."""
    app = App(admission)
    app.route("POST", "/v1/completions", handler, watch_disconnect=True, admit=True)
    pending = [{"type": "http.request", "body": b"{}", "more_body": False}]
    forever = asyncio.Event()
    sent: list[Any] = []

    async def receive() -> dict[str, Any]:
        if pending:
            return pending.pop()
        await forever.wait()  # the client stays connected
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": []}
    task = asyncio.ensure_future(app(scope, receive, send))
    await asyncio.sleep(0.05)
    assert not task.done() and admission.in_flight() == 1
    admission.close()
    task.cancel()
    await task
    return sent


async def _never_answers(request: Request) -> Response:
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


async def _stalls_after_one_event(request: Request) -> StreamingResponse:
    async def events() -> AsyncIterator[bytes]:
        yield b'{"ok": 1}'
        await asyncio.Event().wait()

    return StreamingResponse(events())


def test_a_request_cancelled_before_its_response_gets_a_503(tmp_path: Path) -> None:
    admission = AdmissionControl(4, str(tmp_path))
    sent = asyncio.run(_cancel_mid_request(_never_answers, admission))
    assert sent[0]["status"] == 503
    error = json.loads(b"".join(m.get("body", b"") for m in sent[1:]))["error"]
    assert error["code"] == 503 and "shutting down" in error["message"], error


def test_a_stream_cancelled_mid_response_is_left_to_close(tmp_path: Path) -> None:
    admission = AdmissionControl(4, str(tmp_path))
    sent = asyncio.run(_cancel_mid_request(_stalls_after_one_event, admission))
    # The headers and the first event went out; nothing is appended to a stream whose
    # client stopped reading (uvicorn closes the connection).
    assert [m.get("status") for m in sent] == [200, None]
    assert sent[1]["body"] == b'data: {"ok": 1}\n\n'
