"""`--quantization gguf`: the native `q4_linear` kernel against its float definition, its
batch and thread invariance, the fused decode path, the flag's validation, and the default
model (4-bit weights as loaded, logits against float32, greedy text)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
import torch.nn.functional as F
from gguf.constants import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

from shoal.config import ModelConfig
from shoal.entrypoints.engine_args import add_model_args
from shoal.model.arch import arch_from_source
from shoal.model.gguf_quant import Q4Linear
from shoal.model.loader import load_model
from shoal.model_source import resolve_model
from tests.model.paged import PagedDriver, assert_fused_decode_matches_python, tiny_model
from tests.model.test_int8 import TEXTS


def _blocks(n: int, k: int, qtype: Q, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw GGUF bytes of a random [n, k] weight in `qtype` and their float32 dequantization."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    w[:, 3] += 0.05  # a shifted channel: Q4_1's minimum m is not just -8 d
    raw = quantize(w.numpy(), qtype)
    return torch.from_numpy(raw), torch.from_numpy(dequantize(raw, qtype))


def _activations(rows: int, k: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = F.silu(torch.randn(rows, k, generator=g) * 2) * torch.randn(rows, k, generator=g)
    x[:, 7] *= 20  # one large channel: only its own block's scale should suffer
    return x


def _definition(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The kernel's definition in float64: each row quantized per 32-channel block (scale
    max |x| / 127 in float32, x * (1 / scale) rounded half to even, as the kernel does)
    times the dequantized weight."""
    xb = x.view(x.shape[0], -1, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    q = torch.round(xb * (1 / scale))
    return (q.double() * scale.double()).view(x.shape) @ w.double().T


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q4_0])
@pytest.mark.parametrize(("n", "k"), [(96, 64), (13, 96), (1, 32), (300, 160), (64, 576)])
def test_q4_linear_matches_its_definition(kernels, qtype: Q, n: int, k: int) -> None:
    """Awkward N (partial 8-channel panels: masked epilogue) and every row count that hits a
    tile shape or remainder (1-8, 17, 64), with and without bias. Against the float64
    definition the only difference is float32 rounding (measured ~1e-7); against plain
    float32 x W^T the 8-bit block activations cost up to ~0.6% of the sum of |products|."""
    raw, w = _blocks(n, k, qtype)
    b = torch.randn(n, generator=torch.Generator().manual_seed(2))
    for bias in (None, b):
        linear = Q4Linear(raw, qtype, k, bias)
        # The packed layout holds exactly the GGUF weights (Q4_0 rewritten as Q4_1).
        assert torch.equal(linear.dequantized_weight(), w)
        for rows in (1, 2, 3, 4, 5, 6, 7, 8, 17, 64):
            x = _activations(rows, k)
            y = linear(x)
            assert y.dtype == torch.float32 and y.shape == (rows, n)
            offset = 0 if bias is None else bias.double()
            assert _rel(y, _definition(x, w) + offset) < 1e-5, (bias is None, rows)
            # Relative to the sum of |products| (a single output can cancel to ~0).
            size = (x.abs() @ w.abs().T).norm()
            assert (y - F.linear(x, w, bias)).norm() / size < 1e-2
    assert torch.equal(linear(x.view(4, 16, k)).view(64, n), y)  # leading dims kept


def test_q4_linear_is_batch_and_thread_invariant(kernels) -> None:
    """A row's output is bit-identical whatever rows share its call (alone, in any slice,
    beside a row scaled 100x) and however many threads split the work."""
    raw, _ = _blocks(200, 96, Q.Q4_1)
    linear = Q4Linear(raw, Q.Q4_1, 96, torch.randn(200))
    x = _activations(130, 96)
    full = linear(x)
    for lo, hi in [(0, 1), (5, 6), (3, 19), (10, 70), (0, 64), (41, 130)]:
        assert torch.equal(linear(x[lo:hi].clone()), full[lo:hi]), (lo, hi)
    other = x.clone()
    other[0] *= 100
    assert torch.equal(linear(other)[1:], full[1:])
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            assert torch.equal(linear(x), full), n
            assert torch.equal(linear(x[:1].clone()), full[:1]), n
    finally:
        torch.set_num_threads(threads)


def test_q4_linear_rejects_what_it_cannot_compute(kernels) -> None:
    raw, _ = _blocks(16, 64, Q.Q4_1)
    with pytest.raises(ValueError, match="multiple of 32"):
        Q4Linear(raw, Q.Q4_1, 48, None)
    with pytest.raises(ValueError, match="not a 4-bit block type"):
        Q4Linear(torch.from_numpy(quantize(torch.zeros(16, 64).numpy(), Q.Q8_0)), Q.Q8_0, 64, None)
    linear = Q4Linear(raw, Q.Q4_1, 64, None)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        kernels.q4_linear(torch.zeros(2, 40), linear.packed, 16, None)


