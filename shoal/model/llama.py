"""The Llama-family decoder (Llama, Mistral, Qwen2, SmolLM) in plain PyTorch over a flat batch.

Parameters (allocated uninitialised; a loader fills them), HF name -> ours:
    model.embed_tokens            -> embed_tokens (a bare parameter)
    model.layers.N.self_attn.{q,k,v}_proj -> layers.N.qkv_proj   rows [q | k | v]
    model.layers.N.self_attn.o_proj       -> layers.N.o_proj
    model.layers.N.mlp.{gate,up}_proj     -> layers.N.gate_up_proj rows [gate | up]
    model.layers.N.mlp.down_proj          -> layers.N.down_proj
    model.layers.N.{input,post_attention}_layernorm, model.norm, lm_head (absent when tied)
Fusing q/k/v and gate/up makes one matmul of each pair: fewer kernel launches per decode step.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from shoal.model.arch import ArchConfig
from shoal.model.attention import AttentionMetadata, paged_attention


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
    """x / rms(x) * weight, the variance computed in float32 (as transformers does)."""

    def __init__(self, size: int, eps: float, spec: TensorSpec) -> None:
        super().__init__()
        self.weight = _param(spec, size)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_inv_freq(arch: ArchConfig) -> torch.Tensor:
    """[head_dim / 2] float32 rotary frequencies, rescaled per `arch.rope_scaling`."""
    dim = arch.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    inv_freq = 1.0 / (arch.rope_theta**exponents)
    scaling = arch.rope_scaling or {}
    rope_type = scaling.get("rope_type", "default")
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"])
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    return inv_freq


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    # Long wavelengths are divided by `factor`, short ones kept, the band between blended.
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    original = float(scaling["original_max_position_embeddings"])
    low_wavelen, high_wavelen = original / low, original / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, blended, scaled)


class RotaryEmbedding(nn.Module):
    """cos/sin tables [max_positions, head_dim / 2] and the rotate-half (NeoX) rotation."""

    def __init__(
        self, arch: ArchConfig, max_positions: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__()
        self.max_positions = max_positions
        self.dtype = dtype
        self.set_inv_freq(rope_inv_freq(arch).to(device))

    def set_inv_freq(self, inv_freq: torch.Tensor) -> None:
        """Rebuild the tables (a GGUF's `rope_freqs` divides the frequencies)."""
        positions = torch.arange(self.max_positions, device=inv_freq.device).float()
        freqs = torch.outer(positions, inv_freq.float())  # [positions, head_dim / 2]
        self.cos_table = freqs.cos().to(self.dtype)
        self.sin_table = freqs.sin().to(self.dtype)

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for each token: [num_tokens, 1, head_dim / 2] (broadcast over heads)."""
        return self.cos_table[positions].unsqueeze(1), self.sin_table[positions].unsqueeze(1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [num_tokens, heads, head_dim]: halves (x1, x2) -> (x1 c - x2 s, x2 c + x1 s),
    the same arithmetic as transformers' `x * cos + rotate_half(x) * sin`."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class DecoderLayer(nn.Module):
    def __init__(self, arch: ArchConfig, spec: TensorSpec) -> None:
        super().__init__()
        hidden, d = arch.hidden_size, arch.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = arch.num_heads, arch.num_kv_heads, d
        self.q_size, self.kv_size = arch.num_heads * d, arch.num_kv_heads * d
        self.input_layernorm = RMSNorm(hidden, arch.rms_norm_eps, spec)
        self.qkv_proj = Linear(hidden, self.q_size + 2 * self.kv_size, arch.attention_bias, spec)
        self.o_proj = Linear(self.q_size, hidden, arch.o_proj_bias, spec)
        self.post_attention_layernorm = RMSNorm(hidden, arch.rms_norm_eps, spec)
        self.gate_up_proj = Linear(hidden, 2 * arch.intermediate_size, False, spec)
        self.down_proj = Linear(arch.intermediate_size, hidden, False, spec)

    def forward(
        self,
        x: torch.Tensor,  # [num_tokens, hidden]
        cos: torch.Tensor,
        sin: torch.Tensor,
        meta: AttentionMetadata,
        kv_cache: torch.Tensor,
    ) -> torch.Tensor:
        n = x.shape[0]
        qkv = self.qkv_proj(self.input_layernorm(x))
        # q and k are adjacent columns: rotate both with one set of ops.
        qk = apply_rope(qkv[:, : self.q_size + self.kv_size].view(n, -1, self.head_dim), cos, sin)
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        v = qkv[:, self.q_size + self.kv_size :].view(n, self.num_kv_heads, self.head_dim)
        attn = paged_attention(q, k, v, kv_cache, meta)
        x = x + self.o_proj(attn.view(n, self.q_size))
        gate, up = self.gate_up_proj(self.post_attention_layernorm(x)).chunk(2, dim=-1)
        return x + self.down_proj(F.silu(gate) * up)


class LlamaForCausalLM(nn.Module):
    """`forward(input_ids [T], positions [T], meta, kv_caches) -> hidden [T, hidden]`;
    `compute_logits(hidden [N, hidden]) -> [N, vocab] float32`."""

    def __init__(
        self, arch: ArchConfig, max_positions: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__()
        self.arch = arch
        spec = TensorSpec(dtype, device)
        self.embed_tokens = _param(spec, arch.vocab_size, arch.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(arch, spec) for _ in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, spec)
        self.rotary = RotaryEmbedding(arch, max_positions, dtype, device)
        self.lm_head: Linear | None = None  # None: logits use the embedding matrix (tied)
        if not arch.tie_word_embeddings:
            self.lm_head = Linear(arch.hidden_size, arch.vocab_size, False, spec)
        self.requires_grad_(False)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_caches: list[torch.Tensor],
    ) -> torch.Tensor:
        x = F.embedding(input_ids, self.embed_tokens)
        cos, sin = self.rotary.lookup(positions)
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            x = layer(x, cos, sin, meta, kv_cache)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.embed_tokens if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight).float()
