"""The default GGUF model: shoal's GGUF reader against gguf-py's, and logits against
transformers."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from shoal.config import ModelConfig
from shoal.gguf_file import GGUFFile
from shoal.model.arch import arch_from_source
from shoal.model.loader import load_model
from shoal.model_source import default_model_path, resolve_model
from tests.model.paged import PagedDriver

# "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n" in SmolLM2's vocabulary.
PROMPT = [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198]


@pytest.mark.slow
def test_reader_matches_gguf_py() -> None:
    from gguf import GGUFReader

    ours = GGUFFile(default_model_path())
    reference = GGUFReader(default_model_path())
    fields = {k: f.contents() for k, f in reference.fields.items() if not k.startswith("GGUF.")}
    assert ours.all_metadata() == fields and list(ours.all_metadata()) == list(fields)
    assert list(ours.tensors) == [t.name for t in reference.tensors]
    for tensor in reference.tensors:
        info = ours.tensors[tensor.name]
        assert info.qtype == tensor.tensor_type
        assert info.shape == tuple(int(d) for d in reversed(tensor.shape))
        np.testing.assert_array_equal(ours.raw(tensor.name), np.asarray(tensor.data))
    assert ours.metadata["llama.block_count"] == 30
    assert ours.array_lengths["tokenizer.ggml.tokens"] == 49152


@pytest.mark.slow
def test_default_model_logits_match_transformers_gguf() -> None:
    from transformers import AutoModelForCausalLM

    source = resolve_model(None)
    arch = arch_from_source(source)
    config = ModelConfig(quantization="none")  # the exact path (no flags: gguf mode)
    model = load_model(config, source, arch, 64, torch.float32, torch.device("cpu"))
    driver = PagedDriver(model, arch, num_blocks=4, block_size=16)
    driver.add("p", PROMPT)
    ours = driver.step({"p": len(PROMPT)})["p"]
    path = default_model_path()
    hf = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    ).eval()
    with torch.no_grad():
        expected = hf(torch.tensor([PROMPT])).logits[0].float()
    torch.testing.assert_close(ours, expected, atol=5e-4, rtol=1e-4)
    assert torch.equal(ours.argmax(-1), expected.argmax(-1))


def test_torch_dequantisation_is_bit_identical_to_gguf_py() -> None:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize
    from gguf.quants import quantize

    from shoal.model.gguf_dequant import dequantize

    values = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    for qtype in (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0):
        raw = quantize(values, qtype)
        assert raw.shape[-1] == 64 // GGML_QUANT_SIZES[qtype][0] * GGML_QUANT_SIZES[qtype][1]
        ours = dequantize(raw, qtype, (8, 64))
        np.testing.assert_array_equal(ours.numpy(), gguf_dequantize(raw, qtype))
    # and on the default model's own Q8_0 embedding and a Q4_1 projection
    gguf = GGUFFile(default_model_path())
    for name in ("token_embd.weight", "blk.3.ffn_up.weight"):
        info = gguf.tensors[name]
        ours = dequantize(gguf.raw(name), info.qtype, info.shape)
        np.testing.assert_array_equal(ours.numpy(), gguf_dequantize(gguf.raw(name), info.qtype))
