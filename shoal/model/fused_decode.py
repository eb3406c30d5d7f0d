"""`FusedDecode`: every decoder layer of a decode-only step in one native call
(`decode_layers`), the path the runner takes instead of the model's forward where it applies.

At batch 1 a layer is ~35 small torch ops whose dispatch from Python costs more than their
arithmetic. `decode_layers` runs the same ops in the same order from C++ (the kernels the ops
table calls, and ATen), so its hidden states are bit-identical to `LlamaForCausalLM.forward`'s
(tests/model/test_native.py, test_gguf_quant.py); only the Python overhead goes.

Its calling convention: one flat list of tensors, `LAYER_SLOTS` per layer: the two norm
weights, then `LINEAR_SLOTS` per Linear in `LAYER_LINEARS` order. The kernel tells a
Linear's kind by the dtype of its first slot ("-" an empty tensor):

    Linear       weight [N, K] float32, bias or -, -, -, -, -, -
    Int8Linear   the 7 `Int8Weights` (qweight int8, ..., bias or -)
    Q4Linear     packed uint8, N as a [1] int64 tensor, bias or -, -, -, -, -
"""

from __future__ import annotations

import torch
from torch import nn

from shoal.model.attention import AttentionMetadata
from shoal.model.gguf_quant import Q4Linear
from shoal.model.int8 import Int8Linear
from shoal.model.llama import DecoderLayer, Linear, LlamaForCausalLM, layer_linears
from shoal.native.api import NativeKernels

LINEAR_SLOTS = 7  # kLinearSlots in the kernel source
LAYER_SLOTS = 2 + 4 * LINEAR_SLOTS  # kLayerSlots


def linear_slots(linear: nn.Module, none: torch.Tensor) -> list[torch.Tensor]:
    """`linear`'s `LINEAR_SLOTS` tensors (`none`: the empty tensor of an unused slot)."""
    if isinstance(linear, Int8Linear):
        return [none if t is None else t for t in linear.weights()]
    if isinstance(linear, Q4Linear):
        q4 = linear.weights()
        bias = none if q4.bias is None else q4.bias
        return [q4.packed, torch.tensor([q4.out_features]), bias] + [none] * 4
    if isinstance(linear, Linear):
        bias = none if linear.bias is None else linear.bias
        return [linear.weight, bias] + [none] * 5
    raise TypeError(f"decode_layers cannot run a {type(linear).__name__}")


def layer_params(model: LlamaForCausalLM) -> list[torch.Tensor]:
    """Every layer's tensors in `decode_layers`' slot order. The list holds the tensors
    themselves, so in-place updates show through; replacing one (quantizing, moving the
    weights) needs a new list."""
    none = torch.empty(0)
    params: list[torch.Tensor] = []
    for layer in model.layers:
        assert isinstance(layer, DecoderLayer)
        params += [layer.input_layernorm.weight, layer.post_attention_layernorm.weight]
        for linear in layer_linears(layer):
            params += linear_slots(linear, none)
    assert len(params) == LAYER_SLOTS * len(model.layers)
    return params


class FusedDecode:
    """`forward` computes what `model.forward` computes, for decode-only steps (`applies`).
    Build it after the model's weights are final: it packs the parameter list once."""

    def __init__(self, model: LlamaForCausalLM, kernels: NativeKernels) -> None:
        self.model = model
        self.kernels = kernels
        self.params = layer_params(model)

    @classmethod
    def for_model(cls, model: LlamaForCausalLM) -> FusedDecode | None:
        """The fused path for `model`, or None where its ops table has none for it (no
        native kernels, SHOAL_NATIVE_ATTENTION=0, not float32 on CPU)."""
        weight = model.embed_tokens
        kernels = model.ops.fused_decode_kernels(weight.dtype, weight.device)
        return None if kernels is None else cls(model, kernels)

    def applies(self, meta: AttentionMetadata, num_tokens: int) -> bool:
        """Whether a step of `num_tokens` tokens is decode-only (no prefill span)."""
        return not meta.prefills and meta.num_decodes == num_tokens

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_caches: list[torch.Tensor],
    ) -> torch.Tensor:
        """`model.forward`'s hidden states [num_tokens, hidden] for a step that `applies`."""
        model, arch = self.model, self.model.arch
        assert meta.decode_block_table is not None and meta.decode_seq_lens is not None
        x = model.embed(input_ids)
        cos, sin = model.rotary.lookup(positions)
        x = self.kernels.decode_layers(
            x, cos, sin, self.params, kv_caches, meta.slot_mapping, meta.decode_block_table,
            meta.decode_seq_lens, arch.num_heads, arch.num_kv_heads, arch.head_dim,
            arch.rms_norm_eps, meta.sliding_window or 0,
        )  # fmt: skip
        return model.norm(x)
