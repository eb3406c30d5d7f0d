"""`--quantization auto` (the default): which mode an engine runs, chosen when it loads the model.

The rule (issue #23): the fastest mode whose perplexity is within 1% of float32's on
benchmarks/data/alice29.txt (benchmarks/quality.py; figures in docs/performance.md, "Quality").
Measured on the default model (SmolLM2-135M-Instruct Q4_1): gguf mode +0.44% (llama.cpp on the
same file +0.36%), bfloat16 +0.09%, int8 +1.36%. So:

- a GGUF file whose layer Linears are all 4-bit blocks the `q4_linear` kernel takes (Q4_0,
  Q4_1), on CPU in float32 with the native kernels loadable -> "gguf";
- anything else -> None, the weights kept in `--dtype` (float32 by default): a Hugging Face
  checkpoint has no 4-bit weights to keep, int8 misses the 1% bar, and other GGUF block types
  (K-quants, Q8_0, float) would take gguf mode's int8 fallback, whose quality is not measured.

bfloat16 (+0.09%) is not chosen for the rest: on the Zen 4 host (AVX512_BF16) its decode step
was measured no faster than float32's (batch 1 slower: float32 takes the fused native decode
path, bfloat16 torch ops), only its prefill faster (docs/performance.md, "The default mode").

Explicit values win: `--quantization none` is the exact float32 path, `int8` and `gguf` are
taken as given. `resolve_mode` runs where the model is loaded (each engine process: the kernels
and the file are that host's), and one line at start says what runs and why.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch

from shoal.config import ModelConfig, ShoalConfig
from shoal.logger import init_logger
from shoal.model_source import ModelSource

logger = init_logger(__name__)

# The GGUF names of a layer's Linear weights (blk.N.<name>.weight), all of which must be 4-bit.
_LAYER_LINEARS = (
    "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down",
)  # fmt: skip
# Perplexity of gguf mode vs float32 on alice29.txt, default model (docs/performance.md).
GGUF_PPL_DELTA = "+0.44%"


@dataclass(frozen=True)
class ModeChoice:
    quantization: str | None  # the resolved value: None, "int8" or "gguf" (never "auto")
    name: str  # what runs: "gguf", "int8", "float32", "bfloat16", ...
    reason: str  # why, for the log line

    def describe(self) -> str:
        return f"mode: {self.name} ({self.reason})"


def gguf_linear_types(path: str) -> set[str]:
    """The block types (names, e.g. {"Q4_1"}) of a GGUF file's layer Linear weights; reads
    the header only."""
    from shoal.gguf_file import GGUFFile

    pattern = re.compile(rf"blk\.\d+\.({'|'.join(_LAYER_LINEARS)})\.weight")
    return {
        info.qtype.name for name, info in GGUFFile(path).tensors.items() if pattern.fullmatch(name)
    }


def _native_unavailable() -> str | None:
    """None where the native kernels load on this CPU, else why not."""
    from shoal import native

    if native.load() is not None:
        return None
    return native.unavailable_reason() or "native kernels unavailable"


def choose_mode(
    config: ModelConfig, source: ModelSource, device: torch.device, dtype: torch.dtype
) -> ModeChoice:
    """The mode `config.quantization` means for this model, device and dtype (see the module
    docstring)."""
    dtype_name = str(dtype).removeprefix("torch.")
    q = config.quantization
    if q is None:
        exact = ", the exact path" if dtype == torch.float32 else ""
        return ModeChoice(None, dtype_name, f"--quantization none: unquantized weights{exact}")
    if q != "auto":
        return ModeChoice(q, q, f"--quantization {q}")

    def fallback(why: str) -> ModeChoice:
        return ModeChoice(None, dtype_name, f"auto: {why}")

    if device.type != "cpu":
        return fallback(f"4-bit kernels are CPU-only, this is {device.type}")
    if dtype != torch.float32:
        return fallback(f"--dtype {dtype_name} (gguf mode computes in float32)")
    load_format = config.load_format
    if load_format == "auto":
        load_format = "gguf" if source.is_gguf else "safetensors"
    if load_format != "gguf" or not source.is_gguf:
        dummy = load_format == "dummy"
        what = "random weights (--load-format dummy)" if dummy else "a Hugging Face checkpoint"
        return fallback(
            f"{what}, no 4-bit weights to keep; --quantization int8 is faster (+1.36% "
            "perplexity on the default model)"
        )
    types = gguf_linear_types(source.path)
    if not types or not types <= {"Q4_0", "Q4_1"}:
        found = ", ".join(sorted(types)) or "none"
        return fallback(
            f"GGUF layer linears in {found}, not all Q4_0/Q4_1: gguf mode's quality is "
            "measured on those only; --quantization gguf to run it anyway"
        )
    why_not = _native_unavailable()
    if why_not is not None:
        return fallback(f"GGUF file, but no native kernels ({why_not})")
    return ModeChoice(
        "gguf",
        "gguf",
        f"auto: GGUF file of {'/'.join(sorted(types))} linears, native 4-bit kernels; "
        f"perplexity {GGUF_PPL_DELTA} vs float32 on alice29.txt; --quantization none for "
        "exact float32",
    )


def resolve_mode(
    config: ModelConfig, source: ModelSource, device: torch.device, dtype: torch.dtype
) -> tuple[ModelConfig, ModeChoice]:
    """`config` with `quantization` made concrete (never "auto"), and the choice."""
    choice = choose_mode(config, source, device, dtype)
    return replace(config, quantization=choice.quantization), choice


def resolve_engine_mode(
    config: ShoalConfig, source: ModelSource, device: torch.device, dtype: torch.dtype
) -> ShoalConfig:
    """An engine's config with its mode made concrete; logs the choice and its reason once
    (an engine calls this once, when it loads the model)."""
    model_config, choice = resolve_mode(config.model, source, device, dtype)
    logger.info("%s", choice.describe())
    return replace(config, model=model_config)
