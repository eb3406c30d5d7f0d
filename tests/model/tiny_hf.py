"""Tiny random transformers checkpoints (Llama, Qwen2, Mistral) and a reference forward."""

from __future__ import annotations

from typing import Any

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 512
BASE_CONFIG: dict[str, Any] = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    # Wider than the usual 0.02 so logits are far from uniform and greedy has clear winners.
    "initializer_range": 0.1,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
KINDS: dict[str, tuple[type, type]] = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
}


def make_hf_model(kind: str, seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """A float32 transformers model of `kind` with random weights drawn from `seed`."""
    config_cls, model_cls = KINDS[kind]
    config = config_cls(**{**BASE_CONFIG, **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32).eval()
    # Biases (Qwen2) start at zero; make them count.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.1)
    return model


def save_hf_model(model: PreTrainedModel, path: str) -> str:
    model.save_pretrained(path, safe_serialization=True)
    return path


def hf_logits(model: PreTrainedModel, token_ids: list[int]) -> torch.Tensor:
    """[len(token_ids), vocab] float32 logits of one full-sequence forward."""
    with torch.no_grad():
        return model(torch.tensor([token_ids])).logits[0].float()
