"""Applying a grammar's token bitmask to logits (torch only; any device)."""

from __future__ import annotations

import sys

import torch

# The bitmask's int32 words are read as bytes: byte k of word w holds tokens 32 w + 8 k + j.
assert sys.byteorder == "little", "the bitmask is unpacked as little-endian bytes"


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """Set to -inf every logit of `logits[rows[i]]` that `bitmask[i]` forbids (in place).

    `bitmask`: [len(rows), ceil(vocab / 32)] int32, bit j of word w set = token 32 w + j
    allowed (xgrammar's layout). Unpacked by bytes with torch ops: at 64 rows of a 49k
    vocabulary this took 0.6x the time of xgrammar's own CPU kernel here
    (benchmarks/structured_outputs.py measures the whole path)."""
    num_rows, vocab = len(rows), logits.shape[1]
    shifts = torch.arange(8, dtype=torch.uint8, device=logits.device)
    packed = bitmask.to(logits.device).contiguous().view(torch.uint8)  # [rows, 4 * words]
    forbidden = ((packed.unsqueeze(-1) >> shifts) & 1).view(num_rows, -1)[:, :vocab] == 0
    if rows == list(range(logits.shape[0])):
        logits.masked_fill_(forbidden, float("-inf"))
        return
    sub = logits[rows]
    sub.masked_fill_(forbidden, float("-inf"))
    logits[rows] = sub
