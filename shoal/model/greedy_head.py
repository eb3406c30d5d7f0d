"""`GreedyHead`: a greedy step's tokens straight from the hidden states, without writing the
logits (the native greedy LM head), which the runner takes for plain greedy requests."""

from __future__ import annotations

import torch

from shoal.model.int8 import Int8Linear
from shoal.model.llama import Linear, LlamaForCausalLM
from shoal.model.ops import ModelOps, PackedLmHead


class GreedyHead:
    """`token_ids(hidden)` is `model.compute_logits(hidden).argmax(-1).tolist()` without the
    [N, vocab] logits (for the tiny test model they were 70 % of a decode step, for the
    default model this is 1.8x faster at 64 rows), or None where the ops table has no greedy
    head for it (no native kernels, `SHOAL_NATIVE_LM_HEAD=0`, not float32 on CPU, a biased
    float head).

    An int8 head (`--quantization int8` or `gguf`) gives the same logits as `compute_logits`,
    bit for bit, so the same tokens. A float32 head sums each logit over the hidden size in a
    fixed order, not MKL's, so a tie closer than the last bits may pick another token; its
    weight is packed (a copy, [vocab / 16, hidden, 16]) at the first call and again whenever
    it changes."""

    def __init__(self, model: LlamaForCausalLM, ops: ModelOps | None = None) -> None:
        self.model = model
        self.ops = model.ops if ops is None else ops
        # (the head weight, its version, its packed copies): repacked when either changes.
        self._packed: tuple[torch.Tensor, int, PackedLmHead] | None = None

    def token_ids(self, hidden: torch.Tensor) -> list[int] | None:
        """The argmax token of each row of `hidden` [N, hidden_size], or None (see above)."""
        if not self.ops.can_run_greedy_head(hidden):
            return None
        head = self.model.lm_head
        if isinstance(head, Int8Linear):
            x = hidden.reshape(-1, head.in_features).contiguous()
            return self.ops.int8_argmax(x, head.weights())
        if head is None:
            weight = self.model.embed_tokens
        elif isinstance(head, Linear) and head.bias is None:
            weight = head.weight
        else:
            return None
        if weight.dtype != torch.float32:
            return None
        return self.ops.lm_head_argmax(hidden, self._packed_head(weight))

    def _packed_head(self, weight: torch.Tensor) -> PackedLmHead:
        cached = self._packed
        if cached is None or cached[0] is not weight or cached[1] != weight._version:
            cached = self._packed = (weight, weight._version, self.ops.pack_lm_head(weight))
        return cached[2]
