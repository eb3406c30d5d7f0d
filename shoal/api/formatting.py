"""Turning `RequestOutput`s into OpenAI shapes: logprobs (completions and chat), usage, merging streams."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import Any, TypeVar

from shoal.api.protocol import (
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionLogprobs,
    TopLogprob,
    UsageInfo,
)
from shoal.processing.outputs import CompletionOutput, Logprob, RequestOutput
from shoal.processing.tokenizer import Tokenizer

T = TypeVar("T")


class EngineRequestError(RuntimeError):
    """The engine failed a request (finish reason "error")."""


def check_finish(output: CompletionOutput) -> None:
    """Raise for a sequence the engine failed (the route turns it into a 500)."""
    if output.finish_reason == "error":
        raise EngineRequestError("the engine failed this request")


def completion_logprobs(
    output: CompletionOutput,
    num_top: int,
    start_offset: int,
) -> tuple[CompletionLogprobs, int]:
    """OpenAI completions logprobs of `output`'s new tokens: `tokens`, `token_logprobs`,
    `top_logprobs` (None when `num_top` is 0) and `text_offset` counted from `start_offset`
    (the characters already returned). Returns it and the offset after these tokens."""
    result = CompletionLogprobs([], [], [], [])
    offset = start_offset
    for position in output.logprobs or []:
        (sampled_id, sampled), *_ = position.items()
        token = sampled.decoded_token or ""
        result.tokens.append(token)
        result.token_logprobs.append(sampled.logprob)
        result.text_offset.append(offset)
        offset += len(token)
        if num_top > 0:
            result.top_logprobs.append(
                {lp.decoded_token or "": lp.logprob for _, lp in _top(position, num_top)}
            )
        else:
            result.top_logprobs.append(None)
    return result, offset


def chat_logprobs(output: CompletionOutput, num_top: int, tokenizer: Tokenizer) -> ChatLogprobs:
    """OpenAI chat logprobs: `content: [{token, logprob, bytes, top_logprobs}]`."""
    content = []
    for position in output.logprobs or []:
        (sampled_id, sampled), *_ = position.items()
        top = [
            TopLogprob(lp.decoded_token or "", lp.logprob, list(tokenizer.token_bytes(tid)))
            for tid, lp in _top(position, num_top)
        ]
        content.append(
            ChatTokenLogprob(
                sampled.decoded_token or "",
                sampled.logprob,
                list(tokenizer.token_bytes(sampled_id)),
                top,
            )
        )
    return ChatLogprobs(content)


def _top(position: dict[int, Logprob], num_top: int) -> list[tuple[int, Logprob]]:
    # The engine's top-k carry ranks 1..k; the sampled token is among them iff its rank <= k.
    ranked = [
        (tid, lp) for tid, lp in position.items() if lp.rank is not None and lp.rank <= num_top
    ]
    ranked.sort(key=lambda item: item[1].rank or 0)
    return ranked[:num_top]


def usage_of(results: Sequence[RequestOutput]) -> UsageInfo:
    prompt = sum(len(r.prompt_token_ids) for r in results)
    completion = sum(len(o.token_ids) for r in results for o in r.outputs)
    return UsageInfo(prompt, completion, prompt + completion)


async def gather_or_cancel(awaitables: Sequence[Awaitable[T]]) -> list[T]:
    """Like `asyncio.gather`, but the first failure cancels the rest."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


_DONE: Any = object()


async def merge(streams: Sequence[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Items of several async iterators as `(iterator index, item)`, as they arrive. Closing
    the merge closes every iterator (aborting their requests)."""
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]) as only:  # type: ignore[type-var]
            async for item in only:
                yield 0, item
        return
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[T]) -> None:
        try:
            async with contextlib.aclosing(stream) as s:  # type: ignore[type-var]
                async for item in s:
                    queue.put_nowait((i, item))
        except Exception as e:
            queue.put_nowait((i, e))
        finally:
            queue.put_nowait((i, _DONE))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is _DONE:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
