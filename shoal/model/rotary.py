"""Rotary position embeddings: frequencies (with rope scaling), cos/sin tables, the rotation."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from shoal.model.arch import ArchConfig


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


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
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
