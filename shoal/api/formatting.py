"""Turning `RequestOutput`s into OpenAI shapes: logprobs (completions and chat), usage, merging streams."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
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
from shoal.structured.params import GRAMMAR_ERROR_PREFIX

T = TypeVar("T")


class EngineRequestError(RuntimeError):
    """The engine failed a request (finish reason "error")."""


def check_finish(output: CompletionOutput) -> None:
    """Raise for a sequence the engine failed (the route turns it into a 500), or whose
    grammar did not compile (`ValueError`: a 400 naming the field)."""
    if output.finish_reason == "error":
        reason = output.stop_reason
        if isinstance(reason, str) and reason.startswith(GRAMMAR_ERROR_PREFIX):
            raise ValueError(reason[len(GRAMMAR_ERROR_PREFIX) :])
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


def prompt_completion_logprobs(
    result: RequestOutput, num_top: int, tokenizer: Tokenizer
) -> CompletionLogprobs:
    """Completions logprobs of the prompt tokens (echo with logprobs): the first token has
    none (`null`), as in OpenAI's answer; `text_offset` counts from 0."""
    logprobs = CompletionLogprobs([], [], [], [])
    offset = 0
    for token_id, position in zip(
        result.prompt_token_ids, result.prompt_logprobs or [], strict=False
    ):
        token = tokenizer.token_text(token_id)
        logprobs.tokens.append(token)
        logprobs.text_offset.append(offset)
        offset += len(token)
        if position is None:
            logprobs.token_logprobs.append(None)
            logprobs.top_logprobs.append(None)
            continue
        logprobs.token_logprobs.append(position[token_id].logprob)
        top = {lp.decoded_token or "": lp.logprob for _, lp in _top(position, num_top)}
        logprobs.top_logprobs.append(top if num_top > 0 else None)
    return logprobs


def join_logprobs(first: CompletionLogprobs, then: CompletionLogprobs) -> CompletionLogprobs:
    return CompletionLogprobs(
        first.text_offset + then.text_offset,
        first.token_logprobs + then.token_logprobs,
        first.tokens + then.tokens,
        first.top_logprobs + then.top_logprobs,
    )


def vllm_prompt_logprobs(result: RequestOutput) -> list[dict[str, Any] | None] | None:
    """vLLM's `prompt_logprobs` shape: per prompt token None or
    `{"<token id>": {"logprob", "rank", "decoded_token"}}`."""
    if result.prompt_logprobs is None:
        return None
    return [
        None
        if position is None
        else {
            str(token_id): {
                "logprob": lp.logprob,
                "rank": lp.rank,
                "decoded_token": lp.decoded_token,
            }
            for token_id, lp in position.items()
        }
        for position in result.prompt_logprobs
    ]


def best_outputs(outputs: list[CompletionOutput], n: int) -> list[CompletionOutput]:
    """`best_of`: the `n` sequences with the highest cumulative logprob (ties: the lower
    index), renumbered 0..n-1 in that order."""
    if len(outputs) <= n:
        return outputs
    ranked = sorted(outputs, key=lambda o: (-(o.cumulative_logprob or 0.0), o.index))[:n]
    return [dataclasses.replace(o, index=i) for i, o in enumerate(ranked)]


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
