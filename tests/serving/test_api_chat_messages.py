"""Chat messages over HTTP on a real tiny-model server (the default model's chat template):
OpenAI's message shapes are accepted, what the template cannot render is a 400 naming the
message, never a 500, and the conversations that can be rendered are."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from shoal.processing.tokenizer import Tokenizer
from tests.serving.api_helpers import TIMEOUT_S, running_server
from tests.serving.conftest import ServeProcess

TOOL_CALLS = [
    {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}
]
# The request that got a 500: a tool call (content null) and the tool's answer.
TOOL_TURN: list[dict[str, Any]] = [
    {"role": "user", "content": "What time is it?"},
    {"role": "assistant", "content": None, "tool_calls": TOOL_CALLS},
    {"role": "tool", "tool_call_id": "call_1", "content": "12:00"},
]
# A template that reads tool_calls but concatenates content as a string.
TOOL_AWARE = (
    "{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}"
    "{% if m.tool_calls %}{{ m.tool_calls[0].function.name }}(){% endif %}|{% endfor %}"
)


@pytest.fixture(scope="module")
def server(tiny_model_dir: str, frontend: str) -> Iterator[ServeProcess]:
    with running_server(tiny_model_dir, frontend=frontend) as server:
        yield server


def _chat(url: str, messages: Any, **fields: Any) -> httpx.Response:
    body = {"messages": messages, "max_tokens": 2, "temperature": 0, **fields}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=TIMEOUT_S)


def _error_400(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "BadRequestError" and error["code"] == 400
    assert "Traceback" not in error["message"] and "File " not in error["message"]
    return error


@pytest.mark.parametrize("stream", [False, True])
def test_a_tool_call_turn_renders_with_the_default_template(url: str, stream: bool) -> None:
    # SmolLM2's template ignores tool_calls: shoal writes them into the assistant's content
    # as <tool_call> blocks (docs/structured-outputs.md), so the turn is not lost.
    response = _chat(url, TOOL_TURN, stream=stream)
    assert response.status_code == 200, response.text


def test_the_openai_client_sends_a_tool_call_turn(url: str) -> None:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=TIMEOUT_S)
    model = client.models.list().data[0].id
    reply = client.chat.completions.create(model=model, messages=TOOL_TURN, max_tokens=2)  # type: ignore[arg-type]
    assert reply.choices[0].finish_reason == "length"


@pytest.mark.parametrize(
    ("messages", "fields", "param", "words"),
    [
        (
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}],
            {},
            "messages[1].content",
            "got null",
        ),
        ([{"role": "tool", "content": "12:00"}], {}, "messages[0].tool_call_id", "tool call"),
        ([{"role": "user", "content": "hi", "name": 5}], {}, "messages[0].name", "string"),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            {},
            "messages[0].content[0]",
            "text",
        ),
        # Templates failing on one message: an undefined field, a TypeError, raise_exception.
        (
            [{"role": "user", "content": "a", "name": "x"}, {"role": "user", "content": "b"}],
            {"chat_template": "{% for m in messages %}{{ m.role + m.name }}{% endfor %}"},
            "messages[1]",
            "cannot render this user message",
        ),
        (
            [{"role": "system", "content": "s"}, {"role": "user", "content": "a"}],
            {"chat_template": "{% for m in messages %}{{ m.content + loop.index }}{% endfor %}"},
            "messages[0]",
            "TypeError",
        ),
        (
            [
                {"role": "user", "content": "a"},
                {"role": "tool", "tool_call_id": "c", "content": "b"},
            ],
            {
                "chat_template": "{% for m in messages %}{% if m.role == 'tool' %}"
                "{{ raise_exception('no tool role') }}{% endif %}{% endfor %}"
            },
            "messages[1]",
            "tool message: no tool role",
        ),
        # The whole template fails, no message to blame.
        (
            [{"role": "user", "content": "a"}],
            {"chat_template": "{{ 1 + none }}"},
            "chat_template",
            "TypeError",
        ),
        # Names the server passes itself would clash in the render call.
        (
            [{"role": "user", "content": "a"}],
            {"chat_template_kwargs": {"messages": []}},
            "chat_template_kwargs",
            "messages",
        ),
    ],
)
def test_messages_the_template_cannot_take_are_400(
    url: str, messages: Any, fields: dict[str, Any], param: str, words: str
) -> None:
    error = _error_400(_chat(url, messages, **fields))
    assert error["param"] == param and words in error["message"], error


def test_null_content_beside_tool_calls_renders_where_the_template_reads_tool_calls(
    url: str,
) -> None:
    response = _chat(url, TOOL_TURN, chat_template=TOOL_AWARE)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["finish_reason"] == "length"
    # What the template saw: content null became "", the call is there.
    tokenized = httpx.post(
        f"{url}/tokenize",
        json={"messages": TOOL_TURN, "chat_template": TOOL_AWARE, "add_generation_prompt": False},
        timeout=TIMEOUT_S,
    )
    assert tokenized.status_code == 200, tokenized.text
    expected = "user: What time is it?|assistant: get_time()|tool: 12:00|"
    tokenizer = Tokenizer.from_model(None)  # the tiny model's tokenizer
    assert tokenized.json()["tokens"] == tokenizer.encode(expected, add_special_tokens=False)


def test_openai_message_fields_render_with_the_default_template(url: str) -> None:
    messages = [
        {"role": "developer", "content": [{"type": "text", "text": "Be brief."}], "name": "ops"},
        {"role": "user", "content": "hi", "name": "bob"},
        {"role": "assistant", "content": "hello", "tool_calls": []},
        {"role": "tool", "tool_call_id": "call_1", "content": "12:00"},
    ]
    response = _chat(url, messages)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 2


def test_template_kwargs_may_set_a_special_token(url: str) -> None:
    # bos_token reached the template twice (special tokens and kwargs): a TypeError, a 500.
    fields = {"chat_template_kwargs": {"bos_token": "<|im_start|>"}}
    response = _chat(url, [{"role": "user", "content": "hi"}], **fields)
    assert response.status_code == 200, response.text


def test_no_request_of_this_module_was_an_unhandled_error(server: ServeProcess) -> None:
    # Runs last in this module (file order): the 500 path logs "unhandled error".
    assert "unhandled error" not in server.log
