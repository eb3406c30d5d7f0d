"""ArchConfig from Hugging Face config.json (4.x and 5.x spellings) and GGUF metadata."""

from __future__ import annotations

import json

import pytest

from shoal.model.arch import arch_from_gguf, arch_from_hf_config, load_arch_config
from shoal.model_source import default_model_path


def _llama(**overrides) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "bos_token_id": 1, "eos_token_id": [2, 7], **overrides,
    }  # fmt: skip


def test_llama_config_fields() -> None:
    arch = arch_from_hf_config(_llama())
    assert (arch.architecture, arch.vocab_size, arch.hidden_size) == ("LlamaForCausalLM", 1000, 64)
    assert (arch.num_layers, arch.num_heads, arch.num_kv_heads, arch.head_dim) == (2, 4, 2, 16)
    assert (arch.intermediate_size, arch.rms_norm_eps, arch.rope_theta) == (128, 1e-5, 500000.0)
    assert arch.rope_scaling is None and not arch.tie_word_embeddings
    assert not arch.attention_bias and arch.sliding_window is None
    assert (arch.bos_token_id, arch.eos_token_id) == (1, 2)  # first of a list


def test_rope_spellings_agree() -> None:
    """transformers 4.x `rope_scaling` (with "type") and 5.x `rope_parameters`."""
    legacy = arch_from_hf_config(_llama(rope_scaling={"type": "linear", "factor": 2.0}))
    new = arch_from_hf_config(
        _llama(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0})
    )
    assert legacy.rope_scaling == new.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert legacy.rope_theta == new.rope_theta == 500000.0
    default = arch_from_hf_config(
        _llama(rope_parameters={"rope_type": "default", "rope_theta": 7.0})
    )
    assert default.rope_scaling is None and default.rope_theta == 7.0


def test_qwen2_has_qkv_bias_and_mistral_a_window() -> None:
    qwen2 = arch_from_hf_config(_llama(architectures=["Qwen2ForCausalLM"], sliding_window=64))
    assert qwen2.attention_bias and not qwen2.o_proj_bias and qwen2.sliding_window is None
    mistral = arch_from_hf_config(_llama(architectures=["MistralForCausalLM"], sliding_window=64))
    assert mistral.sliding_window == 64 and not mistral.attention_bias


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"architectures": ["GPT2LMHeadModel"]}, "GPT2LMHeadModel"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "yarn"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ],
)
def test_unsupported_configs_raise_naming_the_field(overrides: dict, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        arch_from_hf_config(_llama(**overrides))


def test_directory_config_json(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(_llama()))
    assert load_arch_config(str(tmp_path)).num_layers == 2


def test_default_gguf_model() -> None:
    arch = load_arch_config(None)
    assert arch.architecture == "LlamaForCausalLM"
    assert (arch.vocab_size, arch.hidden_size, arch.num_layers) == (49152, 576, 30)
    assert (arch.num_heads, arch.num_kv_heads, arch.head_dim) == (9, 3, 64)
    assert (arch.intermediate_size, arch.rope_theta) == (1536, 100000.0)
    assert arch.max_position_embeddings == 8192 and arch.tie_word_embeddings
    assert (arch.bos_token_id, arch.eos_token_id) == (1, 2)
    assert default_model_path().endswith(".gguf")


def test_gguf_unknown_architecture_is_named() -> None:
    with pytest.raises(ValueError, match="falcon"):
        arch_from_gguf({"general.architecture": "falcon"}, {}, [])
