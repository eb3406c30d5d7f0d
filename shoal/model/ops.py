"""`ModelOps`: every operation of the model that shoal's native kernels can run, in one typed
table chosen once per process (`model_ops()`).

Two implementations:
- `ModelOps` itself runs torch ops, on any device and dtype (the reference the kernels are
  tested against).
- `NativeOps` runs shoal's CPU kernels (`shoal.native`) wherever an op's inputs are float32
  on CPU, and the torch op otherwise.

`model_ops()` picks `NativeOps` when `shoal.native.load()` gives a module, else `ModelOps`.
Within `NativeOps`, SHOAL_NATIVE_ATTENTION=0 turns native decode attention (and with it the
fused decode path) off and SHOAL_NATIVE_LM_HEAD=0 the greedy LM head; the elementwise ops
stay native whenever the kernels exist, because `decode_layers` uses them: a token then gets
the same bits whether its step ran fused or through the Python layers (a prefill, a mixed
step, native attention off), and batch invariance holds across both.

The quantized linears (`--quantization int8`, `gguf`) exist only natively: `require_native`
refuses them, naming the flag, where the kernels are unavailable.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from shoal import envs, native
from shoal.model.attention import AttentionMetadata, torch_decode_attention, write_kv
from shoal.model.rotary import apply_rope
from shoal.native.api import NativeKernels

# KV cache dtypes the native attention kernels read and write.
_NATIVE_CACHE_DTYPES = (torch.float32, torch.float16)


class Int8Weights(NamedTuple):
    """An int8 Linear's operands in `int8_linear`'s argument order (shoal/model/int8.py)."""

    qweight: torch.Tensor  # [ceil(N / 8), K4 / 4, 8, 4] int8, see int8.quantize_columns
    w_scale: torch.Tensor  # [N] float32: each output channel's weight scale
    w_colsum: torch.Tensor  # [N] int32: each quantized weight row's sum
    main_idx: torch.Tensor  # [K - num_outliers] int64: the quantized input channels
    outlier_idx: torch.Tensor  # [num_outliers] int64: the input channels kept in float32
    outlier_w: torch.Tensor  # [ceil(N / 8), num_outliers, 8] float32: their weights
    bias: torch.Tensor | None  # [N] float32


class Q4Weights(NamedTuple):
    """A 4-bit Linear's operands for `q4_linear` (shoal/model/gguf_quant.py)."""

    packed: torch.Tensor  # [ceil(N / 8), K / 32, 160] uint8, see gguf_quant.pack_q4
    out_features: int  # N (the packed panels round it up to 8)
    bias: torch.Tensor | None  # [N] float32


class PackedLmHead(NamedTuple):
    """A float32 LM head weight [V, K] in the greedy kernels' layouts (`pack_lm_head`)."""

    panels: torch.Tensor  # [ceil(V / 16), K, 16] float32
    # pack_lm_head_bf16's copies, where the kernels filter with AVX512_BF16; else None.
    bf16: tuple[torch.Tensor, torch.Tensor] | None
    vocab: int  # V


