"""`--quantization gguf`: a GGUF file's 4-bit Linear weights kept as 4-bit blocks (`Q4Linear`).

The loader hands over each Linear's raw GGUF blocks (Q4_1, or Q4_0 rewritten as Q4_1);
`Q4Linear` repacks them once for the native `q4_linear` kernel (shoal/native/q4.cpp), which
multiplies them by per-block int8 activations. Linears in any other block type (Q8_0, K-quants,
float) take the int8 path (`Int8Linear` on their dequantized weight, shoal/model/int8.py), and
so does the LM head (the default model's is the tied Q8_0 embedding: 8.5 bits per weight in
the file, int8 is 8).
"""

from __future__ import annotations

import numpy as np
import torch
from gguf.constants import GGMLQuantizationType
from torch import nn

from shoal.model.int8 import quantize_linears
from shoal.model.llama import Linear, LlamaForCausalLM
from shoal.model.ops import ModelOps, Q4Weights, model_ops

Q = GGMLQuantizationType
BLOCK = 32  # input channels per GGUF block
Q4_1_BYTES = 20  # float16 d, float16 m, 16 bytes of nibbles
RECORD_BYTES = 160  # one packed (8-channel panel, block) record, see pack_q4
# Block types a Q4Linear takes (others fall back to Int8Linear).
Q4_TYPES = (Q.Q4_0, Q.Q4_1)


def as_q4_1_blocks(raw: torch.Tensor, qtype: GGMLQuantizationType) -> torch.Tensor:
    """GGUF rows of Q4_0 or Q4_1 blocks ([rows, bytes] uint8) as Q4_1 blocks, [rows, K / 32,
    20]: Q4_0's w = d (q - 8) is Q4_1's d q + m with m = -8 d (exact in float16)."""
    rows = raw.shape[0]
    if qtype == Q.Q4_1:
        return raw.reshape(rows, -1, Q4_1_BYTES)
    if qtype != Q.Q4_0:
        raise ValueError(f"not a 4-bit block type: {qtype.name}")
    blocks = raw.reshape(rows, -1, 18)  # float16 d, 16 bytes of nibbles
    d = blocks[..., :2]
    m = (d.contiguous().view(torch.float16) * -8).view(torch.uint8)
    return torch.cat((d, m, blocks[..., 2:]), dim=-1)


