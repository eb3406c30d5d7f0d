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
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shoal import native
from shoal.model.arch import ArchConfig
from shoal.model.attention import AttentionMetadata, _native_decode_kernels, paged_attention


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


# Int8 linears run on shoal's native kernel (shoal/native/kernels.cpp, `int8_linear`): AVX2's
# vpmaddubsw multiplies uint8 activations by int8 weights and sums pairs in int16 with
# saturation, so |2 x 255 x w| must stay below 32768: weights get 7 bits (-63..63),
# activations the full 8 (-127..127 per row, stored with +128).
_W_QMAX = 63
# Input channels per Linear kept in float32 instead of setting the row's activation scale:
# the largest 1/32 of them by calibrated max |x| (norm gains and a few residual dimensions
# make some channels 10-100x larger than the rest, which would flatten the others' 8 bits).
_OUTLIER_FRACTION = 32
_CALIBRATION_TOKENS, _CALIBRATION_SEED = 128, 0
_LAYER_LINEARS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def _native_kernels(quantization: str = "int8") -> Any:
    """The native kernels a quantized Linear needs; ValueError naming the flag if missing."""
    kernels = native.load()
    if kernels is None:
        raise ValueError(
            f"--quantization {quantization} needs shoal's native CPU kernels, unavailable "
            f"here: {native.unavailable_reason()}"
        )
    return kernels


def _native_lm_head_kernels() -> Any:
    """The native kernels for the greedy LM head, or None (unavailable, or turned off)."""
    global _native_lm_head
    if _native_lm_head is False:
        from shoal import envs

        _native_lm_head = native.load() if envs.refresh().native_lm_head else None
    return _native_lm_head


_native_lm_head: Any = False  # not looked up yet


