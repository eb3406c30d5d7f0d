"""What a caller gets back for a request: `RequestOutput` / `CompletionOutput` (vLLM-shaped)."""

from __future__ import annotations

import array
import enum
import sys
from dataclasses import dataclass, field


class RequestOutputKind(enum.Enum):
    """How often, and with what, a request's outputs are reported."""

    # Every update carries everything generated so far.
    CUMULATIVE = "cumulative"
    # Every update carries only what is new since the last one (streaming).
    DELTA = "delta"
    # One output, when the request has finished.
    FINAL_ONLY = "final"


@dataclass
class Logprob:
    """One token's log probability at one position, its 1-based rank in the vocabulary and its
    text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# Per generated position: {token_id: Logprob}; the sampled token comes first, then the top-k.
SampleLogprobs = list[dict[int, Logprob]]
# Per prompt position, the same; None for the first token (nothing predicts it).
PromptLogprobs = list[dict[int, Logprob] | None]


@dataclass
class CompletionOutput:
    """One generated sequence (one of the request's `n`)."""

    index: int
    text: str
    token_ids: list[int]
    # Sum of the sampled tokens' logprobs (None unless logprobs were requested).
    cumulative_logprob: float | None = None
    logprobs: SampleLogprobs | None = None
    # "stop" (EOS, a stop token or a stop string), "length", "abort" or "error"; None while
    # running.
    finish_reason: str | None = None
    # The stop string or stop token id that ended the sequence (None for EOS and the rest).
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """The state of one request: its prompt and one `CompletionOutput` per sequence reported.

    With `RequestOutputKind.DELTA` only the sequences with news are listed, each holding only
    the new text and tokens; otherwise all `n`, in index order."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    # Prompt tokens served from the prefix cache.
    num_cached_tokens: int = 0
    # When requested (`prompt_logprobs`): one entry per prompt token, None for the first.
    prompt_logprobs: PromptLogprobs | None = None
    # An embedding request's pooled vector: float32 little-endian bytes.
    embedding: bytes = b""

    def embedding_values(self) -> list[float]:
        """`embedding` as floats (empty unless this was an embedding request)."""
        values = array.array("f", self.embedding)
        if sys.byteorder != "little":
            values.byteswap()
        return values.tolist()
