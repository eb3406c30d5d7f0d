"""Chat messages in OpenAI's shapes (null content beside tool_calls, tool messages, text parts,
`name`) through the default model's template and others: what renders, and that every failure
is a `ValueError` naming the message (or the template), never another exception."""

from __future__ import annotations

from typing import Any

import pytest

from shoal.processing.chat_template import render_chat
from shoal.processing.tokenizer import Tokenizer

TOOL_CALLS = [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
# The failing request that was reported: a tool call and its answer, content null.
TOOL_TURN: list[dict[str, Any]] = [
    {"role": "user", "content": "What is f()?"},
    {"role": "assistant", "content": None, "tool_calls": TOOL_CALLS},
    {"role": "tool", "tool_call_id": "call_1", "content": "42"},
]
# Reads tool_calls, and concatenates content like most templates (null would be a TypeError).
TOOL_AWARE = (
    "{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}"
    "{% if m.tool_calls %}{{ m.tool_calls | tojson }}{% endif %}|{% endfor %}"
)


def _render(messages: Any, template: str) -> str:
    return render_chat(template, messages, add_generation_prompt=False, special_tokens={})


def test_the_default_template_renders_tool_calls_as_hermes_blocks(
    default_tokenizer: Tokenizer,
) -> None:
    # SmolLM2's template never reads tool_calls or tools: shoal writes the calls into the
    # content as <tool_call> blocks and the tools into a system prompt, in the format the
    # hermes tool parser reads back (shoal.processing.tool_parsers).
    assert default_tokenizer.chat_template is not None
    assert "tool_calls" not in default_tokenizer.chat_template
    text = default_tokenizer.apply_chat_template(TOOL_TURN, add_generation_prompt=False)
    assert text.endswith(
        "<|im_start|>user\nWhat is f()?<|im_end|>\n<|im_start|>assistant\n<tool_call>\n"
        '{"name": "f", "arguments": {}}\n</tool_call><|im_end|>\n'
        "<|im_start|>tool\n42<|im_end|>\n"
    )
    with_text = [TOOL_TURN[0], {**TOOL_TURN[1], "content": "calling f"}]
    text = default_tokenizer.apply_chat_template(with_text, add_generation_prompt=False)
    assert "<|im_start|>assistant\ncalling f\n<tool_call>\n" in text
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    text = default_tokenizer.apply_chat_template(TOOL_TURN, tools=tools)
    assert text.startswith("<|im_start|>system\nYou may call one or more functions")
    assert '{"type": "function", "function": {"name": "f"' in text


def test_null_content_beside_tool_calls_renders_as_empty_text() -> None:
    assert _render(TOOL_TURN, TOOL_AWARE) == (
        'user: What is f()?|assistant: [{"id": "call_1", "type": "function", "function": '
        '{"name": "f", "arguments": "{}"}}]|tool: 42|'
    )
    absent = [{"role": "assistant", "tool_calls": TOOL_CALLS}]
    assert _render(absent, TOOL_AWARE).startswith("assistant: [")


def test_openai_message_fields_render_with_the_default_template(
    default_tokenizer: Tokenizer,
) -> None:
    messages = [
        {"role": "developer", "content": "Be brief.", "name": "ops"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "42"}]},
    ]
    assert default_tokenizer.apply_chat_template(messages, add_generation_prompt=False) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>developer\nBe brief.<|im_end|>\n"
        "<|im_start|>user\na\nb<|im_end|>\n<|im_start|>tool\n42<|im_end|>\n"
    )


@pytest.mark.parametrize(
    ("message", "match"),
    [
        (
            {"role": "assistant", "content": None},
            r"^messages\[0\]\.content: .*got null \(null only",
        ),
        (
            {"role": "user", "content": None, "tool_calls": TOOL_CALLS},
            r"^messages\[0\]\.tool_calls",
        ),
        ({"role": "tool", "content": "42"}, r"^messages\[0\]\.tool_call_id: .*got null"),
        ({"role": "tool", "content": "42", "tool_call_id": 7}, r"^messages\[0\]\.tool_call_id"),
        ({"role": "user", "content": "x", "name": 3}, r"^messages\[0\]\.name: .*got number"),
        ({"role": "assistant", "tool_calls": "f()"}, r"^messages\[0\]\.tool_calls: must be a list"),
        (
            {"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f"}}]},
            r"^messages\[0\]\.tool_calls\[0\]\.function\.arguments",
        ),
        (
            {"role": "assistant", "tool_calls": [{**TOOL_CALLS[0], "type": "code"}]},
            r"^messages\[0\]\.tool_calls\[0\]\.type",
        ),
    ],
)
def test_shapes_openai_does_not_allow_name_the_field(message: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _render([message], TOOL_AWARE)


@pytest.mark.parametrize(
    ("template", "messages", "match"),
    [
        # An undefined field used in an expression (UndefinedError) on the second message.
        (
            "{% for m in messages %}{{ m.role + m.name }}{% endfor %}",
            [{"role": "user", "content": "x", "name": "a"}, {"role": "user", "content": "y"}],
            r"^messages\[1\]: the chat template cannot render this user message: .*'name'",
        ),
        # A TypeError from the template's arithmetic.
        (
            "{% for m in messages %}{{ m.content + 1 }}{% endfor %}",
            [{"role": "user", "content": "x"}],
            r"^messages\[0\]: .*user message: TypeError: can only concatenate",
        ),
        # The template's own raise_exception, on the message that breaks its rule.
        (
            "{% for m in messages %}{% if (m.role == 'user') != loop.index0 is even %}"
            "{{ raise_exception('roles must alternate') }}{% endif %}{% endfor %}",
            [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"},
                {"role": "assistant", "content": "c"},
            ],
            r"^messages\[2\]: the chat template cannot render this assistant message: "
            r"roles must alternate$",
        ),
        # A rule about the whole conversation: no single message is to blame.
        (
            "{% if messages[-1].role != 'user' %}{{ raise_exception('end with user') }}{% endif %}",
            [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"},
                {"role": "assistant", "content": "c"},
            ],
            r"^chat_template: end with user$",
        ),
        # Failing before any message is read.
        ("{{ 1 + none }}", [{"role": "user", "content": "a"}], r"^chat_template: rendering .*Type"),
        ("{% for %}", [{"role": "user", "content": "a"}], r"^chat_template: "),
        # Recursion without end is the template's failure too.
        (
            "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(messages[0].content) }}",
            [{"role": "user", "content": "a"}],
            r"RecursionError",
        ),
    ],
)
def test_render_failures_are_value_errors_naming_the_message(
    template: str, messages: list[dict[str, Any]], match: str
) -> None:
    with pytest.raises(ValueError, match=match) as info:
        _render(messages, template)
    assert "Traceback" not in str(info.value) and len(str(info.value)) < 500


def test_template_kwargs_may_override_special_tokens() -> None:
    # Both used to reach render() as keywords: a TypeError ("multiple values").
    text = render_chat(
        "{{ bos_token }}{{ messages[0].content }}",
        [{"role": "user", "content": "x"}],
        add_generation_prompt=True,
        special_tokens={"bos_token": "<s>"},
        bos_token="[B]",
    )
    assert text == "[B]x"
