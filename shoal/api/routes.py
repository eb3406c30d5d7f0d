"""POST /v1/completions and POST /v1/chat/completions: streaming (SSE) and non-streaming."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import jinja2
import msgspec

from shoal.api.asgi import HTTPError, Request, Response, StreamingResponse, json_response
from shoal.api.async_engine import AsyncEngine
from shoal.api.formatting import (
    EngineRequestError,
    best_outputs,
    chat_logprobs,
    check_finish,
    completion_logprobs,
    gather_or_cancel,
    join_logprobs,
    merge,
    prompt_completion_logprobs,
    usage_of,
    vllm_prompt_logprobs,
)
from shoal.api.prompt_embeds import embeds_requests
from shoal.api.protocol import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    ChatStreamChoice,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    ScoredChatCompletionResponse,
    ScoredCompletionChoice,
    UsageInfo,
    now_s,
    random_id,
)
from shoal.api.tool_calls import assistant_message, tool_chat_events
from shoal.processing.outputs import CompletionOutput, RequestOutput, RequestOutputKind
from shoal.processing.processor import ProcessedRequest
from shoal.processing.tokenizer import Tokenizer
from shoal.structured.tool_choice import plan_tools, with_tool_constraint

_encode = msgspec.json.Encoder().encode


@dataclass
class ServingContext:
    """What every route needs: the engine, the tokenizer and the model's public name."""

    engine: AsyncEngine
    tokenizer: Tokenizer
    model_name: str
    # `--tool-call-parser` when `--enable-auto-tool-choice` is on (tool_choice "auto").
    tool_parser: str | None = None

    def check_model(self, model: str | None) -> None:
        """404 for a model this server does not serve (None = the served one)."""
        if model is not None and model != self.model_name:
            raise HTTPError(404, f"The model `{model}` does not exist.", "model")


@dataclass
class _Ids:
    public: str  # the response's `id`
    internal: str  # engine request id prefix, unique even if x-request-id repeats
    headers: list[tuple[bytes, bytes]]


def _request_ids(request: Request, prefix: str) -> _Ids:
    client_id = request.headers.get("x-request-id")
    if not client_id:
        public = random_id(prefix)
        return _Ids(public, public, [])
    public = f"{prefix}-{client_id}"
    return _Ids(
        public,
        f"{public}-{secrets.token_hex(4)}",
        [(b"x-request-id", client_id.encode("latin-1", "replace"))],
    )


async def _final(engine: AsyncEngine, request: ProcessedRequest) -> RequestOutput:
    result: RequestOutput | None = None
    async for output in engine.generate(request, RequestOutputKind.FINAL_ONLY):
        result = output
    assert result is not None and result.finished
    for sequence in result.outputs:
        check_finish(sequence)
    return result


# ----------------------------------------------------------------------------- completions


async def create_completion(ctx: ServingContext, request: Request) -> Response | StreamingResponse:
    body: CompletionRequest = request.json(CompletionRequest)
    ctx.check_model(body.model)
    params = body.to_sampling_params()
    ids = _request_ids(request, "cmpl")
    processed = [
        ctx.engine.process(
            f"{ids.internal}-{i}", prompt, params, add_special_tokens=body.add_special_tokens
        )
        for i, prompt in enumerate(body.prompts())
    ]
    processed += embeds_requests(ctx.engine, body, ids.internal, params, len(processed))
    echoes = [_prompt_text(ctx.tokenizer, p) if body.echo else "" for p in processed]
    if body.stream:
        events = _completion_events(ctx, body, ids.public, processed, echoes)
        return StreamingResponse(events, ids.headers, framed=True)
    results = await gather_or_cancel([_final(ctx.engine, p) for p in processed])
    choices = []
    for i, result in enumerate(results):
        for output in best_outputs(result.outputs, body.n):
            logprobs = None
            if body.logprobs is not None:
                logprobs, _ = completion_logprobs(output, body.logprobs, len(echoes[i]))
                if body.echo:
                    prompt = prompt_completion_logprobs(result, body.logprobs, ctx.tokenizer)
                    logprobs = join_logprobs(prompt, logprobs)
            choices.append(
                _completion_choice(
                    body,
                    result,
                    i * body.n + output.index,
                    echoes[i] + output.text,
                    logprobs,
                    output,
                )
            )
    response = CompletionResponse(ids.public, now_s(), ctx.model_name, choices, usage_of(results))
    return json_response(response, headers=ids.headers)


def _completion_choice(
    body: CompletionRequest,
    result: RequestOutput,
    index: int,
    text: str,
    logprobs: CompletionLogprobs | None,
    output: CompletionOutput,
) -> CompletionChoice:
    """A choice, with vLLM's `prompt_logprobs` when the request asked for them."""
    if body.prompt_logprobs is None:
        return CompletionChoice(index, text, logprobs, output.finish_reason, output.stop_reason)
    return ScoredCompletionChoice(
        index,
        text,
        logprobs,
        output.finish_reason,
        output.stop_reason,
        vllm_prompt_logprobs(result),
    )


