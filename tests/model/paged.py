"""Drive shoal's model step by step over a paged KV cache, with plainly written index
arithmetic (one token at a time) as an independent check of the runner's vectorised one."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from shoal.model.arch import ArchConfig
from shoal.model.attention import build_attention_metadata
from shoal.model.fused_decode import FusedDecode
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
        fused: FusedDecode | None = None,
    ) -> None:
        """`fused`: run decode-only steps on it, as the model runner does."""
        self.model, self.block_size, self.fused = model, block_size, fused
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
        forward = self.model.forward
        if self.fused is not None and self.fused.applies(meta, len(ids)):
            forward = self.fused.forward
        with torch.inference_mode():
            hidden = forward(torch.tensor(ids), torch.tensor(positions), meta, self.kv_caches)
            logits = self.model.compute_logits(hidden)
        out, start = {}, 0
        for name, n in schedule.items():
            out[name] = logits[start : start + n]
            self.requests[name].num_computed += n
            start += n
        return out


def assert_fused_decode_matches_python(
    model: LlamaForCausalLM,
    arch: ArchConfig,
    kernels: Any,
    kv_dtype: torch.dtype | None = None,
) -> None:
    """Run a prefill and five decode steps of two requests twice: with the native
    `decode_layers` (`FusedDecode`, checked to be called for exactly the decode steps) and
    with the Python layers; every logit must be bit-identical."""
    calls: list[int] = []

    class Spy:  # the kernels, counting fused calls
        def __getattr__(self, name: str) -> Any:
            return getattr(kernels, name)

        def decode_layers(self, *args: Any) -> Any:
            calls.append(args[0].shape[0])
            return kernels.decode_layers(*args)

    def run(fused: FusedDecode | None) -> list[torch.Tensor]:
        driver = PagedDriver(model, arch, 32, 4, kv_dtype, fused)
        driver.add("a", list(range(3, 40)))
        driver.add("b", list(range(50, 70)))
        steps = [driver.step({"a": 30, "b": 11})]  # prefill: per-layer path
        steps += [driver.step({"a": 1, "b": 1}) for _ in range(5)]  # decode steps
        return [t for step in steps for t in step.values()]

    assert FusedDecode.for_model(model) is not None  # what the runner would take
    fused = run(FusedDecode(model, Spy()))
    assert calls == [2] * 5  # the decode steps took the fused path, the prefill did not
    unfused = run(None)
    for a, b in zip(fused, unfused, strict=True):
        assert torch.equal(a, b)


def tiny_model(
    tmp_path: Any, quantization: str | None, **overrides: Any
) -> tuple[LlamaForCausalLM, ArchConfig]:
    """A 3-layer random-weight Llama (hidden 64, 4 heads over 2 KV heads, vocabulary 256),
    loaded as shoal loads any model; `overrides` change its config.json."""
    import json

    from shoal.config import ModelConfig
    from shoal.model.arch import arch_from_source
    from shoal.model.loader import load_model
    from shoal.model_source import resolve_model

    config = {
        "architectures": ["LlamaForCausalLM"], "vocab_size": 256, "hidden_size": 64,
        "intermediate_size": 96, "num_hidden_layers": 3, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 256, **overrides,
    }  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    source = resolve_model(str(tmp_path))
    arch = arch_from_source(source)
    model_config = ModelConfig(model=str(tmp_path), load_format="dummy", quantization=quantization)
    model = load_model(model_config, source, arch, 256, torch.float32, torch.device("cpu"))
    return model, arch