def _to_q4(model) -> None:
    """Every layer Linear of `model` as a Q4Linear of its weight quantized to Q4_1."""
    for layer in model.layers:
        for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
            m = getattr(layer, name)
            raw = torch.from_numpy(quantize(m.weight.numpy(), Q.Q4_1))
            setattr(layer, name, Q4Linear(raw, Q.Q4_1, m.weight.shape[1], m.bias))


@pytest.mark.parametrize("overrides", [{}, {"attention_bias": True}])
def test_fused_decode_layers_run_q4_linears_bit_identically(kernels, tmp_path, overrides) -> None:
    """`decode_layers` with Q4Linear slots gives exactly what the Python layers give."""
    model, arch = tiny_model(tmp_path, None, **overrides)
    _to_q4(model)
    assert_fused_decode_matches_python(model, arch, kernels)


def test_gguf_flag_validation(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"],
        "vocab_size": 256, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 1,
        "num_attention_heads": 4, "num_key_value_heads": 2}))  # fmt: skip
    source = resolve_model(str(tmp_path))
    arch = arch_from_source(source)
    config = ModelConfig(model=str(tmp_path), load_format="dummy", quantization="gguf")
    with pytest.raises(ValueError, match="--quantization gguf .* needs a .gguf model"):
        load_model(config, source, arch, 64, torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match="--quantization: gguf needs --device cpu"):
        load_model(config, source, arch, 64, torch.bfloat16, torch.device("cpu"))
    with pytest.raises(ValueError, match="--quantization"):
        ModelConfig(quantization="gguf", dtype="bfloat16")
    parser = argparse.ArgumentParser()
    add_model_args(parser)
    assert parser.parse_args(["--quantization", "gguf"]).quantization == "gguf"


@pytest.mark.slow
def test_default_model_in_gguf_mode(kernels) -> None:
    """The default model (Q4_1 linears, Q8_0 tied embedding) with `--quantization gguf`:
    every layer Linear is a Q4Linear holding exactly the file's weights (as the float32
    load dequantizes them: q/k rows un-permuted, shards fused in order); teacher-forced over
    222 positions of real text its next-token choice matches float32's (measured: 96.4%,
    relative logit error 2.8%; int8 mode in the same run 95.5% and 5.6%: the weights are
    the file's own, only the activations and the int8 LM head round); and greedy decoding
    (the fused decode path) answers a question."""
    from shoal.model.int8 import Int8Linear
    from shoal.processing.tokenizer import Tokenizer

    source = resolve_model(None)
    arch = arch_from_source(source)
    tokenizer = Tokenizer.from_model(None)

    def load(quantization: str | None) -> torch.nn.Module:
        config = ModelConfig(quantization=quantization)
        return load_model(config, source, arch, 256, torch.float32, torch.device("cpu"))

    fp32, q4 = load(None), load("gguf")
    for ref_layer, layer in zip(fp32.layers, q4.layers, strict=True):
        for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
            linear = getattr(layer, name)
            assert isinstance(linear, Q4Linear), name
            assert torch.equal(linear.dequantized_weight(), getattr(ref_layer, name).weight)
    assert isinstance(q4.lm_head, Int8Linear)
    assert torch.equal(q4.embed_tokens, fp32.embed_tokens)

    def logits(model: torch.nn.Module) -> torch.Tensor:
        driver = PagedDriver(model, arch, 64, 16)
        out = []
        for i, text in enumerate(TEXTS):
            ids = tokenizer.encode(text)
            driver.add(str(i), ids)
            out.append(driver.step({str(i): len(ids)})[str(i)])
        return torch.cat(out)

    ref, got = logits(fp32), logits(q4)
    agreement = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agreement >= 0.93, agreement
    assert _rel(got, ref) < 0.05

    prompt = tokenizer.encode("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                              "<|im_start|>assistant\n")  # fmt: skip
    driver = PagedDriver(q4, arch, 16, 16)
    driver.add("q", list(prompt))
    next_id = int(driver.step({"q": len(prompt)})["q"][-1].argmax())
    answer = [next_id]
    for _ in range(11):
        driver.requests["q"].token_ids.append(next_id)
        next_id = int(driver.step({"q": 1})["q"][-1].argmax())
        answer.append(next_id)
    assert "Paris" in tokenizer.decode(answer), tokenizer.decode(answer)