def _prompt_text(tokenizer: Tokenizer, request: ProcessedRequest) -> str:
    if request.prompt is not None:
        return request.prompt
    return tokenizer.decode(request.prompt_token_ids, skip_special_tokens=False)


async def _completion_events(
    ctx: ServingContext,
    body: CompletionRequest,
    request_id: str,
    processed: list[ProcessedRequest],
    echoes: list[str],
) -> AsyncIterator[bytes]:
    """Complete SSE frames (`data: ...\n\n`): every chunk one `RequestOutput` produces goes
    out in one write. Text-only chunks (no logprobs, not finished) are built from a
    pre-encoded template; the bytes equal the msgspec encoding of the same chunk."""
    created, n, model = now_s(), body.n, ctx.model_name
    offsets: dict[int, int] = {}  # choice index -> characters sent (logprobs text_offset)
    num_tokens: dict[int, int] = {}
    templates: dict[int, tuple[bytes, bytes] | None] = {}
    want_logprobs = body.logprobs is not None
    failed: list[bytes] = []

    def frames(i: int, result: RequestOutput) -> bytes:
        parts: list[bytes] = []
        for output in result.outputs:
            if output.finish_reason == "error":
                failed.append(b"".join(parts))  # what came before goes out first
                check_finish(output)
            index = i * n + output.index
            text = output.text
            num_tokens[index] = num_tokens.get(index, 0) + len(output.token_ids)
            if (
                index in offsets
                and not want_logprobs
                and output.finish_reason is None
                and output.stop_reason is None
            ):
                # The common streamed chunk: only text.
                offsets[index] += len(text)
                if not text and not output.token_ids:
                    continue
                template = templates.get(index, _NO_TEMPLATE)
                if template is _NO_TEMPLATE:
                    template = templates[index] = _completion_template(
                        request_id, created, model, index
                    )
                if template is not None:
                    parts.append(template[0] + _encode(text) + template[1])
                    continue
                choice = CompletionChoice(index, text)
                parts.append(_frame(CompletionResponse(request_id, created, model, [choice])))
                continue
            is_first = index not in offsets
            if is_first:
                text, offsets[index] = echoes[i] + text, len(echoes[i])
            logprobs = None
            if want_logprobs:
                logprobs, offsets[index] = completion_logprobs(
                    output, body.logprobs or 0, offsets[index]
                )
                if is_first and body.echo:
                    prompt = prompt_completion_logprobs(result, body.logprobs or 0, ctx.tokenizer)
                    logprobs = join_logprobs(prompt, logprobs)
            elif text:
                offsets[index] += len(text)
            if not text and output.finish_reason is None and not output.token_ids:
                continue
            if is_first:
                choice = _completion_choice(body, result, index, text, logprobs, output)
            else:
                choice = CompletionChoice(
                    index, text, logprobs, output.finish_reason, output.stop_reason
                )
            parts.append(_frame(CompletionResponse(request_id, created, model, [choice])))
        return b"".join(parts)

    streams = [ctx.engine.generate(p, RequestOutputKind.DELTA) for p in processed]
    try:
        if len(streams) == 1:
            # One engine request (n may still be > 1): no merge layer per token.
            async with contextlib.aclosing(streams[0]) as stream:  # type: ignore[type-var]
                async for result in stream:
                    data = frames(0, result)
                    if data:
                        yield data
        else:
            async for i, result in merge(streams):
                data = frames(i, result)
                if data:
                    yield data
    except EngineRequestError:
        if failed and failed[0]:
            yield failed[0]
        raise
    if body.include_usage:
        usage = _stream_usage(processed, num_tokens)
        yield _frame(CompletionResponse(request_id, created, model, [], usage))


_NO_TEMPLATE: Any = object()
# A text placeholder whose JSON encoding cannot occur elsewhere in a chunk (ids and model
# names come from headers and arguments; a NUL in them only disables the template).
_PLACEHOLDER = "\x00"
_PLACEHOLDER_JSON = b'"\\u0000"'


def _split_template(encoded: bytes) -> tuple[bytes, bytes] | None:
    """(`data: ` + what comes before the placeholder, what comes after + blank line)."""
    if encoded.count(_PLACEHOLDER_JSON) != 1:
        return None
    before, after = encoded.split(_PLACEHOLDER_JSON)
    return b"data: " + before, after + b"\n\n"


def _completion_template(
    request_id: str, created: int, model: str, index: int
) -> tuple[bytes, bytes] | None:
    choice = CompletionChoice(index, _PLACEHOLDER)
    return _split_template(_encode(CompletionResponse(request_id, created, model, [choice])))


def _chat_template(
    request_id: str, created: int, model: str, index: int
) -> tuple[bytes, bytes] | None:
    choice = ChatStreamChoice(index, DeltaMessage(content=_PLACEHOLDER))
    return _split_template(_encode(ChatCompletionChunk(request_id, created, model, [choice])))


def _frame(obj: Any) -> bytes:
    return b"data: " + _encode(obj) + b"\n\n"


def _stream_usage(processed: list[ProcessedRequest], num_tokens: dict[int, int]) -> UsageInfo:
    prompt = sum(len(p.prompt_token_ids) for p in processed)
    completion = sum(num_tokens.values())
    return UsageInfo(prompt, completion, prompt + completion)


