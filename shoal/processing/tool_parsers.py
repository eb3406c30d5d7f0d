"""Tool calls in and out of text: the Hermes format (`<tool_call>{json}</tool_call>`) that
`--tool-call-parser hermes` reads from free output, the JSON shapes the grammar forces for
`tool_choice` required / named, and the fallback rendering for chat templates that know
nothing of tools (SmolLM2's)."""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class ToolCall:
    """One function call: `arguments` is JSON text, as OpenAI sends it."""

    name: str
    arguments: str
    id: str = ""

    def __post_init__(self) -> None:
        if not self.id:
            self.id = new_call_id()


def new_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


def _call_from_json(obj: Any) -> ToolCall | None:
    """`{"name": str, "arguments": object | JSON text}` (or `parameters`) -> a call."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


# ------------------------------------------------------------------ forced by the grammar


def parse_required(text: str) -> list[ToolCall] | None:
    """`tool_choice: required`: the grammar's JSON array of calls; None when it does not
    parse (the output was cut by max_tokens)."""
    try:
        items = json.loads(text)
    except ValueError:
        return None
    if not isinstance(items, list):
        return None
    calls = [_call_from_json(item) for item in items]
    return None if any(c is None for c in calls) else [c for c in calls if c is not None]


def parse_named(name: str, text: str) -> ToolCall | None:
    """A named `tool_choice`: the output is the arguments object itself."""
    try:
        args = json.loads(text)
    except ValueError:
        return None
    return ToolCall(name, text.strip()) if isinstance(args, dict) else None


# ------------------------------------------------------------------ hermes (auto)


class HermesToolParser:
    """Reads `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks (NousResearch
    Hermes, Qwen 2.5/3 and the fallback prompt below); the text outside them is content. A
    block whose JSON is not a call stays in the content."""

    start = "<tool_call>"
    end = "</tool_call>"

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content or None when only whitespace, calls) of a finished output."""
        stream = self.stream()
        content, calls = stream.feed(text)
        rest, more = stream.finish()
        content = (content + rest).strip()
        return (content or None), calls + more

    def stream(self) -> HermesStream:
        return HermesStream(self)


class HermesStream:
    """Incremental `HermesToolParser`: `feed` returns the content that is certainly content
    (a possible start of `<tool_call>` is held back) and every call completed so far."""

    def __init__(self, parser: HermesToolParser) -> None:
        self.parser = parser
        self._pending = ""  # text not yet classified
        self._in_call = False

    def feed(self, delta: str) -> tuple[str, list[ToolCall]]:
        self._pending += delta
        content: list[str] = []
        calls: list[ToolCall] = []
        start, end = self.parser.start, self.parser.end
        while True:
            if self._in_call:
                at = self._pending.find(end)
                if at < 0:
                    break
                body, self._pending = self._pending[:at], self._pending[at + len(end) :]
                self._in_call = False
                call = _parse_block(body)
                if call is None:
                    content.append(start + body + end)
                else:
                    calls.append(call)
                continue
            at = self._pending.find(start)
            if at < 0:
                keep = _partial_suffix(self._pending, start)
                content.append(self._pending[: len(self._pending) - keep])
                self._pending = self._pending[len(self._pending) - keep :]
                break
            content.append(self._pending[:at])
            self._pending = self._pending[at + len(start) :]
            self._in_call = True
        return "".join(content), calls

    def finish(self) -> tuple[str, list[ToolCall]]:
        """What is left at the end: an unfinished block is content, as the model wrote it."""
        rest = (self.parser.start if self._in_call else "") + self._pending
        self._pending, self._in_call = "", False
        return rest, []


def _parse_block(body: str) -> ToolCall | None:
    try:
        return _call_from_json(json.loads(body))
    except ValueError:
        return None


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a proper start of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


# name -> parser factory; feeds `--tool-call-parser`'s choices.
TOOL_PARSERS: dict[str, Callable[[], HermesToolParser]] = {"hermes": HermesToolParser}


# ------------------------------------------------------------------ templates without tools


def tools_system_prompt(tools: list[dict[str, Any]]) -> str:
    """The Hermes-style instructions a chat template that ignores `tools` is given instead
    (as a system message), so that the model sees the functions and the call format."""
    listed = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return (
        "You may call one or more functions to assist with the user query. The functions "
        f"are listed within <tools></tools> tags:\n<tools>\n{listed}\n</tools>\n"
        "For each function call, return a JSON object with the function name and arguments "
        "within <tool_call></tool_call> tags:\n"
        '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
    )


def tool_calls_as_text(tool_calls: list[dict[str, Any]]) -> str:
    """An assistant message's OpenAI `tool_calls` written the way the model is asked to
    write them (`tools_system_prompt`)."""
    blocks = []
    for call in tool_calls:
        function = call["function"]
        try:
            args = json.loads(function["arguments"])
        except ValueError:
            args = function["arguments"]
        text = json.dumps({"name": function["name"], "arguments": args}, ensure_ascii=False)
        blocks.append(f"<tool_call>\n{text}\n</tool_call>")
    return "\n".join(blocks)
