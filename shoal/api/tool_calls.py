"""Tool calls in chat answers: the assistant message of a finished output and the streamed
deltas (OpenAI's chunk shape), read as the request's `ToolPlan` says (shoal.structured)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import msgspec

from shoal.api.formatting import chat_logprobs, check_finish
from shoal.api.protocol import (
    ChatCompletionChunk,
    ChatMessage,
    ChatStreamChoice,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    FunctionCall,
    ToolCallItem,
    UsageInfo,
    now_s,
)
from shoal.processing.outputs import RequestOutputKind
from shoal.processing.tool_parsers import (
    TOOL_PARSERS,
    HermesStream,
    ToolCall,
    new_call_id,
    parse_named,
    parse_required,
)
from shoal.structured.tool_choice import ToolPlan

if TYPE_CHECKING:
    from shoal.api.protocol import ChatCompletionRequest
    from shoal.api.routes import ServingContext
    from shoal.processing.processor import ProcessedRequest

_encode = msgspec.json.Encoder().encode


def _items(calls: list[ToolCall]) -> list[ToolCallItem]:
    return [ToolCallItem(c.id, FunctionCall(c.name, c.arguments)) for c in calls]


def _finish(finish_reason: str | None, calls: list[ToolCall] | bool) -> str | None:
    # A grammar- or EOS-ended output that called tools: OpenAI's "tool_calls".
    return "tool_calls" if calls and finish_reason == "stop" else finish_reason


def assistant_message(
    text: str, finish_reason: str | None, plan: ToolPlan, parser_name: str | None
) -> tuple[ChatMessage, str | None]:
    """The message of a finished output and its finish reason. Calls that do not parse
    (the output was cut by max_tokens) leave the text as content."""
    calls: list[ToolCall] | None = None
    content: str | None = text
    if plan.mode == "required":
        calls = parse_required(text)
    elif plan.mode == "named":
        assert plan.function_name is not None
        call = parse_named(plan.function_name, text)
        calls = [call] if call is not None else None
    elif plan.mode == "auto" and parser_name is not None:
        content, calls = TOOL_PARSERS[parser_name]().extract(text)
    if not calls:
        return ChatMessage("assistant", content if content is not None else ""), finish_reason
    if plan.mode != "auto":
        content = None
    return ChatMessage("assistant", content, _items(calls)), _finish(finish_reason, calls)


class ToolDeltas:
    """One choice's stream: text deltas in, (content delta, tool-call deltas) out."""

    def __init__(self, plan: ToolPlan, parser_name: str | None) -> None:
        self.plan = plan
        self._text = ""
        self._num_calls = 0
        self._named_id = new_call_id()
        self._hermes: HermesStream | None = None
        if plan.mode == "auto" and parser_name is not None:
            self._hermes = TOOL_PARSERS[parser_name]().stream()

    @property
    def called(self) -> bool:
        return self._num_calls > 0

    def feed(self, delta: str, finished: bool) -> tuple[str | None, list[DeltaToolCall]]:
        mode = self.plan.mode
        if mode == "named":
            return None, self._named(delta)
        if mode == "required":
            # The JSON array is read once whole: its calls go out in the last chunk.
            self._text += delta
            calls = parse_required(self._text) if finished else None
            if finished and calls is None:
                return self._text, []  # cut short: the text, as content
            return None, self._whole(calls or [])
        if self._hermes is None:
            return delta or None, []
        content, calls = self._hermes.feed(delta)
        if finished:
            rest, more = self._hermes.finish()
            content, calls = content + rest, calls + more
        return content or None, self._whole(calls)

    def _named(self, delta: str) -> list[DeltaToolCall]:
        if self._num_calls == 0:
            self._num_calls = 1
            function = DeltaFunctionCall(self.plan.function_name, delta)
            return [DeltaToolCall(0, self._named_id, "function", function)]
        if not delta:
            return []
        return [DeltaToolCall(0, function=DeltaFunctionCall(arguments=delta))]

    def _whole(self, calls: list[ToolCall]) -> list[DeltaToolCall]:
        deltas = []
        for call in calls:
            function = DeltaFunctionCall(call.name, call.arguments)
            deltas.append(DeltaToolCall(self._num_calls, call.id, "function", function))
            self._num_calls += 1
        return deltas


async def tool_chat_events(
    ctx: ServingContext,
    body: ChatCompletionRequest,
    request_id: str,
    processed: ProcessedRequest,
    plan: ToolPlan,
) -> AsyncIterator[bytes]:
    """SSE frames of a chat stream whose tool calls are parsed (`plan.mode` not none): as
    the plain stream, with `delta.tool_calls` and finish_reason "tool_calls"."""
    created, model = now_s(), ctx.model_name
    num_top = body.top_logprobs or 0
    first = [ChatStreamChoice(i, DeltaMessage(role="assistant", content="")) for i in range(body.n)]
    yield _frame(ChatCompletionChunk(request_id, created, model, first))
    streams = [ToolDeltas(plan, ctx.tool_parser) for _ in range(body.n)]
    num_tokens = 0
    async with contextlib.aclosing(  # type: ignore[type-var]
        ctx.engine.generate(processed, RequestOutputKind.DELTA)
    ) as outputs:
        async for result in outputs:
            for output in result.outputs:
                check_finish(output)
                num_tokens += len(output.token_ids)
                finished = output.finish_reason is not None
                deltas = streams[output.index]
                content, calls = deltas.feed(output.text, finished)
                if not content and not calls and not finished and not body.logprobs:
                    continue
                logprobs = chat_logprobs(output, num_top, ctx.tokenizer) if body.logprobs else None
                delta = DeltaMessage(content=content, tool_calls=calls or None)
                reason = _finish(output.finish_reason, deltas.called)
                choice = ChatStreamChoice(output.index, delta, logprobs, reason, output.stop_reason)
                # One chunk per choice, as OpenAI streams them.
                yield _frame(ChatCompletionChunk(request_id, created, model, [choice]))
    if body.include_usage:
        prompt = len(processed.prompt_token_ids)
        usage = UsageInfo(prompt, num_tokens, prompt + num_tokens)
        yield _frame(ChatCompletionChunk(request_id, created, model, [], usage))


def _frame(obj: object) -> bytes:
    return b"data: " + _encode(obj) + b"\n\n"
