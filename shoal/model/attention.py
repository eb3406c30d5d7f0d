"""Paged attention over a flat batch: KV cache writes by slot, per-step attention metadata.

KV cache of one layer: a tensor [2, num_blocks, block_size, num_kv_heads, head_dim]
(index 0 = keys, 1 = values). Token-major blocks make a token's cache entry one row of the
flat view [num_blocks * block_size, num_kv_heads, head_dim], addressed by its slot:

    request r, block_size 4, block table [7, 2, 9], 10 tokens known
    position   0 1 2 3 | 4 5 6 7 | 8 9
    block      7         2         9            block = block_table[position // 4]
    slot       28 ... 31 8 ... 11  36 37        slot  = block * 4 + position % 4

The flat batch puts the decode requests (one query token each) first, then the requests
with several query tokens (prefill chunks), each contiguous:

    tokens:  [ d0 d1 d2 | p0 p0 p0 p0 p0 | p1 p1 p1 ]
             num_decodes  prefill spans (start, end) into the flat batch

Decodes go through the ops table (`ModelOps.decode_attention`, shoal/model/ops.py). Float32
on CPU, the native `paged_decode_attention` kernel reads each request's keys and values in
place through its block table. Elsewhere (bf16, CUDA, no native kernels),
`torch_decode_attention` makes one batched gather of every decode request's blocks (block
table padded to the longest, pad = block 0) and one SDPA with a [num_decodes, 1, 1, keys]
mask hiding the padding.
Prefill spans: a span with no cached context attends to its own new keys with a causal mask;
one with context (a later chunk or a prefix-cache hit) gathers its blocks and uses an
offset-causal mask. Every layer shares the metadata, built once per step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from shoal.model.ops import ModelOps


@dataclass
class PrefillSpan:
    start: int  # first token of the request in the flat batch
    end: int  # one past its last token
    num_context: int  # tokens already in the KV cache before this chunk
    # [num_blocks_needed] int64; None when num_context == 0 (keys come from this chunk).
    block_table: torch.Tensor | None
    # [num_query, num_keys] bool (True = attend); None = plain causal over the chunk.
    mask: torch.Tensor | None


@dataclass
class AttentionMetadata:
    # [num_tokens] int64: where each token's K/V is written in the flat cache.
    slot_mapping: torch.Tensor
    num_decodes: int = 0
    # [num_decodes, max_blocks] int64 and [num_decodes] int64 (context + the new token).
    decode_block_table: torch.Tensor | None = None
    decode_seq_lens: torch.Tensor | None = None
    block_size: int = 16
    sliding_window: int | None = None
    # [num_decodes, 1, 1, max_blocks * block_size] bool, built by the first layer that takes
    # the torch path (the native kernel needs none).
    decode_mask: torch.Tensor | None = None
    prefills: list[PrefillSpan] = field(default_factory=list)
    # Gathered decode K/V, allocated by the first layer and reused by the others (layers run
    # one after another), so a step allocates it once: [2, num_decodes * max_blocks, ...].
    decode_workspace: torch.Tensor | None = None


def build_attention_metadata(
    slot_mapping: torch.Tensor,
    query_lens: np.ndarray,
    num_context: np.ndarray,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    block_size: int,
    sliding_window: int | None = None,
) -> AttentionMetadata:
    """Metadata for one step. `query_lens[i]` / `num_context[i]`: request i's new and cached
    token counts (decode requests first: every `query_lens == 1` before any other);
    `block_tables` ([num_reqs, >= max blocks needed] int64) and `seq_lens` ([num_reqs] int64,
    context + new tokens) on the model's device."""
    num_decodes = int(np.searchsorted(query_lens > 1, True))
    meta = AttentionMetadata(
        slot_mapping=slot_mapping,
        num_decodes=num_decodes,
        block_size=block_size,
        sliding_window=sliding_window,
    )
    if num_decodes:
        # Keys padded to the longest decode request's whole blocks.
        max_blocks = -(-int(num_context[:num_decodes].max() + 1) // block_size)
        meta.decode_block_table = block_tables[:num_decodes, :max_blocks]
        meta.decode_seq_lens = seq_lens[:num_decodes]
    start = num_decodes
    for i in range(num_decodes, len(query_lens)):
        q_len, ctx = int(query_lens[i]), int(num_context[i])
        meta.prefills.append(
            _prefill_span(start, q_len, ctx, block_tables[i], block_size, sliding_window)
        )
        start += q_len
    return meta


def _prefill_span(
    start: int,
    q_len: int,
    ctx: int,
    block_table: torch.Tensor,
    block_size: int,
    sliding_window: int | None,
) -> PrefillSpan:
    table = block_table[: -(-(ctx + q_len) // block_size)] if ctx else None
    mask = None
    if ctx or (sliding_window is not None and q_len > sliding_window):
        mask = _causal_mask(q_len, ctx, sliding_window, block_table.device)
    return PrefillSpan(start, start + q_len, ctx, table, mask)


def _causal_mask(
    q_len: int, ctx: int, sliding_window: int | None, device: torch.device
) -> torch.Tensor:
    """[q_len, ctx + q_len] bool: query i (position ctx + i) sees keys 0 .. ctx + i."""
    q_pos = torch.arange(ctx, ctx + q_len, device=device).unsqueeze(1)
    k_pos = torch.arange(ctx + q_len, device=device)
    mask = k_pos <= q_pos
    if sliding_window is not None:
        mask &= k_pos > q_pos - sliding_window
    return mask


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """Store this step's keys and values ([num_tokens, num_kv_heads, head_dim]) at `slots`,
    rounded to the cache's dtype (`--kv-cache-dtype float16`)."""
    _, num_blocks, block_size, num_kv_heads, head_dim = kv_cache.shape
    flat = kv_cache.view(2, num_blocks * block_size, num_kv_heads, head_dim)
    flat[0].index_copy_(0, slots, k.to(kv_cache.dtype))
    flat[1].index_copy_(0, slots, v.to(kv_cache.dtype))


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
    ops: ModelOps,
) -> torch.Tensor:
    """Attention of every query token over its request's keys; this step's keys and values
    are already in the cache (`ModelOps.rope_and_cache` wrote them).

    q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim].
    Returns [num_tokens, num_heads, head_dim]."""
    out = q.new_empty(q.shape)  # contiguous (q is a strided view into the qkv output)
    if meta.num_decodes:
        n = meta.num_decodes
        out[:n] = ops.decode_attention(q[:n], kv_cache, meta)
    for span in meta.prefills:
        out[span.start : span.end] = _prefill_attention(q, k, v, kv_cache, span)
    return out


def _decode_mask(meta: AttentionMetadata) -> torch.Tensor:
    assert meta.decode_block_table is not None and meta.decode_seq_lens is not None
    if meta.decode_mask is None:
        n, max_blocks = meta.decode_block_table.shape
        key_pos = torch.arange(max_blocks * meta.block_size, device=meta.slot_mapping.device)
        lens = meta.decode_seq_lens.unsqueeze(1)
        visible = key_pos < lens
        if meta.sliding_window is not None:
            visible &= key_pos >= lens - meta.sliding_window
        meta.decode_mask = visible.view(n, 1, 1, -1)
    return meta.decode_mask


def torch_decode_attention(
    q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata
) -> torch.Tensor:
    """Decode attention on torch ops (any device and dtype): q [num_decodes, num_heads,
    head_dim] over each request's cached keys -> [num_decodes, num_heads, head_dim]."""
    assert meta.decode_block_table is not None and meta.decode_seq_lens is not None
    n, num_heads, head_dim = q.shape
    num_kv_heads = kv_cache.shape[3]
    # GQA without copying keys: the query heads sharing a KV head become rows of one matrix.
    # [n, num_kv_heads, queries_per_kv, head_dim]
    qg = q.view(n, num_kv_heads, num_heads // num_kv_heads, head_dim)
    blocks = meta.decode_block_table.flatten()
    if meta.decode_workspace is None:
        meta.decode_workspace = kv_cache.new_empty((2, blocks.numel(), *kv_cache.shape[2:]))
    # index_select into a reused buffer: several times faster than advanced indexing on CPU.
    kv = torch.index_select(kv_cache, 1, blocks, out=meta.decode_workspace)
    # [2, n * max_blocks, block_size, num_kv_heads, head_dim] -> [n, num_kv_heads, keys, head_dim]
    kv = kv.view(2, n, -1, num_kv_heads, head_dim).transpose(2, 3).to(q.dtype)
    o = F.scaled_dot_product_attention(qg, kv[0], kv[1], attn_mask=_decode_mask(meta))
    return o.reshape(n, num_heads, head_dim)


def _prefill_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, span: PrefillSpan
) -> torch.Tensor:
    num_heads, head_dim = q.shape[1], q.shape[2]
    if span.block_table is None:
        keys, values = k[span.start : span.end], v[span.start : span.end]
        if kv_cache.dtype != k.dtype:
            # What the cache holds (and what a later chunk or a decode step reads back), so a
            # prompt attends to the same keys whether or not its prefill is split.
            keys, values = (t.to(kv_cache.dtype).to(k.dtype) for t in (keys, values))
    else:
        num_keys = span.num_context + span.end - span.start
        # [2, blocks, block_size, num_kv_heads, head_dim] -> [2, num_keys, num_kv_heads, head_dim]
        kv = kv_cache.index_select(1, span.block_table).flatten(1, 2)[:, :num_keys]
        keys, values = kv[0].to(q.dtype), kv[1].to(q.dtype)
    # [1, heads, tokens, head_dim]; enable_gqa: query head h reads KV head h // group without
    # repeating the keys (1.7x faster than repeat_interleave at 128 tokens on CPU).
    qh = q[span.start : span.end].transpose(0, 1).unsqueeze(0)
    kh = keys.transpose(0, 1).unsqueeze(0)
    vh = values.transpose(0, 1).unsqueeze(0)
    o = F.scaled_dot_product_attention(
        qh, kh, vh, attn_mask=span.mask, is_causal=span.mask is None, enable_gqa=True
    )
    return o[0].transpose(0, 1).reshape(-1, num_heads, head_dim)
