"""Chat messages: validation and rendering through a model's Jinja chat template (sandboxed)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.sandbox

ROLES = ("system", "user", "assistant", "tool", "developer")


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Check a conversation and return a plain copy the template can read.

    Each message is a mapping with a string `role` and a string `content` (an OpenAI list of
    `{"type": "text", "text": ...}` parts is joined into one string). An assistant message with
    `tool_calls` may have `content` None. Anything else raises `ValueError` naming the message
    and field, e.g. `messages[2].content: must be a string`."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError("messages: must be a list of {'role': ..., 'content': ...} mappings")
    if not messages:
        raise ValueError("messages: must not be empty")
    return [_validate_message(i, m) for i, m in enumerate(messages)]


def _validate_message(index: int, message: Any) -> dict[str, Any]:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise ValueError(
            f"{where}: must be a mapping with 'role' and 'content', got {type(message).__name__}"
        )
    role = message.get("role")
    if not isinstance(role, str) or not role:
        raise ValueError(f"{where}.role: must be a non-empty string, got {role!r}")
    if role not in ROLES:
        raise ValueError(f"{where}.role: must be one of {ROLES}, got {role!r}")
    plain = dict(message)
    content = message.get("content")
    if content is None and role == "assistant" and message.get("tool_calls"):
        return plain
    if isinstance(content, list):
        plain["content"] = _join_text_parts(where, content)
    elif not isinstance(content, str):
        raise ValueError(f"{where}.content: must be a string, got {type(content).__name__}")
    return plain


def _join_text_parts(where: str, parts: list[Any]) -> str:
    texts = []
    for j, part in enumerate(parts):
        if not isinstance(part, dict) or part.get("type") != "text":
            raise ValueError(
                f"{where}.content[{j}]: only {{'type': 'text', 'text': ...}} parts are supported"
            )
        text = part.get("text")
        if not isinstance(text, str):
            raise ValueError(f"{where}.content[{j}].text: must be a string")
        texts.append(text)
    return "\n".join(texts)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes HTML characters, which templates do not expect.
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    """Compile a chat template in an immutable sandbox (templates from model files are
    untrusted). Settings match Hugging Face's: trim_blocks, lstrip_blocks, loop controls."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def render_chat(
    template: str,
    messages: Any,
    *,
    add_generation_prompt: bool,
    special_tokens: dict[str, str | None],
    **kwargs: Any,
) -> str:
    """Render a validated conversation. Template errors (a syntax error or the template's own
    `raise_exception`) become `ValueError` naming the chat template."""
    checked = validate_messages(messages)
    try:
        return compile_template(template).render(
            messages=checked,
            add_generation_prompt=add_generation_prompt,
            **special_tokens,
            **kwargs,
        )
    except jinja2.exceptions.TemplateError as e:
        raise ValueError(f"chat_template: {e}") from e
