"""GGUF tensor dequantisation: torch kernels for the common block types, gguf-py for the rest.

The torch versions do the same float32 arithmetic as `gguf.quants.dequantize` (bit-identical
results) but run vectorised over whole tensors on all torch threads, which makes loading the
default Q4_1 model several times faster.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf.constants import GGMLQuantizationType

Q = GGMLQuantizationType


def dequantize(
    raw: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...]
) -> torch.Tensor:
    """float32 tensor of `shape` from one GGUF tensor's `GGUFFile.raw()`: a float array
    (F32 / F16) or whole quant blocks as bytes (every other type, BF16 included)."""
    if raw.dtype != np.uint8:
        return torch.from_numpy(np.array(raw, dtype=np.float32)).view(shape)
    kernel = _KERNELS.get(qtype)
    if kernel is None:
        from gguf.quants import dequantize as gguf_dequantize

        return torch.from_numpy(gguf_dequantize(raw, qtype)).view(shape)
    return kernel(torch.from_numpy(np.array(raw, dtype=np.uint8))).view(shape)


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The float16 at bytes [start, start + 2) of every block, as float32 [num_blocks, 1]."""
    return blocks[:, start : start + 2].contiguous().view(torch.float16).float()


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """[num_blocks, 16] bytes -> [num_blocks, 32] values: low nibbles first, then high."""
    return torch.cat((packed & 0x0F, packed >> 4), dim=1).float()


def _q8_0(data: torch.Tensor) -> torch.Tensor:
    blocks = data.view(-1, 34)  # f16 scale, 32 x int8
    return blocks[:, 2:].contiguous().view(torch.int8).float() * _f16(blocks, 0)


def _q4_0(data: torch.Tensor) -> torch.Tensor:
    blocks = data.view(-1, 18)  # f16 scale, 16 bytes of 4-bit values offset by 8
    return (_nibbles(blocks[:, 2:]) - 8) * _f16(blocks, 0)


def _q4_1(data: torch.Tensor) -> torch.Tensor:
    blocks = data.view(-1, 20)  # f16 scale, f16 minimum, 16 bytes of 4-bit values
    return _f16(blocks, 0) * _nibbles(blocks[:, 4:]) + _f16(blocks, 2)


_KERNELS = {Q.Q8_0: _q8_0, Q.Q4_0: _q4_0, Q.Q4_1: _q4_1}