# ----------------------------------------------------------------------------- chat


async def create_chat_completion(
    ctx: ServingContext, request: Request
) -> Response | StreamingResponse:
    body: ChatCompletionRequest = request.json(ChatCompletionRequest)
    ctx.check_model(body.model)
    params = body.to_sampling_params()
    if body.continue_final_message:
        raise ValueError("continue_final_message: not supported")
    plan = plan_tools(
        body.tools,
        body.tool_choice,
        body.parallel_tool_calls,
        auto_enabled=ctx.tool_parser is not None,
    )
    template_kwargs = dict(body.chat_template_kwargs or {})
    if plan is not None:
        template_kwargs["tools"] = plan.tools
        params = with_tool_constraint(params, plan)
    try:
        prompt = ctx.tokenizer.apply_chat_template(
            body.messages,
            add_generation_prompt=body.add_generation_prompt,
            chat_template=body.chat_template,
            **template_kwargs,
        )
    except jinja2.TemplateError as e:
        raise HTTPError(400, f"the chat template rejected the messages: {e}", "messages") from e
    ids = _request_ids(request, "chatcmpl")
    processed = ctx.engine.process(
        ids.internal, prompt, params, add_special_tokens=body.add_special_tokens
    )
    num_top = body.top_logprobs or 0
    parses_tools = plan is not None and plan.mode != "none"
    if body.stream:
        if parses_tools:
            assert plan is not None
            events = tool_chat_events(ctx, body, ids.public, processed, plan)
        else:
            events = _chat_events(ctx, body, ids.public, processed)
        return StreamingResponse(events, ids.headers, framed=True)
    result = await _final(ctx.engine, processed)
    choices = []
    for o in best_outputs(result.outputs, body.n):
        message, finish_reason = ChatMessage("assistant", o.text), o.finish_reason
        if parses_tools:
            assert plan is not None
            message, finish_reason = assistant_message(
                o.text, o.finish_reason, plan, ctx.tool_parser
            )
        logprobs = chat_logprobs(o, num_top, ctx.tokenizer) if body.logprobs else None
        choices.append(ChatChoice(o.index, message, logprobs, finish_reason, o.stop_reason))
    response = ChatCompletionResponse(
        ids.public, now_s(), ctx.model_name, choices, usage_of([result])
    )
    if body.prompt_logprobs is not None:
        response = ScoredChatCompletionResponse(
            response.id,
            response.created,
            response.model,
            response.choices,
            response.usage,
            prompt_logprobs=vllm_prompt_logprobs(result),
        )
    return json_response(response, headers=ids.headers)


async def _chat_events(
    ctx: ServingContext, body: ChatCompletionRequest, request_id: str, processed: ProcessedRequest
) -> AsyncIterator[bytes]:
    """Complete SSE frames, as `_completion_events`."""
    created, model = now_s(), ctx.model_name
    num_top = body.top_logprobs or 0
    # The first chunk of every choice names the role; one choice per chunk (OpenAI's shape:
    # clients that read choices[0] see every choice).
    yield b"".join(
        _frame(ChatCompletionChunk(request_id, created, model, [first]))
        for first in (
            ChatStreamChoice(i, DeltaMessage(role="assistant", content="")) for i in range(body.n)
        )
    )
    num_tokens = 0
    templates: dict[int, tuple[bytes, bytes] | None] = {}
    async with contextlib.aclosing(  # type: ignore[type-var]
        ctx.engine.generate(processed, RequestOutputKind.DELTA)
    ) as stream:
        async for result in stream:
            outputs = result.outputs
            if len(outputs) == 1 and not body.logprobs:
                output = outputs[0]
                check_finish(output)
                num_tokens += len(output.token_ids)
                if output.text and output.finish_reason is None and output.stop_reason is None:
                    # The common streamed chunk: one choice, only text.
                    template = templates.get(output.index, _NO_TEMPLATE)
                    if template is _NO_TEMPLATE:
                        template = templates[output.index] = _chat_template(
                            request_id, created, model, output.index
                        )
                    if template is not None:
                        yield template[0] + _encode(output.text) + template[1]
                        continue
                counted = True
            else:
                counted = False
            choices = []
            for output in outputs:
                if not counted:
                    check_finish(output)
                    num_tokens += len(output.token_ids)
                if not output.text and output.finish_reason is None and not output.token_ids:
                    continue
                logprobs = chat_logprobs(output, num_top, ctx.tokenizer) if body.logprobs else None
                delta = DeltaMessage(content=output.text if output.text else None)
                choices.append(
                    ChatStreamChoice(
                        output.index, delta, logprobs, output.finish_reason, output.stop_reason
                    )
                )
            if choices:
                yield b"".join(
                    _frame(ChatCompletionChunk(request_id, created, model, [c])) for c in choices
                )
    if body.include_usage:
        prompt = len(processed.prompt_token_ids)
        usage = UsageInfo(prompt, num_tokens, prompt + num_tokens)
        yield _frame(ChatCompletionChunk(request_id, created, model, [], usage))
