"""The runner's per-request state across steps, and one step's flattened inputs (numpy side)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from shoal.core.scheduler_output import NewRequestData, SchedulerOutput
from shoal.sampling_params import SamplingParams


@dataclass
class RequestState:
    req_id: str
    row: int  # this request's row in `RequestTable.block_table`
    token_ids: list[int]  # prompt, then outputs (the runner appends what it samples)
    num_prompt_tokens: int
    num_computed_tokens: int
    num_blocks: int
    params: SamplingParams
    eos_token_id: int | None
    generator: torch.Generator | None  # set for seeded, non-greedy requests
    # Penalties, logit bias, allowed ids or bad words set (penalties.py); fixed at arrival.
    has_controls: bool = False
    # [num_prompt_tokens, hidden] input embeddings replacing the prompt's token embeddings
    # (the client's `prompt_embeds`; token_ids then hold placeholders for the prompt).
    prompt_embeds: torch.Tensor | None = None

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    def banned_token_ids(self) -> list[int]:
        """EOS (unless ignore_eos) and stop tokens while fewer than min_tokens outputs."""
        if self.num_output_tokens >= self.params.min_tokens:
            return []
        banned = list(self.params.stop_token_ids)
        if self.eos_token_id is not None and not self.params.ignore_eos:
            banned.append(self.eos_token_id)
        return banned


class RequestTable:
    """Every request the runner holds, each with a row of one persistent block-table array
    ([max_num_reqs, max_blocks_per_req] int64) that grows in rows when needed."""

    def __init__(self, max_num_reqs: int, max_blocks_per_req: int) -> None:
        self.block_table = np.zeros((max_num_reqs, max_blocks_per_req), dtype=np.int64)
        self.states: dict[str, RequestState] = {}
        self._free_rows = list(range(max_num_reqs - 1, -1, -1))

    def add(self, new: NewRequestData, generator: torch.Generator | None) -> RequestState:
        if not self._free_rows:
            old = self.block_table.shape[0]
            self.block_table = np.concatenate([self.block_table, np.zeros_like(self.block_table)])
            self._free_rows = list(range(2 * old - 1, old - 1, -1))
        state = RequestState(
            req_id=new.req_id,
            row=self._free_rows.pop(),
            token_ids=list(new.prompt_token_ids) + list(new.output_token_ids),
            num_prompt_tokens=len(new.prompt_token_ids),
            num_computed_tokens=new.num_computed_tokens,
            num_blocks=0,
            params=new.sampling_params,
            eos_token_id=new.eos_token_id,
            generator=generator,
            has_controls=new.sampling_params.has_logits_controls,
            prompt_embeds=new.prompt_embeds,
        )
        self.block_table[state.row] = 0  # no stale ids from the row's previous request
        self.append_blocks(state, new.block_ids)
        self.states[new.req_id] = state
        return state

    def remove(self, req_id: str) -> None:
        state = self.states.pop(req_id, None)
        if state is not None:
            self._free_rows.append(state.row)

    def append_blocks(self, state: RequestState, block_ids: list[int]) -> None:
        if not block_ids:
            return
        end = state.num_blocks + len(block_ids)
        if end > self.block_table.shape[1]:
            raise RuntimeError(
                f"request {state.req_id}: {end} blocks exceed max_model_len "
                f"({self.block_table.shape[1]} blocks)"
            )
        self.block_table[state.row, state.num_blocks : end] = block_ids
        state.num_blocks = end

    def update_cached(self, so: SchedulerOutput) -> None:
        """Apply this step's `scheduled_cached_reqs` (new blocks, computed counts)."""
        cached = so.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            state = self.states[req_id]
            state.num_computed_tokens = cached.num_computed_tokens[i]
            known = state.num_prompt_tokens + cached.num_output_tokens[i]
            if len(state.token_ids) < known:
                raise RuntimeError(f"request {req_id}: scheduler knows more tokens than the runner")
            del state.token_ids[known:]  # tokens the scheduler did not keep
            self.append_blocks(state, cached.new_block_ids[i])


@dataclass
class StepBatch:
    """One step's requests in batch order (decodes first) and where their tokens sit."""

    states: list[RequestState]
    query_lens: np.ndarray  # [num_reqs] int64
    num_context: np.ndarray  # [num_reqs] int64, tokens cached before this step
    query_start_loc: np.ndarray  # [num_reqs + 1] int64
    is_sampled: np.ndarray  # [num_reqs] bool: this step reaches the request's last token

    @property
    def num_tokens(self) -> int:
        return int(self.query_start_loc[-1])

    @property
    def seq_lens(self) -> np.ndarray:
        return self.num_context + self.query_lens


def order_batch(table: RequestTable, num_scheduled: dict[str, int]) -> StepBatch:
    """Decode requests (one new token) first, then the rest, each group in schedule order."""
    items = sorted(num_scheduled.items(), key=lambda kv: kv[1] != 1)
    states = [table.states[req_id] for req_id, _ in items]
    query_lens = np.fromiter((n for _, n in items), dtype=np.int64, count=len(items))
    num_context = np.fromiter(
        (s.num_computed_tokens for s in states), dtype=np.int64, count=len(states)
    )
    query_start_loc = np.zeros(len(items) + 1, dtype=np.int64)
    np.cumsum(query_lens, out=query_start_loc[1:])
    num_known = np.fromiter((len(s.token_ids) for s in states), dtype=np.int64, count=len(states))
    return StepBatch(
        states, query_lens, num_context, query_start_loc, num_context + query_lens == num_known
    )


def fill_token_inputs(
    batch: StepBatch,
    table: RequestTable,
    block_size: int,
    input_ids: np.ndarray,
    positions: np.ndarray,
    slot_mapping: np.ndarray,
) -> None:
    """Write the step's token ids, positions and KV slots into the first `num_tokens`
    entries of the given arrays (vectorised except one slice copy per request)."""
    num_tokens = batch.num_tokens
    starts = batch.query_start_loc[:-1]
    for state, start, ctx, n in zip(
        batch.states, starts, batch.num_context, batch.query_lens, strict=True
    ):
        if n == 1:
            input_ids[start] = state.token_ids[ctx]
        else:
            input_ids[start : start + n] = state.token_ids[ctx : ctx + n]
    # position of flat token t of request r = ctx_r + (t - start_r)
    pos = positions[:num_tokens]
    np.subtract(
        np.arange(num_tokens), np.repeat(starts - batch.num_context, batch.query_lens), out=pos
    )
    rows = np.repeat(np.fromiter((s.row for s in batch.states), dtype=np.int64), batch.query_lens)
    blocks = table.block_table[rows, pos // block_size]
    np.add(blocks * block_size, pos % block_size, out=slot_mapping[:num_tokens])
