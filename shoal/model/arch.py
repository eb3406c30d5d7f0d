"""`ArchConfig`: a Llama-family model's shape, read from config.json or GGUF metadata (no torch)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from shoal.model_source import ModelSource, resolve_model

# Hugging Face architecture names this package implements (all share one model class).
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
# GGUF `general.architecture` -> the equivalent Hugging Face architecture.
GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM"}
# rope_scaling types the rotary embedding implements ("default" = none).
ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class ArchConfig:
    """Everything the model needs to allocate and run: shapes, norms, rotary settings."""

    architecture: str  # a Hugging Face name from SUPPORTED_ARCHITECTURES
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    # None, or {"rope_type": "linear" | "llama3", "factor": ..., ...} (HF's keys).
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False  # q/k/v projections carry a bias (Qwen2)
    o_proj_bias: bool = False  # the output projection carries a bias (Llama attention_bias)
    # Each query sees at most this many keys, itself included (Mistral); None = unlimited.
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_scaling: type {rope_type!r} is not supported ({ROPE_TYPES})")


def load_arch_config(model: str | None) -> ArchConfig:
    """The `ArchConfig` of `--model` (None = the default model), from its config.json or GGUF
    header. `FileNotFoundError` if the model is missing, `ValueError` if unsupported."""
    return arch_from_source(resolve_model(model))


def arch_from_source(source: ModelSource) -> ArchConfig:
    """The `ArchConfig` of a resolved model source."""
    if source.is_gguf:
        from shoal.gguf_file import GGUFFile

        gguf = GGUFFile(source.path)
        return arch_from_gguf(gguf.metadata, gguf.array_lengths, list(gguf.tensors))
    with open(os.path.join(source.path, "config.json"), encoding="utf-8") as f:
        return arch_from_hf_config(json.load(f))


def arch_from_hf_config(config: dict[str, Any]) -> ArchConfig:
    """Parse a Hugging Face config.json (transformers 4.x `rope_theta`/`rope_scaling` or 5.x
    `rope_parameters`). `ValueError` names an unsupported architecture or setting."""
    archs = config.get("architectures") or []
    arch = archs[0] if archs else _arch_from_model_type(config.get("model_type"))
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {config['hidden_act']!r} is not supported (only 'silu')")
    if config.get("mlp_bias"):
        raise ValueError("mlp_bias=true is not supported")
    if config.get("use_sliding_window"):
        raise ValueError("use_sliding_window=true (Qwen2) is not supported")
    num_heads = int(config["num_attention_heads"])
    hidden_size = int(config["hidden_size"])
    theta, scaling = _hf_rope(config)
    is_qwen2 = arch == "Qwen2ForCausalLM"
    has_bias = bool(config.get("attention_bias", False))
    window = config.get("sliding_window") if arch == "MistralForCausalLM" else None
    return ArchConfig(
        architecture=arch,
        vocab_size=int(config["vocab_size"]),
        hidden_size=hidden_size,
        num_layers=int(config["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(config.get("num_key_value_heads") or num_heads),
        head_dim=int(config.get("head_dim") or hidden_size // num_heads),
        intermediate_size=int(config["intermediate_size"]),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        attention_bias=is_qwen2 or has_bias,
        o_proj_bias=has_bias and not is_qwen2,
        sliding_window=int(window) if window else None,
        bos_token_id=_first(config.get("bos_token_id")),
        eos_token_id=_first(config.get("eos_token_id")),
    )


def arch_from_gguf(
    metadata: dict[str, Any], array_lengths: dict[str, int], tensor_names: list[str]
) -> ArchConfig:
    """Parse GGUF metadata (`general.architecture` "llama"); the embeddings are tied when the
    file has no `output.weight`. `ValueError` names an unsupported architecture."""
    gguf_arch = metadata.get("general.architecture")
    if gguf_arch not in GGUF_ARCHITECTURES:
        raise ValueError(
            f"GGUF architecture {gguf_arch!r} is not supported; supported: "
            f"{', '.join(GGUF_ARCHITECTURES)}"
        )

    def get(key: str, default: Any = None) -> Any:
        return metadata.get(f"{gguf_arch}.{key}", default)

    hidden_size = int(get("embedding_length"))
    num_heads = int(get("attention.head_count"))
    head_dim = int(get("attention.key_length") or get("rope.dimension_count") or 0)
    vocab_size = get("vocab_size") or array_lengths.get("tokenizer.ggml.tokens")
    if vocab_size is None:
        raise ValueError("GGUF metadata has neither a vocab_size nor tokenizer.ggml.tokens")
    return ArchConfig(
        architecture=GGUF_ARCHITECTURES[gguf_arch],
        vocab_size=int(vocab_size),
        hidden_size=hidden_size,
        num_layers=int(get("block_count")),
        num_heads=num_heads,
        num_kv_heads=int(get("attention.head_count_kv") or num_heads),
        head_dim=head_dim or hidden_size // num_heads,
        intermediate_size=int(get("feed_forward_length")),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=_gguf_rope_scaling(get),
        max_position_embeddings=int(get("context_length", 2048)),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        bos_token_id=_first(metadata.get("tokenizer.ggml.bos_token_id")),
        eos_token_id=_first(metadata.get("tokenizer.ggml.eos_token_id")),
    )


def _arch_from_model_type(model_type: Any) -> str:
    names = {
        "llama": "LlamaForCausalLM",
        "mistral": "MistralForCausalLM",
        "qwen2": "Qwen2ForCausalLM",
    }
    if model_type in names:
        return names[model_type]
    raise ValueError(f"config.json names no architecture (model_type {model_type!r})")


def _hf_rope(config: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling with "rope_type" set, or None for plain RoPE)."""
    params = dict(config.get("rope_parameters") or {})
    legacy = config.get("rope_scaling")
    if legacy:
        params = {**legacy, **params}
    theta = float(params.pop("rope_theta", config.get("rope_theta", 10000.0)))
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if rope_type == "default":
        return theta, None
    return theta, {"rope_type": rope_type, **params}


def _gguf_rope_scaling(get: Any) -> dict[str, Any] | None:
    kind = get("rope.scaling.type")
    if kind in (None, "none"):
        return None
    scaling: dict[str, Any] = {"rope_type": kind, "factor": float(get("rope.scaling.factor", 1.0))}
    original = get("rope.scaling.original_context_length")
    if original:
        scaling["original_max_position_embeddings"] = int(original)
    return scaling


def _first(value: Any) -> int | None:
    """Token ids may be a single id or a list (several EOS ids): keep the first."""
    if isinstance(value, list):
        return int(value[0]) if value else None
    return None if value is None else int(value)
