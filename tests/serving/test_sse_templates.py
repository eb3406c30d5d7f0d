"""Streamed chunks built from pre-encoded templates are byte-for-byte the msgspec encoding,
and framed streaming responses write each item as it comes (several events at once)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest

from shoal.api.asgi import StreamingResponse
from shoal.api.protocol import (
    ChatCompletionChunk,
    ChatStreamChoice,
    CompletionChoice,
    CompletionResponse,
    DeltaMessage,
)
from shoal.api.routes import _chat_template, _completion_template

_encode = msgspec.json.Encoder().encode

TEXTS = [
    "",
    "a",
    " hello",
    'quote " and \\ backslash',
    "line\nbreak\ttab",
    "é漢🙂",
    "\u2028",
    "\x01",
]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("index", [0, 3, 127])
@pytest.mark.parametrize("model", ["m", 'we"ird/model\\name é'])
def test_completion_template_equals_encoding(text: str, index: int, model: str) -> None:
    template = _completion_template("cmpl-x-1", 1700000000, model, index)
    assert template is not None
    expected = _encode(
        CompletionResponse("cmpl-x-1", 1700000000, model, [CompletionChoice(index, text)])
    )
    assert template[0] + _encode(text) + template[1] == b"data: " + expected + b"\n\n"


@pytest.mark.parametrize("text", TEXTS[1:])
@pytest.mark.parametrize("index", [0, 5])
def test_chat_template_equals_encoding(text: str, index: int) -> None:
    template = _chat_template("chatcmpl-y", 1, "model", index)
    assert template is not None
    choice = ChatStreamChoice(index, DeltaMessage(content=text))
    expected = _encode(ChatCompletionChunk("chatcmpl-y", 1, "model", [choice]))
    assert template[0] + _encode(text) + template[1] == b"data: " + expected + b"\n\n"


def test_no_template_when_the_placeholder_is_ambiguous() -> None:
    # An id or model that is exactly a NUL encodes like the placeholder: no template (the
    # route then encodes every chunk in full).
    assert _completion_template("\x00", 1, "m", 0) is None
    assert _chat_template("id", 1, "\x00", 0) is None
    # A NUL inside a longer string is harmless.
    assert _completion_template("id-\x00", 1, "m\x00m", 0) is not None


def test_framed_streaming_response_writes_items_as_is() -> None:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def events() -> AsyncIterator[bytes]:
        yield b"data: 1\n\n"
        yield b"data: 2\n\ndata: 3\n\n"  # two events of one engine step: one write

    asyncio.run(StreamingResponse(events(), framed=True).send(send))
    bodies = [m["body"] for m in sent[1:]]
    assert bodies == [b"data: 1\n\n", b"data: 2\n\ndata: 3\n\n", b"data: [DONE]\n\n"]
    assert sent[0]["type"] == "http.response.start"
    assert [m.get("more_body", False) for m in sent[1:]] == [True, True, False]


def test_framed_streaming_response_reports_errors_as_an_event() -> None:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def events() -> AsyncIterator[bytes]:
        yield b"data: 1\n\n"
        raise ValueError("bad thing")

    asyncio.run(StreamingResponse(events(), framed=True).send(send))
    bodies = [m["body"] for m in sent[1:]]
    assert bodies[0] == b"data: 1\n\n"
    assert bodies[1].startswith(b'data: {"error":') and b"bad thing" in bodies[1]
    assert bodies[2] == b"data: [DONE]\n\n"
