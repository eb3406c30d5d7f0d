"""The contract between the scheduler (pure Python) and the model runner (torch).

Each step the scheduler emits one `SchedulerOutput`; the runner keeps per-request state across
steps (token ids, block table, sampling state) and returns one `ModelRunnerOutput`.

- `scheduled_new_reqs`: requests the runner has not seen, or has dropped (resumed after
  preemption: their `output_token_ids` are non-empty and are recomputed like prompt tokens).
- `scheduled_cached_reqs`: requests the runner already holds, continuing (next prefill chunk,
  or one decode token). The runner appends the token it sampled last step itself.
- `num_scheduled_tokens[req_id]`: how many tokens of the request to compute this step,
  starting at its `num_computed_tokens`.
- A request is sampled only when this step reaches its last known token
  (`num_computed_tokens + num_scheduled_tokens == len(prompt) + len(outputs)`); a chunk that
  stops short of that samples nothing (an empty list in `sampled_token_ids`).
- `finished_req_ids` / `preempted_req_ids`: the runner drops their state, before it adds
  this step's `scheduled_new_reqs` (a resumed request arrives in a later step as new). They
  are delivered with the next step that schedules tokens; a step with nothing scheduled
  never reaches the runner.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from shoal.sampling_params import SamplingParams


@dataclass
class NewRequestData:
    req_id: str
    prompt_token_ids: list[int]
    # Already generated tokens (non-empty only when resuming after preemption).
    output_token_ids: list[int]
    sampling_params: SamplingParams
    # Every block of the request's block table so far.
    block_ids: list[int]
    # Tokens already in the KV cache (prefix-cache hits); computing starts here.
    num_computed_tokens: int
    # The model's EOS id (None: none), for masking EOS while fewer than min_tokens outputs.
    eos_token_id: int | None = None
    # The prompt's input embeddings (a torch.Tensor [num_prompt_tokens, hidden]) when the
    # client sent `prompt_embeds`; prompt_token_ids are then placeholders. Opaque here.
    prompt_embeds: Any = None


@dataclass
class CachedRequestData:
    req_ids: list[str] = field(default_factory=list)
    # Blocks appended to each request's block table this step (often empty).
    new_block_ids: list[list[int]] = field(default_factory=list)
    num_computed_tokens: list[int] = field(default_factory=list)
    num_output_tokens: list[int] = field(default_factory=list)

    @property
    def num_reqs(self) -> int:
        return len(self.req_ids)

    # req_id -> no output tokens yet; built on first use so lookups are O(1).
    _is_ctx: dict[str, bool] | None = field(default=None, init=False, repr=False, compare=False)

    def is_context_phase(self, req_id: str) -> bool:
        """True for a listed request with no output tokens yet (a later prefill chunk)."""
        if self._is_ctx is None or len(self._is_ctx) != len(self.req_ids):
            self._is_ctx = {}
            for rid, num_out in zip(self.req_ids, self.num_output_tokens, strict=True):
                self._is_ctx.setdefault(rid, num_out == 0)
        return self._is_ctx.get(req_id, False)


@dataclass
class SchedulerOutput:
    scheduled_new_reqs: list[NewRequestData] = field(default_factory=list)
    scheduled_cached_reqs: CachedRequestData = field(default_factory=CachedRequestData)
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    total_num_scheduled_tokens: int = 0
    finished_req_ids: set[str] = field(default_factory=set)
    preempted_req_ids: set[str] = field(default_factory=set)
    # Structured outputs (set by the engine's StructuredOutputManager): the requests sampled
    # this step under a grammar, and their allowed tokens as a [len(grammar_req_ids),
    # ceil(vocab / 32)] int32 bitmask (row i for grammar_req_ids[i]; opaque here).
    grammar_req_ids: list[str] = field(default_factory=list)
    grammar_bitmask: Any = None


@dataclass
class ModelRunnerOutput:
    # Order of the requests in this step's batch.
    req_ids: list[str] = field(default_factory=list)
    # One list per request (empty when the step did not reach its last token).
    sampled_token_ids: list[list[int]] = field(default_factory=list)
    # Per request, per sampled token: (token_id, logprob, rank, top ids, top logprobs), or
    # None when the request asked for no logprobs.
    logprobs: list[list[tuple[int, float, int, list[int], list[float]]] | None] = field(
        default_factory=list
    )
    # Requests asking for prompt logprobs: the entries of the prompt positions this step
    # computed, in order (the same tuples as `logprobs`).
    prompt_logprobs: dict[str, list[tuple[int, float, int, list[int], list[float]]]] = field(
        default_factory=dict
    )
    # Embedding requests whose prompt this step finished: the pooled vector (float32 bytes).
    pooled: dict[str, bytes] = field(default_factory=dict)