class ModelOps:
    """The model's ops on torch: any device, any dtype. `NativeOps` overrides each where
    its kernel applies."""

    name = "torch"

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """x / rms(x) * weight over the last dimension, the variance computed in float32 (as
        transformers does)."""
        if x.dtype == torch.float32:
            return F.rms_norm(x, weight.shape, weight, eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return weight * xf.to(x.dtype)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """[.., 2 I] (gate | up) -> [.., I] silu(gate) * up."""
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def rope_and_cache(
        self,
        qkv: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: torch.Tensor,
        slots: torch.Tensor,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """RoPE on the q and k heads of `qkv` [num_tokens, (num_heads + 2 num_kv_heads)
        head_dim] (cos, sin: [num_tokens, 1, head_dim / 2]), then k and v into the cache at
        `slots`. Returns q [num_tokens, num_heads, head_dim] and k, v [num_tokens,
        num_kv_heads, head_dim] (k rotated)."""
        n, q_size = qkv.shape[0], num_heads * head_dim
        kv_end = q_size + num_kv_heads * head_dim
        # q and k are adjacent columns: rotate both with one set of ops.
        qk = apply_rope(qkv[:, :kv_end].view(n, -1, head_dim), cos, sin)
        q, k = qk.split([num_heads, num_kv_heads], dim=1)
        v = qkv[:, kv_end:].view(n, num_kv_heads, head_dim)
        write_kv(kv_cache, k, v, slots)
        return q, k, v

    def decode_attention(
        self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """Attention of the decode tokens q [num_decodes, num_heads, head_dim] over their
        requests' cached keys (this step's included)."""
        return torch_decode_attention(q, kv_cache, meta)

    def require_native(self, flag: str) -> None:
        """ValueError naming `flag` (e.g. "--quantization int8"): it needs the kernels."""
        raise ValueError(
            f"{flag} needs shoal's native CPU kernels, unavailable here: "
            f"{native.unavailable_reason()}"
        )

    def int8_linear(self, x: torch.Tensor, w: Int8Weights) -> torch.Tensor:
        """[M, K] float32 -> [M, N]: see `Int8Linear` (native only: `require_native`)."""
        raise NotImplementedError("int8 linears run on shoal's native kernels only")

    def q4_linear(self, x: torch.Tensor, w: Q4Weights) -> torch.Tensor:
        """[M, K] float32 -> [M, N]: see `Q4Linear` (native only: `require_native`)."""
        raise NotImplementedError("4-bit linears run on shoal's native kernels only")

    def can_run_greedy_head(self, hidden: torch.Tensor) -> bool:
        """Whether the greedy LM head ops (`int8_argmax`, `lm_head_argmax`) take `hidden`."""
        return False

    def int8_argmax(self, hidden: torch.Tensor, w: Int8Weights) -> list[int]:
        """`int8_linear(hidden, w).argmax(-1).tolist()`, bit for bit, without the logits."""
        raise NotImplementedError("the greedy LM head runs on shoal's native kernels only")

    def pack_lm_head(self, weight: torch.Tensor) -> PackedLmHead:
        """A float32 head weight [V, K] in the layouts `lm_head_argmax` reads."""
        raise NotImplementedError("the greedy LM head runs on shoal's native kernels only")

    def lm_head_argmax(self, hidden: torch.Tensor, head: PackedLmHead) -> list[int]:
        """The argmax of hidden W^T per row without the logits. Each logit is summed over
        the hidden size in a fixed order, not MKL's, so it can differ from `F.linear`'s in
        the last bits: ties closer than that may pick another token."""
        raise NotImplementedError("the greedy LM head runs on shoal's native kernels only")

    def fused_decode_kernels(
        self, dtype: torch.dtype, device: torch.device
    ) -> NativeKernels | None:
        """The kernels `decode_layers` runs on for a model of `dtype` on `device`, or None
        (shoal/model/fused_decode.py)."""
        return None


def _is_cpu_float32(x: torch.Tensor) -> bool:
    return x.dtype == torch.float32 and x.device.type == "cpu"


class NativeOps(ModelOps):
    """The model's ops on shoal's kernels where the inputs are float32 on CPU. `attention`:
    native decode attention and the fused decode path (SHOAL_NATIVE_ATTENTION); `lm_head`:
    the greedy LM head (SHOAL_NATIVE_LM_HEAD)."""

    name = "native"

    def __init__(self, kernels: NativeKernels, attention: bool = True, lm_head: bool = True):
        self.kernels = kernels
        self.attention = attention
        self.lm_head = lm_head

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        if _is_cpu_float32(x):
            return self.kernels.rms_norm(x, weight, eps)
        return super().rms_norm(x, weight, eps)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        if _is_cpu_float32(gate_up):
            return self.kernels.silu_mul(gate_up)
        return super().silu_mul(gate_up)

    def rope_and_cache(
        self,
        qkv: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: torch.Tensor,
        slots: torch.Tensor,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not _is_cpu_float32(qkv) or kv_cache.dtype not in _NATIVE_CACHE_DTYPES:
            return super().rope_and_cache(
                qkv, cos, sin, kv_cache, slots, num_heads, num_kv_heads, head_dim
            )
        # In place, one pass: the same bits as apply_rope + write_kv.
        qkv = qkv.contiguous()
        self.kernels.rope_and_cache(
            qkv, cos, sin, kv_cache, slots, num_heads, num_kv_heads, head_dim
        )
        n, q_size = qkv.shape[0], num_heads * head_dim
        kv_end = q_size + num_kv_heads * head_dim
        q = qkv[:, :q_size].view(n, num_heads, head_dim)
        k = qkv[:, q_size:kv_end].view(n, num_kv_heads, head_dim)
        v = qkv[:, kv_end:].view(n, num_kv_heads, head_dim)
        return q, k, v

    def decode_attention(
        self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        if not (self.attention and _is_cpu_float32(q) and kv_cache.dtype in _NATIVE_CACHE_DTYPES):
            return super().decode_attention(q, kv_cache, meta)
        assert meta.decode_block_table is not None and meta.decode_seq_lens is not None
        # Each request's keys and values read in place through its block table.
        return self.kernels.paged_decode_attention(
            q, kv_cache, meta.decode_block_table, meta.decode_seq_lens,
            1.0 / math.sqrt(q.shape[2]), meta.sliding_window or 0,
        )  # fmt: skip

    def require_native(self, flag: str) -> None:
        return None

    def int8_linear(self, x: torch.Tensor, w: Int8Weights) -> torch.Tensor:
        return self.kernels.int8_linear(x, *w)

    def q4_linear(self, x: torch.Tensor, w: Q4Weights) -> torch.Tensor:
        return self.kernels.q4_linear(x, *w)

    def can_run_greedy_head(self, hidden: torch.Tensor) -> bool:
        return self.lm_head and _is_cpu_float32(hidden)

    def int8_argmax(self, hidden: torch.Tensor, w: Int8Weights) -> list[int]:
        ids, _ = self.kernels.int8_linear_argmax(hidden, *w)
        return ids.tolist()

    def pack_lm_head(self, weight: torch.Tensor) -> PackedLmHead:
        bf16 = pack_lm_head_bf16(weight) if self.kernels.bf16 else None
        return PackedLmHead(self.kernels.pack_lm_head(weight), bf16, weight.shape[0])

    def lm_head_argmax(self, hidden: torch.Tensor, head: PackedLmHead) -> list[int]:
        if head.bf16 is not None:
            bf16, norms = head.bf16
            ids, _ = self.kernels.lm_head_argmax_bf16(hidden, bf16, norms, head.panels, head.vocab)
        else:
            ids, _ = self.kernels.lm_head_argmax(hidden, head.panels, head.vocab)
        return ids.tolist()

    def fused_decode_kernels(
        self, dtype: torch.dtype, device: torch.device
    ) -> NativeKernels | None:
        if self.attention and dtype == torch.float32 and device.type == "cpu":
            return self.kernels
        return None


def pack_lm_head_bf16(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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


def select_ops() -> ModelOps:
    """The table the current environment calls for (`native.load()` is tried once per
    process; the switches are read now). `model_ops()` keeps the first one."""
    kernels = native.load()
    if kernels is None:
        return ModelOps()
    env = envs.refresh()
    return NativeOps(kernels, attention=env.native_attention, lm_head=env.native_lm_head)


@functools.cache
def model_ops() -> ModelOps:
    """This process's table, chosen at the first call (an engine's model load) and kept."""
    return select_ops()