def _pack_lm_head_bf16(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[V, K] float32 -> the native `lm_head_argmax_bf16`'s copies: the bf16 panels
    [ceil(V / 16), ceil(K / 2), 16] int32, each the bf16 (round to nearest even) weights of
    inputs 2k (low half) and 2k + 1 of one vocabulary row, and the panels' row norms
    [ceil(V / 16), 2, 16] float32: ||w~_v|| and ||w~_v - w_v|| (w~ the bf16 row), zero-padded."""
    vocab, hidden = weight.shape
    panels, pairs = -(-vocab // 16), -(-hidden // 2)
    buf = torch.zeros(panels * 16, pairs * 2, dtype=torch.bfloat16)
    rounded = weight.to(torch.bfloat16)
    buf[:vocab, :hidden] = rounded
    bf16 = buf.view(panels, 16, pairs, 2).transpose(1, 2).contiguous().view(torch.int32)
    norms = torch.zeros(2, panels * 16, dtype=torch.float64)
    r = rounded.double()
    norms[0, :vocab] = r.norm(dim=1)
    norms[1, :vocab] = (r - weight.double()).norm(dim=1)
    return bf16.squeeze(-1), norms.float().view(2, panels, 16).transpose(0, 1).contiguous()


def _native_elementwise(x: torch.Tensor) -> Any:
    """The native kernels for RMSNorm and SiLU * up on float32 CPU tensors, else None.

    `decode_layers` always uses them, so the Python layers must too whenever the kernels
    exist: a token then gets the same bits whether its step ran natively or here (a prefill,
    a mixed step, native attention turned off), and batch invariance holds across them."""
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return None
    return native.load()  # tried once per process, then cached


def _quantize_columns(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """7-bit rows of `w` ([N, k], k may be 0) in the kernel's packed layout, the scale per
    row (max |row| / 63) and the int32 sum of each quantized row.

    Packed: [ceil(N / 8), k4 / 4, 8, 4] with k4 = k rounded up to a multiple of 4 (at least
    4), zero padded: element [p, g, c, b] is row 8 p + c, column 4 g + b, so one 32-byte load
    of the kernel holds 4 consecutive input channels of 8 output channels."""
    n, k = w.shape
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / _W_QMAX if k else w.new_ones(n)
    q = torch.round(w / scale[:, None]).clamp_(-_W_QMAX, _W_QMAX).to(torch.int8)
    n8, k4 = -(-n // 8) * 8, max(4, -(-k // 4) * 4)
    padded = torch.zeros(n8, k4, dtype=torch.int8)
    padded[:n, :k] = q
    packed = padded.view(n8 // 8, 8, k4 // 4, 4).transpose(1, 2).contiguous()
    return packed, scale.float(), q.sum(dim=1, dtype=torch.int32)


class Int8Linear(nn.Module):
    """y = x W^T (+ b) with int8 weights and per-row (per-token) int8 activations, float32 in
    and out, on the native `int8_linear` kernel (CPU, AVX2).

    Weights: 7 bits per output channel (scale = max |row| / 63, see `_W_QMAX`) over the main
    input channels, packed for the kernel (see `_quantize_columns`). Activations: each row's
    main channels are quantized with scale max |x| / 127 inside the kernel; the int32 sums are
    exact and the float epilogue runs in a fixed order, so a row's result depends on that row alone:
    batching never changes it. A few `outliers` input channels (chosen at load by calibration,
    fixed afterwards) stay out of the quantization: they are added in float32 with their
    float32 weight columns, so the largest channels do not set the others' resolution."""

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, outliers: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        self._kernels = _native_kernels()
        w = weight.detach().float().cpu()
        self.out_features, self.in_features = w.shape
        is_outlier = torch.zeros(self.in_features, dtype=torch.bool)
        if outliers is not None:
            is_outlier[outliers] = True
        main_idx = (~is_outlier).nonzero()[:, 0]
        outlier_idx = is_outlier.nonzero()[:, 0]
        qweight, scale, colsum = _quantize_columns(w[:, main_idx])
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = self._kernels.int8_linear(
            x.reshape(-1, self.in_features).contiguous(), self.qweight, self.w_scale,
            self.w_colsum, self.main_idx, self.outlier_idx, self.outlier_w, self.bias,
        )  # fmt: skip
        return y.view(*lead, self.out_features)


@torch.inference_mode()
def _calibrate(model: LlamaForCausalLM) -> dict[nn.Module, torch.Tensor]:
    """Max |input| per channel of every Linear and of the LM head (the final norm's output)
    over one float32 forward of `_CALIBRATION_TOKENS` random token ids (fixed seed). The
    large channels of these activations come from the weights (norm gains, a few residual
    dimensions), not from the text: random ids find most of them."""
    from shoal.model.attention import build_attention_metadata

    arch, n, block_size = model.arch, _CALIBRATION_TOKENS, 16
    g = torch.Generator().manual_seed(_CALIBRATION_SEED)
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

    modules = [m for layer in model.layers for m in _layer_linears(layer)] + [model.norm]
    hooks = [m.register_forward_hook(record) for m in modules]
    try:
        model(ids, torch.arange(n), meta, kv_caches)
    finally:
        for hook in hooks:
            hook.remove()
    return stats


def _layer_linears(layer: nn.Module) -> list[nn.Module]:
    return [getattr(layer, name) for name in _LAYER_LINEARS]


def _outliers(channel_max: torch.Tensor) -> torch.Tensor:
    return channel_max.topk(max(1, channel_max.numel() // _OUTLIER_FRACTION)).indices.sort()[0]


def quantize_int8(model: LlamaForCausalLM) -> None:
    """Replace every Linear of the layers and the LM head with an `Int8Linear` (outlier
    channels from `_calibrate`), dropping the float32 copies. A tied LM head gets its own
    int8 copy; the embedding lookup stays float32."""
    stats = _calibrate(model)
    for layer in model.layers:
        for name in _LAYER_LINEARS:
            linear = getattr(layer, name)
            setattr(layer, name, Int8Linear(linear.weight, linear.bias, _outliers(stats[linear])))
    head = model.lm_head.weight if isinstance(model.lm_head, Linear) else model.embed_tokens
    model.lm_head = Int8Linear(head, None, _outliers(stats[model.norm]))
    model._fused_list = None  # the fused decode path's parameter list is stale


def _int8_greedy_token_ids(head: Int8Linear, hidden: torch.Tensor) -> list[int] | None:
    """`head(hidden).argmax(-1).tolist()` without the logits (see `greedy_token_ids`), or
    None: not float32 on CPU, or the native LM head turned off."""
    if hidden.device.type != "cpu" or hidden.dtype != torch.float32:
        return None
    kernels = _native_lm_head_kernels()
    if kernels is None:
        return None
    ids, _ = kernels.int8_linear_argmax(
        hidden.reshape(-1, head.in_features).contiguous(), head.qweight, head.w_scale,
        head.w_colsum, head.main_idx, head.outlier_idx, head.outlier_w, head.bias,
    )  # fmt: skip
    return ids.tolist()


class RMSNorm(nn.Module):
    """x / rms(x) * weight, the variance computed in float32 (as transformers does)."""

    def __init__(self, size: int, eps: float, spec: TensorSpec) -> None:
        super().__init__()
        self.weight = _param(spec, size)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            kernels = _native_elementwise(x)
            if kernels is not None:
                return kernels.rms_norm(x, self.weight, self.eps)
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
        n, d = x.shape[0], self.head_dim
        qkv = self.qkv_proj(self.input_layernorm(x))
        kernels = _native_elementwise(qkv)
        if kernels is not None:  # float32 on CPU: the cache is float32 or float16
            # RoPE in place and k, v into the cache in one native pass (same bits as below).
            qkv = qkv.contiguous()
            kernels.rope_and_cache(
                qkv, cos, sin, kv_cache, meta.slot_mapping, self.num_heads, self.num_kv_heads, d
            )
            q = qkv[:, : self.q_size].view(n, self.num_heads, d)
            k = qkv[:, self.q_size : self.q_size + self.kv_size].view(n, self.num_kv_heads, d)
            v = qkv[:, self.q_size + self.kv_size :].view(n, self.num_kv_heads, d)
            attn = paged_attention(q, k, v, kv_cache, meta, kv_written=True)
        else:
            # q and k are adjacent columns: rotate both with one set of ops.
            qk = apply_rope(qkv[:, : self.q_size + self.kv_size].view(n, -1, d), cos, sin)
            q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
            v = qkv[:, self.q_size + self.kv_size :].view(n, self.num_kv_heads, d)
            attn = paged_attention(q, k, v, kv_cache, meta)
        x = x + self.o_proj(attn.view(n, self.q_size))
        gate_up = self.gate_up_proj(self.post_attention_layernorm(x))
        kernels = _native_elementwise(gate_up)
        if kernels is not None:
            return x + self.down_proj(kernels.silu_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
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
        # None: logits use the embedding matrix (tied); an Int8Linear after quantize_int8.
        self.lm_head: Linear | Int8Linear | None = None
        if not arch.tie_word_embeddings:
            self.lm_head = Linear(arch.hidden_size, arch.vocab_size, False, spec)
        self._fused_list: list[torch.Tensor] | None = None  # see _fused_params
        # (weight, its version, its packed copy, its bf16 copies or None) for
        # greedy_token_ids; see there.
        self._packed_head: (
            tuple[torch.Tensor, int, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None] | None
        ) = None
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
        kernels = self._fused_decode_kernels(x, meta)
        if kernels is not None:
            x = kernels.decode_layers(
                x, cos, sin, self._fused_params(), kv_caches, meta.slot_mapping,
                meta.decode_block_table, meta.decode_seq_lens, self.arch.num_heads,
                self.arch.num_kv_heads, self.arch.head_dim, self.arch.rms_norm_eps,
                meta.sliding_window or 0,
            )  # fmt: skip
            return self.norm(x)
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            x = layer(x, cos, sin, meta, kv_cache)
        return self.norm(x)

    def _fused_decode_kernels(self, x: torch.Tensor, meta: AttentionMetadata) -> Any:
        """The native kernels when this step can run every layer in one native call: only
        decode tokens, float32 on CPU, native decode attention on (`decode_layers` runs the
        same ops as `DecoderLayer.forward`, bit for bit, minus Python's per-op overhead)."""
        if meta.prefills or meta.num_decodes != x.shape[0] or x.dtype != torch.float32:
            return None
        return _native_decode_kernels(x, self.embed_tokens)

    def _fused_params(self) -> list[torch.Tensor]:
        """Every layer's parameters in `decode_layers`' slot order (kLayerSlots per layer:
        the two norm weights, then 7 slots per Linear, in qkv, o, gate_up, down order; a
        Linear with a `fused_slots` method lists its own). Built once; the list holds the
        tensors themselves, so in-place weight updates show through. Whatever replaces a
        Linear (`quantize_int8`, `quantize_gguf`) sets `_fused_list = None`."""
        if self._fused_list is None:
            none = torch.empty(0)
            params: list[Any] = []
            layer: Any
            for layer in self.layers:
                params += [layer.input_layernorm.weight, layer.post_attention_layernorm.weight]
                for name in _LAYER_LINEARS:
                    m = getattr(layer, name)
                    bias = none if m.bias is None else m.bias
                    if hasattr(m, "fused_slots"):  # gguf_quant.Q4Linear
                        params += m.fused_slots(none)
                    elif isinstance(m, Int8Linear):
                        params += [m.qweight, m.w_scale, m.w_colsum, m.main_idx]
                        params += [m.outlier_idx, m.outlier_w, bias]
                    else:
                        params += [m.weight, bias] + [none] * 5
            self._fused_list = params
        return self._fused_list

    def greedy_token_ids(self, hidden: torch.Tensor) -> list[int] | None:
        """`compute_logits(hidden).argmax(-1).tolist()` without the logits, or None when the
        native greedy LM head does not apply (not float32 on CPU, a biased float head, no
        native kernels, `SHOAL_NATIVE_LM_HEAD=0`).

        One fused pass: the [N, vocab] logits are never written (for the tiny test model that
        was 70 % of a decode step, for the default model 1.8x faster at 64 rows). Each logit
        is summed over the hidden size in a fixed order, not MKL's, so it can differ from
        `compute_logits` in the last bits: ties closer than that may pick another token.
        An int8 head (`--quantization int8` or `gguf`) runs `int8_linear_argmax`: the same
        logits as `compute_logits`, bit for bit, so the same tokens.
        The packed weight (a copy of the head, [vocab/16, hidden, 16]) is built at the first
        call and again whenever the head's weight changes."""
        head = self.embed_tokens if self.lm_head is None else self.lm_head
        if isinstance(head, Int8Linear):
            return _int8_greedy_token_ids(head, hidden)
        weight = head if isinstance(head, torch.Tensor) else getattr(head, "weight", None)
        if (
            hidden.device.type != "cpu"
            or hidden.dtype != torch.float32
            or not isinstance(weight, torch.Tensor)
            or weight.dtype != torch.float32
            or getattr(head, "bias", None) is not None
        ):
            return None
        kernels = _native_lm_head_kernels()
        if kernels is None:
            return None
        cached = self._packed_head
        if cached is None or cached[0] is not weight or cached[1] != weight._version:
            bf16 = _pack_lm_head_bf16(weight) if kernels.bf16 else None
            panels = kernels.pack_lm_head(weight)
            self._packed_head = cached = (weight, weight._version, panels, bf16)
        if cached[3] is not None:
            ids, _ = kernels.lm_head_argmax_bf16(hidden, *cached[3], cached[2], weight.shape[0])
        else:
            ids, _ = kernels.lm_head_argmax(hidden, cached[2], weight.shape[0])
        return ids.tolist()

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:
            return F.linear(hidden, self.embed_tokens).float()
        return self.lm_head(hidden).float()
