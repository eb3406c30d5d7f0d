"""`--quantization auto` (the default): gguf mode for a GGUF file of 4-bit linears where the
native kernels load, float32 otherwise, with the reason; explicit values win; the engine logs
its choice once (shoal/model/mode.py)."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch

from shoal import native
from shoal.config import ModelConfig, ShoalConfig
from shoal.model import mode
from shoal.model.mode import choose_mode, gguf_linear_types, resolve_engine_mode
from shoal.model_source import ModelSource, default_model_path, resolve_model
from tests.helpers import make_tiny_model_dir

CPU = torch.device("cpu")
needs_kernels = pytest.mark.skipif(native.load() is None, reason="native kernels unavailable")


@pytest.fixture(scope="module")
def gguf() -> ModelSource:
    return resolve_model(None)  # the default model: Q4_1 linears


@pytest.fixture
def hf_dir(tmp_path) -> ModelSource:
    return resolve_model(make_tiny_model_dir(str(tmp_path)))


def test_the_default_is_auto_and_none_means_exact() -> None:
    assert ModelConfig().quantization == "auto"
    assert ModelConfig(quantization="none").quantization is None
    assert ModelConfig(quantization=None).quantization is None
    # auto is no promise of gguf: it combines with any dtype and device.
    assert ModelConfig(dtype="bfloat16", device="cuda").quantization == "auto"
    with pytest.raises(ValueError, match="--quantization"):
        ModelConfig(quantization="q4")


def test_default_model_linears_are_q4_1() -> None:
    assert gguf_linear_types(default_model_path()) == {"Q4_1"}


@needs_kernels
def test_gguf_file_of_q4_linears_runs_gguf_mode(gguf: ModelSource) -> None:
    choice = choose_mode(ModelConfig(), gguf, CPU, torch.float32)
    assert (choice.quantization, choice.name) == ("gguf", "gguf")
    assert "auto: GGUF file of Q4_1 linears" in choice.reason
    assert "+0.44%" in choice.reason and "--quantization none" in choice.reason


def test_hf_checkpoint_runs_float32(hf_dir: ModelSource) -> None:
    for load_format in ("auto", "dummy"):
        choice = choose_mode(ModelConfig(load_format=load_format), hf_dir, CPU, torch.float32)
        assert (choice.quantization, choice.name) == (None, "float32")
        assert choice.reason.startswith("auto: ")


def test_other_dtypes_devices_and_formats_stay_unquantized(gguf: ModelSource) -> None:
    bf16 = choose_mode(ModelConfig(), gguf, CPU, torch.bfloat16)
    assert (bf16.quantization, bf16.name) == (None, "bfloat16")
    assert "--dtype bfloat16" in bf16.reason
    cuda = choose_mode(ModelConfig(), gguf, torch.device("cuda"), torch.bfloat16)
    assert cuda.quantization is None and "CPU-only" in cuda.reason
    dummy = choose_mode(ModelConfig(load_format="dummy"), gguf, CPU, torch.float32)
    assert dummy.quantization is None and "dummy" in dummy.reason


def test_gguf_of_other_block_types_runs_float32(gguf: ModelSource, monkeypatch) -> None:
    monkeypatch.setattr(mode, "gguf_linear_types", lambda path: {"Q4_1", "Q6_K"})
    choice = choose_mode(ModelConfig(), gguf, CPU, torch.float32)
    assert (choice.quantization, choice.name) == (None, "float32")
    assert "Q4_1, Q6_K" in choice.reason and "not all Q4_0/Q4_1" in choice.reason


def test_without_kernels_gguf_file_runs_float32_and_says_why() -> None:
    code = """
import torch
from shoal.config import ModelConfig
from shoal.model.mode import choose_mode
from shoal.model_source import resolve_model
choice = choose_mode(ModelConfig(), resolve_model(None), torch.device("cpu"), torch.float32)
print(choice.quantization, choice.describe())
"""
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**__import__("os").environ, "SHOAL_NATIVE": "0"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("None mode: float32 (auto: GGUF file, but no native kernels")
    assert "SHOAL_NATIVE=0" in out.stdout


def test_explicit_values_win(gguf: ModelSource, hf_dir: ModelSource) -> None:
    exact = choose_mode(ModelConfig(quantization="none"), gguf, CPU, torch.float32)
    assert (exact.quantization, exact.name) == (None, "float32")
    assert "exact" in exact.reason
    for q in ("int8", "gguf"):
        # Taken as given (an HF checkpoint with gguf fails later, in the loader, naming it).
        choice = choose_mode(ModelConfig(quantization=q), hf_dir, CPU, torch.float32)
        assert (choice.quantization, choice.name, choice.reason) == (q, q, f"--quantization {q}")


@needs_kernels
def test_the_engine_logs_its_choice_once(gguf: ModelSource) -> None:
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    mode.logger.addHandler(handler)
    try:
        config = resolve_engine_mode(ShoalConfig(), gguf, CPU, torch.float32)
    finally:
        mode.logger.removeHandler(handler)
    assert config.model.quantization == "gguf"
    assert ShoalConfig().model.quantization == "auto"
    (line,) = [r.getMessage() for r in records]
    assert line.startswith("mode: gguf (auto: GGUF file of Q4_1 linears"), line


def test_load_model_resolves_auto_itself(hf_dir: ModelSource) -> None:
    from shoal.model.arch import arch_from_source
    from shoal.model.int8 import Int8Linear
    from shoal.model.loader import load_model

    config = ModelConfig(model=hf_dir.path, load_format="dummy")
    model = load_model(config, hf_dir, arch_from_source(hf_dir), 64, torch.float32, CPU)
    assert not any(isinstance(m, Int8Linear) for m in model.modules())
    assert config.quantization == "auto"  # the caller's config is left as it was
