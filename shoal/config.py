"""Frozen configuration dataclasses, one per concern, plus the aggregate `ShoalConfig`.

Validation lives in `__post_init__` and raises `ValueError` naming the CLI flag, so the CLI,
the offline `LLM` and the server report bad settings the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

DTYPES = ("float32", "bfloat16", "float16", "auto")
LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
DEVICES = ("cpu", "cuda", "auto")
# Weight quantizations applied at load (None = weights kept in `dtype`).
QUANTIZATIONS = ("int8", "gguf")
# KV cache storage: "auto" = the model's dtype, except float16 for float32 models with quantized
# weights (see `kv_cache_torch_dtype`); "float16" halves the bytes attention reads.
KV_CACHE_DTYPES = ("auto", "float32", "float16")


def _check(cond: bool, flag: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"{flag}: {msg}")


@dataclass(frozen=True)
class ModelConfig:
    # Path to a Hugging Face directory or a .gguf file; None = the embedded default model.
    model: str | None = None
    # Tokenizer source when it differs from `model` (a directory or .gguf file).
    tokenizer: str | None = None
    dtype: str = "float32"
    load_format: str = "auto"
    # None = the model's own context length (max_position_embeddings).
    max_model_len: int | None = None
    device: str = "cpu"
    seed: int = 0
    # The name clients use in the `model` field; None = derived from the model path.
    served_model_name: str | None = None
    # "int8": every Linear of the layers and the LM head as int8 (per-output-channel weight
    # scales, per-token activation scales; CPU float32 only). "gguf": a GGUF model's 4-bit
    # Linear weights kept as its 4-bit blocks (the LM head int8; CPU float32 only).
    # None = unquantized.
    quantization: str | None = None

    def __post_init__(self) -> None:
        _check(self.dtype in DTYPES, "--dtype", f"must be one of {DTYPES}, got {self.dtype!r}")
        _check(
            self.quantization is None or self.quantization in QUANTIZATIONS,
            "--quantization",
            f"must be one of {QUANTIZATIONS} or None, got {self.quantization!r}",
        )
        _check(
            self.quantization is None
            or (self.dtype in ("float32", "auto") and self.device in ("cpu", "auto")),
            "--quantization",
            f"{self.quantization} needs --dtype float32 and --device cpu",
        )
        _check(
            self.load_format in LOAD_FORMATS,
            "--load-format",
            f"must be one of {LOAD_FORMATS}, got {self.load_format!r}",
        )
        _check(self.device in DEVICES, "--device", f"must be one of {DEVICES}, got {self.device!r}")
        if self.max_model_len is not None:
            _check(self.max_model_len > 0, "--max-model-len", "must be positive")


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    # Memory given to the KV cache; the number of blocks follows from it.
    kv_cache_memory_bytes: int = 1 << 30
    # Exact number of KV blocks (overrides kv_cache_memory_bytes; tests use it to force
    # preemption).
    num_blocks: int | None = None
    enable_prefix_caching: bool = True
    # "auto", "float32" or "float16" (keys and values rounded to half precision when written;
    # attention still computes in the model's dtype). "auto" is the model's dtype, except
    # float16 when a float32 model's weights are quantized (`--quantization int8` or `gguf`):
    # docs/engine-runner.md, "KV cache dtype".
    kv_cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        _check(
            self.kv_cache_dtype in KV_CACHE_DTYPES,
            "--kv-cache-dtype",
            f"must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}",
        )
        _check(
            self.block_size > 0 and self.block_size & (self.block_size - 1) == 0,
            "--block-size",
            "must be a positive power of two",
        )
        _check(self.kv_cache_memory_bytes > 0, "--kv-cache-memory-bytes", "must be positive")
        if self.num_blocks is not None:
            _check(self.num_blocks > 0, "--num-blocks", "must be positive")


# The token budget of a step when none is given, by device. vLLM's 2048 suits a GPU, whose
# 2048-token prefill takes tens of milliseconds; on the 2-core CPU it takes ~1.5 s, during which
# every running request waits for its next token and every prompt of the wave waits for its
# first: at 16 concurrent 128-token requests TTFT p50 was 1.4-1.6 s with 2048 and 0.65-0.7 s
# with 512, at the same throughput (docs/performance.md, "Token budget").
DEFAULT_TOKEN_BUDGET = {"cpu": 512, "cuda": 2048}


@dataclass(frozen=True)
class SchedulerConfig:
    # Token budget of one step (prefill chunks + decode tokens); None: by device
    # (DEFAULT_TOKEN_BUDGET), see `token_budget`.
    max_num_batched_tokens: int | None = None
    # Cap on running sequences.
    max_num_seqs: int = 128
    enable_chunked_prefill: bool = True

    def __post_init__(self) -> None:
        _check(
            self.max_num_batched_tokens is None or self.max_num_batched_tokens > 0,
            "--max-num-batched-tokens",
            "must be positive",
        )
        _check(self.max_num_seqs > 0, "--max-num-seqs", "must be positive")

    def token_budget(self, device_type: str, max_model_len: int) -> int:
        """The budget this config means on `device_type` ("cpu", "cuda"): the one given, else
        the device's default, raised to `max_model_len` when prompts cannot be chunked."""
        if self.max_num_batched_tokens is not None:
            return self.max_num_batched_tokens
        budget = DEFAULT_TOKEN_BUDGET.get(device_type, DEFAULT_TOKEN_BUDGET["cuda"])
        return budget if self.enable_chunked_prefill else max(budget, max_model_len)

    def resolved(self, device_type: str, max_model_len: int) -> SchedulerConfig:
        """This config with `max_num_batched_tokens` set (see `token_budget`)."""
        return replace(self, max_num_batched_tokens=self.token_budget(device_type, max_model_len))


@dataclass(frozen=True)
class ParallelConfig:
    data_parallel_size: int = 1
    api_server_count: int = 1

    def __post_init__(self) -> None:
        _check(self.data_parallel_size >= 1, "--data-parallel-size", "must be at least 1")
        _check(self.api_server_count >= 0, "--api-server-count", "must be at least 0")


@dataclass(frozen=True)
class ShoalConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
