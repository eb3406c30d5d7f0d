"""Shared test utilities: tiny Llama model directories (config + the default tokenizer)."""

from __future__ import annotations

import json
import os
from functools import lru_cache
from typing import Any

# A 2-layer Llama with the default model's vocabulary, small enough for every CPU test.
TINY_LLAMA_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 49152,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float32",
}


@lru_cache(maxsize=1)
def _default_tokenizer() -> Any:
    from shoal.processing.tokenizer import Tokenizer

    return Tokenizer.from_model(None)


def make_tiny_model_dir(path: str, **config_overrides: Any) -> str:
    """Write a Hugging Face model directory without weights at `path` (created if needed):
    config.json (`TINY_LLAMA_CONFIG` updated with `config_overrides`) and the default model's
    tokenizer. Load it with `load_format="dummy"`. Returns `path`."""
    os.makedirs(path, exist_ok=True)
    config = {**TINY_LLAMA_CONFIG, **config_overrides}
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    _default_tokenizer().save_pretrained(path)
    return path


def make_tiny_hf_checkpoint(path: str, seed: int = 0, **config_overrides: Any) -> str:
    """`make_tiny_model_dir` plus random float32 weights (model.safetensors) written by
    transformers' LlamaForCausalLM seeded with `seed`, and its generation_config.json.
    Returns `path`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    make_tiny_model_dir(path, **config_overrides)
    config = {**TINY_LLAMA_CONFIG, **config_overrides}
    hf_config = LlamaConfig(**{k: v for k, v in config.items() if k != "architectures"})
    torch.manual_seed(seed)
    model = LlamaForCausalLM(hf_config).to(torch.float32).eval()
    model.save_pretrained(path, safe_serialization=True)
    # save_pretrained rewrites config.json in its own spelling (rope_parameters, dtype); keep
    # the plain keys too, so loaders reading either find them.
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        written = {**json.load(f), **config}
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(written, f, indent=2)
    return path


def load_benchmark(name: str) -> Any:
    """benchmarks/<name>.py as a module (benchmarks/ is a folder of scripts, not a package),
    registered in sys.modules under `name`: dataclasses look their module up by name."""
    import importlib.util
    import sys

    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
