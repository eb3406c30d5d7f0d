"""`NativeKernels`: the Python-visible surface of the compiled kernel modules, typed.

`load()` imports one of `shoal.native._kernels_<level>` (pybind11 modules mypy cannot see
into) and hands it out as this Protocol, so every kernel call is checked. The signatures
mirror the C++ bindings (`PYBIND11_MODULE` in the kernel sources) argument for argument;
tests/model/test_native.py compares them with each built module's own signatures. The
arguments are positional-only: the bindings name them arg0, arg1, ...

Shapes use: M rows (tokens), K input features, N output features, V vocabulary rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # annotations only: importing shoal.native must not import torch
    from torch import Tensor


class NativeKernels(Protocol):
    """One compiled level of shoal's CPU kernels. Every function takes float32 CPU tensors
    (raising RuntimeError otherwise) and runs without the GIL."""

    # lm_head_argmax_bf16 filters with AVX512_BF16 (else it runs lm_head_argmax).
    bf16: bool
    # Integer products use AVX-512 VNNI.
    vnni: bool
    # variants.source_hash() of the sources, flags and torch the module was built from.
    source_hash: str
    # The module's own: shoal.native._kernels_<level> and its shared library's path.
    __name__: str
    __file__: str | None

    def int8_linear(
        self,
        x: Tensor,
        w: Tensor,
        w_scale: Tensor,
        w_colsum: Tensor,
        main_idx: Tensor,
        outlier_idx: Tensor,
        outlier_w: Tensor,
        bias: Tensor | None,
        /,
    ) -> Tensor:
        """[M, K] -> [M, N]: x W^T (+ bias) with 7-bit weights in the packed layout of
        `shoal.model.int8.quantize_columns` and per-row 8-bit activations over `main_idx`;
        the `outlier_idx` channels are added in float32 with `outlier_w`."""
        ...

    def int8_linear_argmax(
        self,
        x: Tensor,
        w: Tensor,
        w_scale: Tensor,
        w_colsum: Tensor,
        main_idx: Tensor,
        outlier_idx: Tensor,
        outlier_w: Tensor,
        bias: Tensor | None,
        /,
    ) -> list[Tensor]:
        """[argmax ids [M] int64, max logits [M]] of `int8_linear`'s output, bit for bit,
        without writing it; ties go to the lowest id."""
        ...

    def q4_linear(self, x: Tensor, w: Tensor, n_out: int, bias: Tensor | None, /) -> Tensor:
        """[M, K] -> [M, n_out]: x W^T (+ bias), W as GGUF Q4_1 blocks packed by
        `shoal.model.gguf_quant.pack_q4`, activations quantized per row and 32-channel block."""
        ...

    def paged_decode_attention(
        self,
        q: Tensor,
        kv_cache: Tensor,
        block_table: Tensor,
        seq_lens: Tensor,
        scale: float,
        sliding_window: int,
        /,
    ) -> Tensor:
        """q [num_decodes, num_heads, head_dim] over the float32 or float16 cache
        [2, num_blocks, block_size, num_kv_heads, head_dim] through `block_table`
        [num_decodes, >= blocks] and `seq_lens` [num_decodes]; sliding_window 0 = none."""
        ...

    def rms_norm(self, x: Tensor, weight: Tensor, eps: float, /) -> Tensor:
        """x / rms(x) * weight over the last dimension."""
        ...

    def silu_mul(self, gate_up: Tensor, /) -> Tensor:
        """[.., 2 I] (gate | up) -> [.., I] silu(gate) * up."""
        ...

    def rope_and_cache(
        self,
        qkv: Tensor,
        cos: Tensor,
        sin: Tensor,
        kv_cache: Tensor,
        slots: Tensor,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        /,
    ) -> None:
        """RoPE on the q and k heads of `qkv` [M, (num_heads + 2 num_kv_heads) head_dim] in
        place, then its k and v rows into the (float32 or float16) cache at `slots`."""
        ...

    def decode_layers(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        params: Sequence[Tensor],
        kv_caches: Sequence[Tensor],
        slots: Tensor,
        block_table: Tensor,
        seq_lens: Tensor,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        eps: float,
        sliding_window: int,
        /,
    ) -> Tensor:
        """Every decoder layer of a decode-only step: x [M, hidden] -> [M, hidden] before the
        final norm. `params` in `shoal.model.fused_decode`'s slot order."""
        ...

    def pack_lm_head(self, weight: Tensor, /) -> Tensor:
        """LM head weight [V, K] -> the panels [ceil(V / 16), K, 16] `lm_head_argmax` reads."""
        ...

    def lm_head_argmax(self, x: Tensor, packed: Tensor, vocab: int, /) -> list[Tensor]:
        """[argmax ids [M] int64, max logits [M]] of x W^T without writing the logits."""
        ...

    def lm_head_argmax_bf16(
        self, x: Tensor, bf16: Tensor, norms: Tensor, packed: Tensor, vocab: int, /
    ) -> list[Tensor]:
        """`lm_head_argmax`'s result through a bf16 filter (`shoal.model.ops.pack_lm_head_bf16`
        builds `bf16` and `norms`)."""
        ...
