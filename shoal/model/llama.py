"""The Llama-family decoder (Llama, Mistral, Qwen2, SmolLM) over a flat batch: embeddings,
decoder layers, final norm, LM head.

Parameters (allocated uninitialised; a loader fills them), HF name -> ours:
    model.embed_tokens            -> embed_tokens (a bare parameter)
    model.layers.N.self_attn.{q,k,v}_proj -> layers.N.qkv_proj   rows [q | k | v]
    model.layers.N.self_attn.o_proj       -> layers.N.o_proj
    model.layers.N.mlp.{gate,up}_proj     -> layers.N.gate_up_proj rows [gate | up]
    model.layers.N.mlp.down_proj          -> layers.N.down_proj
    model.layers.N.{input,post_attention}_layernorm, model.norm, lm_head (absent when tied)
Fusing q/k/v and gate/up makes one matmul of each pair: fewer kernel launches per decode step.

The ops with a native kernel (RMSNorm, SiLU * up, RoPE + KV cache write, decode attention)
go through the model's ops table (shoal/model/ops.py), chosen once per process. What speeds
a step up beyond this forward is not the model's business: quantized linears replace the
`Linear`s after loading (shoal/model/int8.py, gguf_quant.py), and the runner picks the fused
decode step (fused_decode.py) and the greedy LM head (greedy_head.py).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from shoal.model.arch import ArchConfig
from shoal.model.attention import AttentionMetadata, paged_attention
from shoal.model.ops import ModelOps, model_ops
from shoal.model.rotary import RotaryEmbedding

# Each decoder layer's Linears, in order (what quantization replaces, what the fused decode
# path packs).
LAYER_LINEARS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


class TensorSpec(NamedTuple):
    """Where and in which dtype parameters are allocated."""

    dtype: torch.dtype
    device: torch.device


def _param(spec: TensorSpec, *shape: int) -> nn.Parameter:
    return nn.Parameter(
        torch.empty(*shape, dtype=spec.dtype, device=spec.device), requires_grad=False
    )


class Linear(nn.Module):
    """y = x W^T (+ b), parameters left uninitialised (nn.Linear's init is wasted work here)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, spec: TensorSpec) -> None:
        super().__init__()
        self.weight = _param(spec, out_features, in_features)
        self.bias = _param(spec, out_features) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    """x / rms(x) * weight (`ModelOps.rms_norm`)."""

    def __init__(self, size: int, eps: float, spec: TensorSpec, ops: ModelOps) -> None:
        super().__init__()
        self.weight = _param(spec, size)
        self.eps = eps
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x, self.weight, self.eps)


class DecoderLayer(nn.Module):
    """Pre-norm attention, then a pre-norm SwiGLU MLP, each added to the residual stream."""

    def __init__(self, arch: ArchConfig, spec: TensorSpec, ops: ModelOps) -> None:
        super().__init__()
        hidden, d = arch.hidden_size, arch.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = arch.num_heads, arch.num_kv_heads, d
        self.q_size, self.kv_size = arch.num_heads * d, arch.num_kv_heads * d
        self.ops = ops
        self.input_layernorm = RMSNorm(hidden, arch.rms_norm_eps, spec, ops)
        self.qkv_proj = Linear(hidden, self.q_size + 2 * self.kv_size, arch.attention_bias, spec)
        self.o_proj = Linear(self.q_size, hidden, arch.o_proj_bias, spec)
        self.post_attention_layernorm = RMSNorm(hidden, arch.rms_norm_eps, spec, ops)
        self.gate_up_proj = Linear(hidden, 2 * arch.intermediate_size, False, spec)
        self.down_proj = Linear(arch.intermediate_size, hidden, False, spec)

    def forward(
        self,
        x: torch.Tensor,  # [num_tokens, hidden]
        cos: torch.Tensor,  # [num_tokens, 1, head_dim / 2]
        sin: torch.Tensor,
        meta: AttentionMetadata,
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    ) -> torch.Tensor:
        qkv = self.qkv_proj(self.input_layernorm(x))
        q, k, v = self.ops.rope_and_cache(
            qkv, cos, sin, kv_cache, meta.slot_mapping,
            self.num_heads, self.num_kv_heads, self.head_dim,
        )  # fmt: skip
        attn = paged_attention(q, k, v, kv_cache, meta, self.ops)
        x = x + self.o_proj(attn.view(x.shape[0], self.q_size))
        gate_up = self.gate_up_proj(self.post_attention_layernorm(x))
        return x + self.down_proj(self.ops.silu_mul(gate_up))


class LlamaForCausalLM(nn.Module):
    """`forward(input_ids [T], positions [T], meta, kv_caches) -> hidden [T, hidden]`;
    `compute_logits(hidden [N, hidden]) -> [N, vocab] float32`. `ops`: the table the layers
    call (default: this process's, `model_ops()`)."""

    def __init__(
        self,
        arch: ArchConfig,
        max_positions: int,
        dtype: torch.dtype,
        device: torch.device,
        ops: ModelOps | None = None,
    ) -> None:
        super().__init__()
        self.arch = arch
        self.ops = model_ops() if ops is None else ops
        spec = TensorSpec(dtype, device)
        self.embed_tokens = _param(spec, arch.vocab_size, arch.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(arch, spec, self.ops) for _ in range(arch.num_layers)
        )
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, spec, self.ops)
        self.rotary = RotaryEmbedding(arch, max_positions, dtype, device)
        # None: logits use the embedding matrix (tied). A `Linear`, or an `Int8Linear` once
        # quantized (shoal/model/int8.py).
        self.lm_head: nn.Module | None = None
        if not arch.tie_word_embeddings:
            self.lm_head = Linear(arch.hidden_size, arch.vocab_size, False, spec)
        self.requires_grad_(False)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[T] token ids -> [T, hidden]."""
        return F.embedding(input_ids, self.embed_tokens)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_caches: list[torch.Tensor],
        inputs_embeds: torch.Tensor | None = None,  # [T, hidden], replaces embed(input_ids)
    ) -> torch.Tensor:
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        cos, sin = self.rotary.lookup(positions)
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            x = layer(x, cos, sin, meta, kv_cache)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:
            return F.linear(hidden, self.embed_tokens).float()
        return self.lm_head(hidden).float()


def layer_linears(layer: nn.Module) -> list[nn.Module]:
    """A decoder layer's Linears (whatever replaced them), in `LAYER_LINEARS` order."""
    return [getattr(layer, name) for name in LAYER_LINEARS]
