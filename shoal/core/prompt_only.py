"""The scheduler's side of prompt work: prompt logprobs gathered across prefill chunks, and
the final output of a prompt-only request (max_tokens 0: prompt scoring, an embedding)."""

from __future__ import annotations

from shoal.core.request import Request
from shoal.protocol import EngineCoreOutput, FinishReason, TokenLogprobs

# (token_id, logprob, rank, top ids, top logprobs), as the runner reports them.
RawLogprobs = list[tuple[int, float, int, list[int], list[float]]]


def add_prompt_logprobs(requests: dict[str, Request], computed: dict[str, RawLogprobs]) -> None:
    """Append the prompt logprobs one step computed to their requests (in prompt order: a
    request's chunks run in order, and a preemption starts its list afresh)."""
    for req_id, entries in computed.items():
        request = requests.get(req_id)
        if request is not None and request.prompt_logprobs is not None:
            request.prompt_logprobs.extend(entries)


def prompt_only_output(request: Request, pooled: dict[str, bytes]) -> EngineCoreOutput:
    """The one output of a finished prompt-only request: no tokens, finish reason LENGTH,
    its prompt logprobs and its embedding where it asked for them."""
    request.has_sent_output = True
    output = EngineCoreOutput(
        request.request_id,
        [],
        finish_reason=FinishReason.LENGTH,
        num_cached_tokens=max(request.num_cached_tokens, 0),
    )
    if request.prompt_logprobs is not None:
        output.prompt_logprobs = wire_logprobs(request.prompt_logprobs)
    embedding = pooled.get(request.request_id)
    if embedding is not None:
        output.embedding = embedding
    return output


def wire_logprobs(raw: RawLogprobs) -> list[TokenLogprobs]:
    """The runner's logprob tuples as wire structs."""
    return [
        TokenLogprobs(token_id, logprob, rank, list(top_ids), list(top_logprobs))
        for token_id, logprob, rank, top_ids, top_logprobs in raw
    ]
