"""Chat messages: validation and rendering through a model's Jinja chat template (sandboxed)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from contextvars import ContextVar
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.sandbox

from shoal.processing.tool_parsers import tool_calls_as_text, tools_system_prompt

ROLES = ("system", "user", "assistant", "tool", "developer")


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Check a conversation against OpenAI's message schema and return a plain copy the
    template can read.

    Each message is a mapping with a `role` from `ROLES` and a string `content` (an OpenAI list
    of `{"type": "text", "text": ...}` parts is joined into one string); `name` is an optional
    string. An assistant message may carry `tool_calls` (OpenAI's shape) and then `content`
    may be null or absent: it becomes "" (templates concatenate content as a string). A `tool`
    message needs its `tool_call_id`. Anything else raises `ValueError` naming the message and
    field, e.g. `messages[2].content: must be a string ...`."""
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
    name = message.get("name")
    if name is not None and not isinstance(name, str):
        raise ValueError(f"{where}.name: must be a string, got {_json_type(name)}")
    plain = dict(message)
    has_tool_calls = _check_tool_calls(where, role, message.get("tool_calls"))
    if role == "tool":
        call_id = message.get("tool_call_id")
        if not isinstance(call_id, str) or not call_id:
            raise ValueError(
                f"{where}.tool_call_id: a tool message needs the id (a string) of the tool "
                f"call it answers, got {_json_type(call_id)}"
            )
    content = message.get("content")
    if content is None and has_tool_calls:
        plain["content"] = ""
    elif isinstance(content, list):
        plain["content"] = _join_text_parts(where, content)
    elif not isinstance(content, str):
        hint = " (null only on an assistant message with tool_calls)" if content is None else ""
        raise ValueError(
            f"{where}.content: must be a string or a list of text parts, "
            f"got {_json_type(content)}{hint}"
        )
    return plain


def _check_tool_calls(where: str, role: str, tool_calls: Any) -> bool:
    """Whether the message has tool calls; `ValueError` unless they have OpenAI's shape
    `[{"id": str, "type": "function", "function": {"name": str, "arguments": str}}]`."""
    if tool_calls is None or tool_calls == []:
        return False
    if role != "assistant":
        raise ValueError(f"{where}.tool_calls: only assistant messages have tool_calls")
    if not isinstance(tool_calls, list):
        raise ValueError(f"{where}.tool_calls: must be a list, got {_json_type(tool_calls)}")
    for j, call in enumerate(tool_calls):
        at = f"{where}.tool_calls[{j}]"
        if not isinstance(call, dict):
            raise ValueError(f"{at}: must be a mapping, got {_json_type(call)}")
        if not isinstance(call.get("id"), str):
            raise ValueError(f"{at}.id: must be a string")
        if call.get("type", "function") != "function":
            raise ValueError(f"{at}.type: must be 'function', got {call.get('type')!r}")
        function = call.get("function")
        if not isinstance(function, dict):
            raise ValueError(f"{at}.function: must be a mapping with 'name' and 'arguments'")
        for key in ("name", "arguments"):
            if not isinstance(function.get(key), str):
                raise ValueError(f"{at}.function.{key}: must be a string")
    return True


# JSON's names for the types a decoded body holds (a client sent null, not NoneType).
_JSON_TYPES = {
    type(None): "null",
    bool: "boolean",
    int: "number",
    float: "number",
    str: "string",
    list: "array",
    dict: "object",
}


