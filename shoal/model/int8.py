"""`--quantization int8`: `Int8Linear`, the calibration that picks its float32 outlier
channels, and the conversion of a loaded model (`quantize_int8`; `quantize_linears` and
`calibrate` serve `--quantization gguf` too, shoal/model/gguf_quant.py)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from shoal.model.attention import build_attention_metadata
from shoal.model.llama import LAYER_LINEARS, Linear, LlamaForCausalLM, layer_linears
from shoal.model.ops import Int8Weights, ModelOps, model_ops

# Int8 linears run on shoal's native `int8_linear` kernel. AVX2's vpmaddubsw multiplies
# uint8 activations by int8 weights and sums pairs in int16 with saturation, so
# |2 x 255 x w| must stay below 32768: weights get 7 bits (-63..63), activations the full 8
# (-127..127 per row, stored with +128).
W_QMAX = 63
# Input channels per Linear kept in float32 instead of setting the row's activation scale:
# the largest 1/32 of them by calibrated max |x| (norm gains and a few residual dimensions
# make some channels 10-100x larger than the rest, which would flatten the others' 8 bits).
OUTLIER_FRACTION = 32
CALIBRATION_TOKENS, CALIBRATION_SEED = 128, 0


def quantize_columns(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """7-bit rows of `w` ([N, k], k may be 0) in the kernel's packed layout, the scale per
    row (max |row| / 63) and the int32 sum of each quantized row.

    Packed: [ceil(N / 8), k4 / 4, 8, 4] with k4 = k rounded up to a multiple of 4 (at least
    4), zero padded: element [p, g, c, b] is row 8 p + c, column 4 g + b, so one 32-byte load
    of the kernel holds 4 consecutive input channels of 8 output channels."""
    n, k = w.shape
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / W_QMAX if k else w.new_ones(n)
    q = torch.round(w / scale[:, None]).clamp_(-W_QMAX, W_QMAX).to(torch.int8)
    n8, k4 = -(-n // 8) * 8, max(4, -(-k // 4) * 4)
    padded = torch.zeros(n8, k4, dtype=torch.int8)
    padded[:n, :k] = q
    packed = padded.view(n8 // 8, 8, k4 // 4, 4).transpose(1, 2).contiguous()
    return packed, scale.float(), q.sum(dim=1, dtype=torch.int32)


class Int8Linear(nn.Module):
    """y = x W^T (+ b) with int8 weights and per-row (per-token) int8 activations, float32 in
    and out, on the native `int8_linear` kernel (`ModelOps.int8_linear`; CPU, AVX2).

    Weights: 7 bits per output channel (scale = max |row| / 63, see `W_QMAX`) over the main
    input channels, packed for the kernel (see `quantize_columns`). Activations: each row's
    main channels are quantized with scale max |x| / 127 inside the kernel; the int32 sums are
    exact and the float epilogue runs in a fixed order, so a row's result depends on that row
    alone: batching never changes it. A few `outliers` input channels (chosen at load by
    calibration, fixed afterwards) stay out of the quantization: they are added in float32
    with their float32 weight columns, so the largest channels do not set the others'
    resolution. ValueError naming the flag where the native kernels are unavailable."""

    qweight: torch.Tensor
    w_scale: torch.Tensor
    w_colsum: torch.Tensor
    main_idx: torch.Tensor
    outlier_idx: torch.Tensor
    outlier_w: torch.Tensor

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        outliers: torch.Tensor | None = None,
        ops: ModelOps | None = None,
    ) -> None:
        super().__init__()
        self.ops = model_ops() if ops is None else ops
        self.ops.require_native("--quantization int8")
        w = weight.detach().float().cpu()
        self.out_features, self.in_features = w.shape
        is_outlier = torch.zeros(self.in_features, dtype=torch.bool)
        if outliers is not None:
            is_outlier[outliers] = True
        main_idx = (~is_outlier).nonzero()[:, 0]
        outlier_idx = is_outlier.nonzero()[:, 0]
        qweight, scale, colsum = quantize_columns(w[:, main_idx])
        self.register_buffer("qweight", qweight)
        self.register_buffer("w_scale", scale)
        self.register_buffer("w_colsum", colsum)
        self.register_buffer("main_idx", main_idx.contiguous())
        self.register_buffer("outlier_idx", outlier_idx.contiguous())
        # Blocked by 8 output channels, [ceil(N / 8), num_outliers, 8] (zero-padded): what
        # one 8-lane chunk of the kernel's epilogue reads is contiguous.
        chunks = -(-self.out_features // 8)
        ow = torch.zeros(chunks * 8, outlier_idx.numel())
        ow[: self.out_features] = w[:, outlier_idx]
        self.register_buffer("outlier_w", ow.view(chunks, 8, -1).transpose(1, 2).contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), False)

    def weights(self) -> Int8Weights:
        """The kernel's operands (read each time: moving the weights rebinds the buffers)."""
        return Int8Weights(
            self.qweight, self.w_scale, self.w_colsum, self.main_idx, self.outlier_idx,
            self.outlier_w, self.bias,
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = self.ops.int8_linear(x.reshape(-1, self.in_features).contiguous(), self.weights())
        return y.view(*lead, self.out_features)


@torch.inference_mode()
def calibrate(model: LlamaForCausalLM) -> dict[nn.Module, torch.Tensor]:
    """Max |input| per channel of every layer Linear and of the LM head (the final norm's
    output, keyed by `model.norm`) over one forward of `CALIBRATION_TOKENS` random token ids
    (fixed seed). The large channels of these activations come from the weights (norm gains,
    a few residual dimensions), not from the text: random ids find most of them."""
    arch, n, block_size = model.arch, CALIBRATION_TOKENS, 16
    g = torch.Generator().manual_seed(CALIBRATION_SEED)
    ids = torch.randint(0, arch.vocab_size, (n,), generator=g)
    num_blocks = -(-n // block_size)
    shape = (2, num_blocks, block_size, arch.num_kv_heads, arch.head_dim)
    dtype = model.embed_tokens.dtype
    kv_caches = [torch.zeros(shape, dtype=dtype) for _ in range(arch.num_layers)]
    meta = build_attention_metadata(
        torch.arange(n),
        np.array([n]),
        np.array([0]),
        torch.arange(num_blocks).unsqueeze(0),
        torch.tensor([n]),
        block_size,
        arch.sliding_window,
    )
    stats: dict[nn.Module, torch.Tensor] = {}

    def record(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        x = output if module is model.norm else inputs[0]
        stats[module] = x.abs().amax(dim=0)

    modules = [m for layer in model.layers for m in layer_linears(layer)] + [model.norm]
    hooks = [m.register_forward_hook(record) for m in modules]
    try:
        model(ids, torch.arange(n), meta, kv_caches)
    finally:
        for hook in hooks:
            hook.remove()
    return stats


def outlier_channels(channel_max: torch.Tensor) -> torch.Tensor:
    """The input channels an `Int8Linear` keeps in float32: the largest 1/`OUTLIER_FRACTION`
    (at least one) by calibrated max |x|, in ascending order."""
    return channel_max.topk(max(1, channel_max.numel() // OUTLIER_FRACTION)).indices.sort()[0]


# A layer Linear's replacement other than int8 ((layer index, name, the Linear) -> a module,
# or None for the int8 default).
LinearReplacement = Callable[[int, str, Linear], nn.Module | None]


def quantize_linears(model: LlamaForCausalLM, replace: LinearReplacement | None = None) -> None:
    """Replace every Linear of the layers with `replace(i, name, linear)` or, where that gives
    None (or there is no `replace`), an `Int8Linear` with calibrated outlier channels; and the
    LM head with an `Int8Linear` (a tied head gets its own int8 copy; the embedding lookup
    stays float32). The float32 copies are dropped."""
    stats = calibrate(model)
    for i, layer in enumerate(model.layers):
        for name in LAYER_LINEARS:
            linear = getattr(layer, name)
            new = None if replace is None else replace(i, name, linear)
            if new is None:
                outliers = outlier_channels(stats[linear])
                new = Int8Linear(linear.weight, linear.bias, outliers, model.ops)
            setattr(layer, name, new)
    head = model.lm_head.weight if isinstance(model.lm_head, Linear) else model.embed_tokens
    model.lm_head = Int8Linear(head, None, outlier_channels(stats[model.norm]), model.ops)


def quantize_int8(model: LlamaForCausalLM) -> None:
    """`--quantization int8`: every Linear of the layers and the LM head as an `Int8Linear`."""
    quantize_linears(model)
