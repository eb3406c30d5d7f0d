"""Loader: formats, dtypes, dummy weights, and its errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from shoal.config import ModelConfig
from shoal.model.arch import arch_from_source
from shoal.model.loader import _unpermute_rope_rows, load_model, resolve_dtype
from shoal.model_source import resolve_model
from tests.model.tiny_hf import make_hf_model, save_hf_model

CONFIG = {
    "architectures": ["LlamaForCausalLM"], "vocab_size": 256, "hidden_size": 32,
    "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "max_position_embeddings": 128,
}  # fmt: skip


def _load(path: str, dtype: torch.dtype = torch.float32, **model_kw):
    source = resolve_model(path)
    arch = arch_from_source(source)
    config = ModelConfig(model=path, **model_kw)
    return load_model(config, source, arch, 128, dtype, torch.device("cpu"))


@pytest.fixture
def config_dir(tmp_path) -> str:
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    return str(tmp_path)


def test_dummy_weights_follow_the_seed(config_dir: str) -> None:
    a = dict(_load(config_dir, load_format="dummy", seed=3).named_parameters())
    b = dict(_load(config_dir, load_format="dummy", seed=3).named_parameters())
    c = dict(_load(config_dir, load_format="dummy", seed=4).named_parameters())
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not torch.equal(a["embed_tokens"], c["embed_tokens"])
    assert torch.all(a["norm.weight"] == 1.0)
    # Drawn in float32 whatever the dtype: bfloat16 holds the same values, rounded.
    bf16 = dict(_load(config_dir, torch.bfloat16, load_format="dummy", seed=3).named_parameters())
    assert torch.equal(bf16["embed_tokens"], a["embed_tokens"].to(torch.bfloat16))


def test_safetensors_with_missing_or_misshapen_tensor(tmp_path) -> None:
    path = save_hf_model(
        make_hf_model("llama", **{k: v for k, v in CONFIG.items() if k != "architectures"}),
        str(tmp_path),
    )
    weights_file = tmp_path / "model.safetensors"
    from safetensors.torch import load_file

    weights = load_file(str(weights_file))
    _load(path)  # complete: loads
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, str(weights_file))
    with pytest.raises(ValueError, match=r"layers\.1\.gate_up_proj"):
        _load(path)
    weights["model.layers.1.mlp.up_proj.weight"] = torch.zeros(3, 32)
    save_file(weights, str(weights_file))
    with pytest.raises(ValueError, match="up_proj.weight.*shape"):
        _load(path)


def test_format_mismatches_and_cpu_float16(config_dir: str) -> None:
    with pytest.raises(ValueError, match="--load-format"):
        _load(config_dir, load_format="gguf")
    with pytest.raises(ValueError, match="safetensors"):
        _load(config_dir)  # a directory without weights
    with pytest.raises(ValueError, match="--dtype"):
        resolve_dtype("float16", torch.device("cpu"))
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16


def test_unpermute_inverts_llama_cpp_permutation() -> None:
    def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
        # convert_hf_to_gguf.py's LlamaModel.permute
        return (
            w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2)
            .reshape(w.shape)
        )

    weight = np.random.default_rng(0).standard_normal((3 * 8, 5)).astype(np.float32)
    restored = _unpermute_rope_rows(torch.from_numpy(llama_cpp_permute(weight, 3)), 3)
    np.testing.assert_array_equal(restored.numpy(), weight)
    bias = np.arange(16, dtype=np.float32)
    restored = _unpermute_rope_rows(torch.from_numpy(llama_cpp_permute(bias, 2)), 2)
    np.testing.assert_array_equal(restored.numpy(), bias)
