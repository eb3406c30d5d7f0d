"""The runner's prompt work: logprobs of prompt tokens and pooled prompt embeddings, read
from the hidden states of the prompt positions each step computes.

One collaborator for both, since both are "the prompt, no sampling": a request registers
when the runner adds it, and a step in which no registered request runs costs one dict
check (`PromptPass.is_active`). Positions of a prompt arrive chunk by chunk (chunked
prefill), in order; the scheduler gives these requests no prefix-cache hits, so every
position is computed here once (a preemption starts the request again from position 0).

    prompt:      t0   t1   t2   t3   t4          (P = 5 tokens)
    hidden at:   h0   h1   h2   h3   h4
    h_j predicts t_{j+1}: the logprob of t1..t4 comes from h0..h3 (t0 has none).
    mean pooling: mean(h0..h4); last pooling: h4.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from shoal.core.scheduler_output import ModelRunnerOutput
from shoal.worker.input_batch import RequestState, StepBatch
from shoal.worker.sampler import TokenLogprobs

# Prompt positions whose logits are materialized at once ([rows, vocab] float32 each).
LOGITS_ROWS_PER_SLICE = 256


@dataclass
class _PromptWork:
    num_logprobs: int | None  # top alternatives per prompt position, None: no logprobs
    pooling: str | None  # "mean", "last" or None
    normalize: bool
    pooled_sum: torch.Tensor | None = None  # mean pooling: the sum of the positions so far


class PromptPass:
    """Prompt logprobs and pooling for the requests that ask for them."""

    def __init__(self, compute_logits: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """`compute_logits`: hidden states [rows, hidden] -> float32 logits [rows, vocab]."""
        self.compute_logits = compute_logits
        self._work: dict[str, _PromptWork] = {}

    @property
    def is_active(self) -> bool:
        """Whether any request the runner holds has prompt work left."""
        return bool(self._work)

    def add(self, state: RequestState, has_outputs: bool) -> None:
        """Register `state` if it asks for prompt logprobs (not when it resumes with outputs:
        those were sent already) or an embedding, or is prompt only (max_tokens 0: never sampled,
        `skip_sampling`; the runner asks while any request is registered)."""
        p = state.params
        num_logprobs = p.prompt_logprobs if not has_outputs else None
        if num_logprobs is not None or p.pooling is not None or p.is_prompt_only:
            self._work[state.req_id] = _PromptWork(num_logprobs, p.pooling, p.normalize)

    def skip_sampling(self, batch: StepBatch) -> None:
        """Prompt-only requests reach their last token without being sampled."""
        for b, state in enumerate(batch.states):
            if state.params.is_prompt_only:
                batch.is_sampled[b] = False

    def remove(self, req_id: str) -> None:
        self._work.pop(req_id, None)

    def run(self, batch: StepBatch, hidden: torch.Tensor, output: ModelRunnerOutput) -> None:
        """Read this step's prompt positions of every registered request from `hidden`
        ([num_tokens, hidden_size]) into `output.prompt_logprobs` / `output.pooled`."""
        for b, state in enumerate(batch.states):
            work = self._work.get(state.req_id)
            if work is None:
                continue
            ctx = int(batch.num_context[b])
            num_prompt = state.num_prompt_tokens
            end = min(ctx + int(batch.query_lens[b]), num_prompt)  # prompt positions [ctx, end)
            if end <= ctx:
                continue
            start = int(batch.query_start_loc[b])
            rows = hidden[start : start + end - ctx]
            if work.num_logprobs is not None:
                num_scored = min(end, num_prompt - 1) - ctx  # positions with a next prompt token
                if num_scored > 0:
                    targets = state.token_ids[ctx + 1 : ctx + 1 + num_scored]
                    output.prompt_logprobs[state.req_id] = self._logprobs(
                        rows[:num_scored], targets, work.num_logprobs
                    )
            if work.pooling is not None:
                pooled = _pool(work, rows, is_last=end == num_prompt, num_prompt=num_prompt)
                if pooled is not None:
                    output.pooled[state.req_id] = pooled
            if end == num_prompt:
                self.remove(state.req_id)

    def _logprobs(self, rows: torch.Tensor, targets: list[int], k: int) -> list[TokenLogprobs]:
        entries: list[TokenLogprobs] = []
        for lo in range(0, len(targets), LOGITS_ROWS_PER_SLICE):
            hi = min(lo + LOGITS_ROWS_PER_SLICE, len(targets))
            logprobs = self.compute_logits(rows[lo:hi]).log_softmax(dim=-1)
            target = torch.tensor(targets[lo:hi], device=logprobs.device).unsqueeze(1)
            chosen = logprobs.gather(1, target)  # [rows, 1]
            ranks = ((logprobs > chosen).sum(dim=-1) + 1).tolist()
            values, ids = logprobs.topk(k, dim=-1) if k else (chosen[:, :0], chosen[:, :0])
            for token, logprob, rank, top_ids, top_values in zip(
                targets[lo:hi],
                chosen.squeeze(1).tolist(),
                ranks,
                ids.tolist(),
                values.tolist(),
                strict=True,
            ):
                entries.append((token, logprob, rank, [int(t) for t in top_ids], top_values))
        return entries


def _pool(work: _PromptWork, rows: torch.Tensor, is_last: bool, num_prompt: int) -> bytes | None:
    """Fold this chunk's positions into the pooled vector; its bytes once the prompt ends."""
    if work.pooling == "mean":
        chunk_sum = rows.float().sum(dim=0)
        work.pooled_sum = chunk_sum if work.pooled_sum is None else work.pooled_sum + chunk_sum
    if not is_last:
        return None
    if work.pooling == "mean":
        assert work.pooled_sum is not None
        vector = work.pooled_sum / num_prompt
    else:
        vector = rows[-1].float()
    if work.normalize:
        vector = F.normalize(vector, p=2.0, dim=-1)
    return vector.cpu().numpy().astype(np.dtype("<f4")).tobytes()
