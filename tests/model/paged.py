"""Drive shoal's model step by step over a paged KV cache, with plainly written index
arithmetic (one token at a time) as an independent check of the runner's vectorised one."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import torch

from shoal.model.arch import ArchConfig
from shoal.model.attention import build_attention_metadata
from shoal.model.llama import LlamaForCausalLM


@dataclass
class PagedRequest:
    token_ids: list[int]
    block_ids: list[int] = field(default_factory=list)
    num_computed: int = 0


class PagedDriver:
    def __init__(
        self,
        model: LlamaForCausalLM,
        arch: ArchConfig,
        num_blocks: int,
        block_size: int,
        kv_dtype: torch.dtype | None = None,
    ) -> None:
        self.model, self.block_size = model, block_size
        shape = (2, num_blocks, block_size, arch.num_kv_heads, arch.head_dim)
        dtype = kv_dtype or model.embed_tokens.dtype
        self.kv_caches = [torch.zeros(shape, dtype=dtype) for _ in range(arch.num_layers)]
        # Shuffled, so a request's blocks are neither contiguous nor ordered.
        self.free_blocks = list(range(num_blocks))
        random.Random(0).shuffle(self.free_blocks)
        self.requests: dict[str, PagedRequest] = {}

    def add(self, name: str, token_ids: list[int], shared_blocks: list[int] | None = None) -> None:
        """A request; `shared_blocks` are full blocks already holding its first tokens."""
        shared = list(shared_blocks or [])
        self.requests[name] = PagedRequest(token_ids, shared, len(shared) * self.block_size)

    def step(self, schedule: dict[str, int]) -> dict[str, torch.Tensor]:
        """Compute `schedule[name]` more tokens of each request (decodes must come first).
        Returns each request's logits for those tokens: [n, vocab]."""
        ids, positions, slots = [], [], []
        for name, n in schedule.items():
            req = self.requests[name]
            for pos in range(req.num_computed, req.num_computed + n):
                if pos // self.block_size >= len(req.block_ids):
                    req.block_ids.append(self.free_blocks.pop())
                block = req.block_ids[pos // self.block_size]
                ids.append(req.token_ids[pos])
                positions.append(pos)
                slots.append(block * self.block_size + pos % self.block_size)
        reqs = [self.requests[name] for name in schedule]
        width = max(len(r.block_ids) for r in reqs)
        tables = torch.tensor([r.block_ids + [0] * (width - len(r.block_ids)) for r in reqs])
        query_lens = np.array(list(schedule.values()), dtype=np.int64)
        num_context = np.array([r.num_computed for r in reqs], dtype=np.int64)
        meta = build_attention_metadata(
            torch.tensor(slots),
            query_lens,
            num_context,
            tables,
            torch.from_numpy(num_context + query_lens),
            self.block_size,
            self.model.arch.sliding_window,
        )
        with torch.inference_mode():
            hidden = self.model(torch.tensor(ids), torch.tensor(positions), meta, self.kv_caches)
            logits = self.model.compute_logits(hidden)
        out, start = {}, 0
        for name, n in schedule.items():
            out[name] = logits[start : start + n]
            self.requests[name].num_computed += n
            start += n
        return out