def pack_q4(blocks: torch.Tensor) -> torch.Tensor:
    """Q4_1 blocks [N, KB, 20] in the kernel's layout, [ceil(N / 8), KB, 160] uint8: per
    panel of 8 output channels c and block b one record of d[8] and m[8] (float16) and 128
    bytes of nibbles in 4 groups g of 32 bytes, byte 4 c + j of group g holding q[c, 8 g + j]
    (low nibble) and q[c, 8 g + 4 + j] (high nibble). Channels past N are zero.

    GGUF's 16 nibble bytes hold a block's values 0-15 in their low nibbles and 16-31 in their
    high ones, so group g comes from the low (g < 2) or high (g >= 2) nibbles of bytes
    8 (g % 2) .. 8 (g % 2) + 7. numpy, not torch: torch's uint8 ops over these small inner
    dimensions took ~10 s for the default model, numpy well under one."""
    n, kb, _ = blocks.shape
    p = -(-n // 8)
    src = np.zeros((p * 8, kb, Q4_1_BYTES), np.uint8)
    src[:n] = blocks.numpy()
    out = np.empty((p, kb, RECORD_BYTES), np.uint8)
    for start in (0, 2):  # d, then m: [p, c, b, 2 bytes] -> [p, b, c, 2 bytes]
        scale = src[..., start : start + 2].reshape(p, 8, kb, 2).transpose(0, 2, 1, 3)
        out[..., 8 * start : 8 * start + 16] = scale.reshape(p, kb, 16)
    qs = src[..., 4:].reshape(p, 8, kb, 2, 2, 4)  # [p, c, b, h, half, j]: byte 8 h + 4 half + j
    nibbles = np.empty((p, kb, 4, 8, 4), np.uint8)  # [p, b, g, c, j]
    for g0, values in ((0, qs & 0x0F), (2, qs >> 4)):
        pairs = values[..., 0, :] | (values[..., 1, :] << 4)  # [p, c, b, h, j]
        nibbles[:, :, g0 : g0 + 2] = pairs.transpose(0, 2, 3, 1, 4)
    out[..., 32:] = nibbles.reshape(p, kb, 128)
    return torch.from_numpy(out)


class Q4Linear(nn.Module):
    """y = x W^T (+ b) with W kept as GGUF 4-bit blocks, float32 in and out, on the native
    `q4_linear` kernel (`ModelOps.q4_linear`; CPU, AVX2 + F16C).

    W's blocks of 32 input channels: w = d q + m (q in 0..15, d and m float16: Q4_1; Q4_0
    blocks are rewritten as such). Activations: each row is quantized per 32-channel block
    inside the kernel (scale max |x| / 127), so a row's result depends on that row alone;
    the integer block sums are exact and the float epilogue runs in a fixed order.
    ValueError naming the flag where the native kernels are unavailable."""

    packed: torch.Tensor  # [ceil(N / 8), K / 32, 160] uint8, see pack_q4

    def __init__(
        self,
        raw: torch.Tensor,
        qtype: GGMLQuantizationType,
        in_features: int,
        bias: torch.Tensor | None,
        ops: ModelOps | None = None,
    ) -> None:
        super().__init__()
        self.ops = model_ops() if ops is None else ops
        self.ops.require_native("--quantization gguf")
        if in_features % BLOCK:
            raise ValueError(f"Q4Linear: in_features {in_features} is not a multiple of 32")
        blocks = as_q4_1_blocks(raw, qtype)
        if blocks.shape[1] * BLOCK != in_features:
            raise ValueError(f"Q4Linear: blocks hold {blocks.shape[1] * BLOCK} inputs, not "
                             f"{in_features}")  # fmt: skip
        self.out_features, self.in_features = blocks.shape[0], in_features
        self.register_buffer("packed", pack_q4(blocks))
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), False)

    def weights(self) -> Q4Weights:
        """The kernel's operands (read each time: moving the weights rebinds the buffers)."""
        return Q4Weights(self.packed, self.out_features, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = self.ops.q4_linear(x.reshape(-1, self.in_features).contiguous(), self.weights())
        return y.view(*lead, self.out_features)

    def dequantized_weight(self) -> torch.Tensor:
        """W as float32 [N, K], d q + m per element (what the GGUF dequantizer gives)."""
        p, kb, _ = self.packed.shape
        rec = self.packed
        d = rec[..., :16].contiguous().view(torch.float16).float()  # [p, kb, 8]
        m = rec[..., 16:32].contiguous().view(torch.float16).float()
        nib = rec[..., 32:].reshape(p, kb, 4, 8, 4)  # [p, b, g, c, j]
        q = torch.stack((nib & 0x0F, nib >> 4), dim=-2)  # [p, b, g, c, half, j]
        q = q.permute(0, 3, 1, 2, 4, 5).reshape(p, 8, kb, BLOCK).float()
        w = d.transpose(1, 2)[..., None] * q + m.transpose(1, 2)[..., None]
        return w.reshape(p * 8, kb * BLOCK)[: self.out_features]


def quantize_gguf(model: LlamaForCausalLM, blocks: dict[tuple[int, str], torch.Tensor]) -> None:
    """Replace every Linear of the layers with a `Q4Linear` over its GGUF blocks
    (`blocks[(layer index, linear name)]`: Q4_1 blocks [N, K / 32, 20]), or with an
    `Int8Linear` of its (dequantized) float32 weight where there are none; the LM head
    becomes an `Int8Linear` as in `quantize_int8`. Drops the float32 copies."""

    def q4_linear(i: int, name: str, linear: Linear) -> nn.Module | None:
        raw = blocks.get((i, name))
        if raw is None:
            return None
        return Q4Linear(raw, Q.Q4_1, linear.weight.shape[1], linear.bias, model.ops)

    quantize_linears(model, q4_linear)


def q4_1_rows(raw: np.ndarray, qtype: GGMLQuantizationType) -> torch.Tensor | None:
    """A GGUF weight's raw bytes ([rows, bytes] uint8) as Q4_1 blocks [rows, K / 32, 20], or
    None when its block type is not 4-bit (Q4_0 / Q4_1)."""
    if qtype not in Q4_TYPES:
        return None
    return as_q4_1_blocks(torch.from_numpy(np.array(raw, dtype=np.uint8)), qtype)