def _json_type(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


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


class _ReadLog:
    """Which message of one render the template read last (by identity: the messages are
    this render's own copies, alive while it runs, so no other object shares their ids)."""

    __slots__ = ("index_of", "last")

    def __init__(self, messages: list[dict[str, Any]]) -> None:
        self.index_of = {id(m): i for i, m in enumerate(messages)}
        self.last: int | None = None

    def note(self, obj: Any) -> None:
        index = self.index_of.get(id(obj))
        if index is not None:
            self.last = index


# The read log of the render in progress (None outside `render_chat`).
_reads: ContextVar[_ReadLog | None] = ContextVar("chat_template_reads", default=None)


class _ChatEnvironment(jinja2.sandbox.ImmutableSandboxedEnvironment):
    """The sandbox, noting every field read of a message in the current `_ReadLog`.

    Templates render messages in order, so when rendering fails the message read last is the
    likely culprit (`_render_error` confirms it before naming it)."""

    def getitem(self, obj: Any, argument: Any) -> Any:
        log = _reads.get()
        if log is not None:
            log.note(obj)
        return super().getitem(obj, argument)

    def getattr(self, obj: Any, attribute: str) -> Any:
        log = _reads.get()
        if log is not None:
            log.note(obj)
        return super().getattr(obj, attribute)


@lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    """Compile a chat template in an immutable sandbox (templates from model files are
    untrusted). Settings match Hugging Face's: trim_blocks, lstrip_blocks, loop controls."""
    env = _ChatEnvironment(
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
    """Render a validated conversation; `kwargs` are extra template variables (they override
    the special tokens of the same name).

    Every failure is a `ValueError`: a bad message (`validate_messages`), tool calls the
    template never reads, a syntax error, or any exception while rendering (the template's
    own `raise_exception`, a `TypeError` or an undefined value it trips on). Where one message
    can be shown to cause it, the error names it (`messages[3]: ...`), else the template
    (`chat_template: ...`)."""
    checked = validate_messages(messages)
    try:
        compiled = compile_template(template)
    except jinja2.exceptions.TemplateError as e:
        raise ValueError(f"chat_template: {_describe(e)}") from e
    checked = _adapt_tools(template, checked, kwargs.get("tools"))
    context = {**special_tokens, **kwargs, "add_generation_prompt": add_generation_prompt}
    reads = _ReadLog(checked)
    token = _reads.set(reads)
    try:
        return compiled.render(messages=checked, **context)
    except Exception as e:
        # Anything a template raises is about this request's messages or template: the client
        # gets a 400 with the reason, never a 500 (and never a traceback).
        raise _render_error(e, compiled, checked, context, reads.last) from e
    finally:
        _reads.reset(token)


def _adapt_tools(template: str, messages: list[dict[str, Any]], tools: Any) -> list[dict[str, Any]]:
    """For a template that knows nothing of tools (SmolLM2's), what it would otherwise drop
    in Hermes' format (shoal.processing.tool_parsers): an assistant message's `tool_calls`
    become `<tool_call>` blocks in its content, and `tools` a system prompt (joined to the
    first system message, or a new one first)."""
    if "tool_calls" not in template:
        for message in messages:
            calls = message.pop("tool_calls", None)
            if calls:
                text = tool_calls_as_text(calls)
                message["content"] = f"{message['content']}\n{text}" if message["content"] else text
    if tools and "tools" not in template:
        prompt = tools_system_prompt(tools)
        if messages[0]["role"] == "system":
            messages[0]["content"] = f"{messages[0]['content']}\n\n{prompt}"
        else:
            messages.insert(0, {"role": "system", "content": prompt})
    return messages


def _render_error(
    error: Exception,
    compiled: jinja2.Template,
    messages: list[dict[str, Any]],
    context: dict[str, Any],
    candidate: int | None,
) -> ValueError:
    """The client's error for a failed render, naming messages[candidate] when the failure
    starts with it: the messages before it render, and adding it raises the same error."""
    detail = _describe(error)
    if candidate is not None and _fails_from(compiled, messages, context, candidate, error):
        role = messages[candidate]["role"]
        return ValueError(
            f"messages[{candidate}]: the chat template cannot render this {role} message: {detail}"
        )
    if isinstance(error, jinja2.exceptions.TemplateError):
        return ValueError(f"chat_template: {detail}")
    return ValueError(f"chat_template: rendering these messages failed: {detail}")


def _fails_from(
    compiled: jinja2.Template,
    messages: list[dict[str, Any]],
    context: dict[str, Any],
    index: int,
    error: Exception,
) -> bool:
    """Whether `messages[:index]` renders and `messages[:index + 1]` raises `error` again."""

    def outcome(count: int) -> tuple[type, str] | None:
        try:
            compiled.render(messages=messages[:count], **context)
        except Exception as e:
            return type(e), str(e)
        return None

    same = (type(error), str(error))
    return outcome(index + 1) == same and (index == 0 or outcome(index) is None)


# A template's error text can be long (it may quote the conversation); the start says enough.
_MAX_DETAIL_CHARS = 300


def _describe(error: Exception) -> str:
    """What went wrong, without a traceback: the template's own words for a `TemplateError`
    (its `raise_exception` message, a syntax error), else the exception type and message."""
    if isinstance(error, jinja2.exceptions.TemplateError):
        text = str(error)
    else:
        text = f"{type(error).__name__}: {error}"
    if len(text) > _MAX_DETAIL_CHARS:
        text = text[: _MAX_DETAIL_CHARS - 3] + "..."
    return text
