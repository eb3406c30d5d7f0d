"""POST /v1/responses: OpenAI's Responses API for text, over the chat path.

`input` (a string, or a list of messages whose content is a string or text parts) and
`instructions` (a system message first) are rendered with the model's chat template; one
assistant message with one `output_text` part comes back, with `usage`. Streaming sends
OpenAI's events (`event: <type>` + `data: {...}`, each with a `sequence_number`):

    response.created, response.in_progress, response.output_item.added,
    response.content_part.added, response.output_text.delta (per chunk),
    response.output_text.done, response.content_part.done, response.output_item.done,
    response.completed (or response.incomplete when max_output_tokens cut the text)

Not supported (400 naming the field): tools, previous_response_id (nothing is stored),
non-text input parts and text formats other than plain text.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator
from typing import Any

import jinja2
import msgspec

from shoal.api.asgi import HTTPError, Request, Response, StreamingResponse, json_response
from shoal.api.formatting import check_finish
from shoal.api.protocol import now_s
from shoal.api.routes import ServingContext
from shoal.processing.outputs import RequestOutput, RequestOutputKind
from shoal.processing.processor import ProcessedRequest
from shoal.sampling_params import SamplingParams

_encode = msgspec.json.Encoder().encode
_ROLES = ("user", "assistant", "system", "developer")
_TEXT_PARTS = ("input_text", "output_text", "text")


class ResponsesRequest(msgspec.Struct, kw_only=True):
    input: str | list[Any]
    model: str | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    previous_response_id: str | None = None
    store: bool | None = None
    metadata: dict[str, Any] | None = None
    user: str | None = None
    truncation: str | None = None
    # vLLM-style extensions, as on the other routes.
    top_k: int | None = None
    seed: int | None = None

    def to_sampling_params(self) -> SamplingParams:
        if self.tools:
            raise ValueError("tools: not supported on /v1/responses (use /v1/chat/completions)")
        if self.previous_response_id is not None:
            raise ValueError("previous_response_id: not supported (responses are not stored)")
        text_format = (self.text or {}).get("format", {"type": "text"})
        if not isinstance(text_format, dict) or text_format.get("type") != "text":
            raise ValueError("text.format: only {'type': 'text'} is supported")
        if self.max_output_tokens is not None and self.max_output_tokens < 1:
            raise ValueError("max_output_tokens: must be at least 1")
        return SamplingParams(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            seed=self.seed,
            max_tokens=self.max_output_tokens,
        )

    def messages(self) -> list[dict[str, str]]:
        """Chat messages: `instructions` as the system message, then `input`."""
        out = (
            [] if self.instructions is None else [{"role": "system", "content": self.instructions}]
        )
        if isinstance(self.input, str):
            if not self.input:
                raise ValueError("input: must not be empty")
            return [*out, {"role": "user", "content": self.input}]
        if not self.input:
            raise ValueError("input: must not be empty")
        return out + [_message(i, item) for i, item in enumerate(self.input)]


def _message(i: int, item: Any) -> dict[str, str]:
    field = f"input[{i}]"
    if not isinstance(item, dict):
        raise ValueError(f"{field}: must be a message object")
    kind = item.get("type", "message")
    if kind != "message":
        raise ValueError(f"{field}.type: {kind!r} is not supported (only messages)")
    role = item.get("role")
    if role not in _ROLES:
        raise ValueError(f"{field}.role: must be one of {list(_ROLES)}, got {role!r}")
    content = item.get("content")
    if isinstance(content, str):
        text = content
    elif isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") not in _TEXT_PARTS:
                got = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ValueError(
                    f"{field}.content[{j}]: only text parts are supported, got {got!r}"
                )
            parts.append(str(part.get("text", "")))
        text = "".join(parts)
    else:
        raise ValueError(f"{field}.content: must be a string or a list of text parts")
    return {"role": "system" if role == "developer" else role, "content": text}


async def create_response(ctx: ServingContext, request: Request) -> Response | StreamingResponse:
    body: ResponsesRequest = request.json(ResponsesRequest)
    ctx.check_model(body.model)
    params = body.to_sampling_params()
    try:
        prompt = ctx.tokenizer.apply_chat_template(body.messages(), add_generation_prompt=True)
    except jinja2.TemplateError as e:
        raise HTTPError(400, f"the chat template rejected the input: {e}", "input") from e
    response_id = f"resp_{secrets.token_hex(12)}"
    processed = ctx.engine.process(response_id, prompt, params, add_special_tokens=False)
    shape = _Shape(ctx.model_name, body, response_id, processed.sampling_params.max_tokens)
    if body.stream:
        return StreamingResponse(_events(ctx, shape, processed), framed=True, done=False)
    result: RequestOutput | None = None
    async for output in ctx.engine.generate(processed, RequestOutputKind.FINAL_ONLY):
        result = output
    assert result is not None and result.finished
    sequence = result.outputs[0]
    check_finish(sequence)
    usage = _usage(len(result.prompt_token_ids), len(sequence.token_ids), result.num_cached_tokens)
    return json_response(shape.response(sequence.text, sequence.finish_reason, usage))


class _Shape:
    """The parts of a response object that do not change while it is generated."""

    def __init__(
        self, model: str, body: ResponsesRequest, response_id: str, max_tokens: int | None
    ) -> None:
        self.model, self.body, self.id = model, body, response_id
        self.message_id = f"msg_{secrets.token_hex(12)}"
        self.created_at = now_s()
        self.max_tokens = body.max_output_tokens if body.max_output_tokens else max_tokens

    def response(
        self, text: str | None, finish_reason: str | None, usage: dict[str, Any] | None
    ) -> dict[str, Any]:
        """The response object: in progress while `text` is None."""
        body = self.body
        if text is None:
            status, output = "in_progress", []
        else:
            status = "incomplete" if finish_reason == "length" else "completed"
            output = [self.message(text, "completed")]
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": None,
            "incomplete_details": (
                {"reason": "max_output_tokens"} if status == "incomplete" else None
            ),
            "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens,
            "model": self.model,
            "output": output,
            "parallel_tool_calls": True,
            "previous_response_id": None,
            "temperature": 1.0 if body.temperature is None else body.temperature,
            "tool_choice": "auto",
            "tools": [],
            "top_p": 1.0 if body.top_p is None else body.top_p,
            "text": {"format": {"type": "text"}},
            "truncation": body.truncation or "disabled",
            "metadata": body.metadata or {},
            "user": body.user,
            "usage": usage,
        }

    def message(self, text: str | None, status: str) -> dict[str, Any]:
        content = [] if text is None else [_text_part(text)]
        return {
            "id": self.message_id,
            "type": "message",
            "status": status,
            "role": "assistant",
            "content": content,
        }


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": []}


def _usage(num_input: int, num_output: int, num_cached: int) -> dict[str, Any]:
    return {
        "input_tokens": num_input,
        "input_tokens_details": {"cached_tokens": num_cached},
        "output_tokens": num_output,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": num_input + num_output,
    }


async def _events(
    ctx: ServingContext, shape: _Shape, processed: ProcessedRequest
) -> AsyncIterator[bytes]:
    """The SSE events of a streamed response (module doc); an error after the start ends
    the stream with an `error` event."""
    seq = _Sequencer()
    where = {"item_id": shape.message_id, "output_index": 0, "content_index": 0}
    yield seq.event("response.created", response=shape.response(None, None, None))
    yield seq.event("response.in_progress", response=shape.response(None, None, None))
    yield seq.event(
        "response.output_item.added", output_index=0, item=shape.message(None, "in_progress")
    )
    yield seq.event("response.content_part.added", **where, part=_text_part(""))
    pieces: list[str] = []
    num_output, num_cached, finish_reason = 0, 0, None
    try:
        async with contextlib.aclosing(  # type: ignore[type-var]
            ctx.engine.generate(processed, RequestOutputKind.DELTA)
        ) as stream:
            async for result in stream:
                num_cached = result.num_cached_tokens
                for output in result.outputs:
                    check_finish(output)
                    num_output += len(output.token_ids)
                    finish_reason = output.finish_reason or finish_reason
                    if output.text:
                        pieces.append(output.text)
                        yield seq.event(
                            "response.output_text.delta", **where, delta=output.text, logprobs=[]
                        )
    except Exception as e:  # the headers went out: report it in the stream
        message = str(e) if isinstance(e, ValueError) else "the engine failed this request"
        yield seq.event("error", code=None, message=message, param=None)
        return
    text = "".join(pieces)
    yield seq.event("response.output_text.done", **where, text=text, logprobs=[])
    yield seq.event("response.content_part.done", **where, part=_text_part(text))
    yield seq.event(
        "response.output_item.done", output_index=0, item=shape.message(text, "completed")
    )
    usage = _usage(len(processed.prompt_token_ids), num_output, num_cached)
    final = shape.response(text, finish_reason, usage)
    kind = "response.incomplete" if final["status"] == "incomplete" else "response.completed"
    yield seq.event(kind, response=final)


class _Sequencer:
    """Numbers the events of one stream (`sequence_number`, from 0)."""

    def __init__(self) -> None:
        self.next = 0

    def event(self, kind: str, **fields: Any) -> bytes:
        data = _encode({"type": kind, "sequence_number": self.next, **fields})
        self.next += 1
        return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"
