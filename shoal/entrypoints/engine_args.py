"""The model and engine flags shared by `shoal serve`, `shoal generate` and `shoal chat`.

Defaults come from the config dataclasses' fields, so the CLI never drifts from the config.
Torch-free and cheap to import.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import msgspec

from shoal.config import (
    DEVICES,
    DTYPES,
    KV_CACHE_DTYPES,
    LOAD_FORMATS,
    QUANTIZATION_CHOICES,
    CacheConfig,
    ModelConfig,
    SchedulerConfig,
)

ArgGroup = argparse.ArgumentParser | argparse._ArgumentGroup


def config_default(cls: type, name: str) -> Any:
    """The default of field `name` of a config dataclass or msgspec struct."""
    fields: Any = (
        dataclasses.fields(cls) if dataclasses.is_dataclass(cls) else msgspec.structs.fields(cls)
    )
    for f in fields:
        if f.name == name:
            return f.default
    raise KeyError(f"{cls.__name__} has no field {name!r}")


def add_model_args(g: ArgGroup) -> None:
    """--tokenizer, --dtype, --load-format, --max-model-len, --device, --quantization."""
    g.add_argument(
        "--tokenizer",
        default=config_default(ModelConfig, "tokenizer"),
        help="tokenizer source when it differs from the model",
    )
    g.add_argument(
        "--dtype",
        default=config_default(ModelConfig, "dtype"),
        choices=DTYPES,
        help="weight and activation dtype (default: %(default)s)",
    )
    g.add_argument(
        "--load-format",
        default=config_default(ModelConfig, "load_format"),
        choices=LOAD_FORMATS,
        help="how to load weights; dummy = random weights (default: %(default)s)",
    )
    g.add_argument(
        "--max-model-len",
        type=int,
        default=config_default(ModelConfig, "max_model_len"),
        help="context length (default: the model's own)",
    )
    g.add_argument(
        "--device",
        default=config_default(ModelConfig, "device"),
        choices=DEVICES,
        help="device the model runs on (default: %(default)s)",
    )
    g.add_argument(
        "--quantization",
        default=config_default(ModelConfig, "quantization"),
        choices=QUANTIZATION_CHOICES,
        help="auto = gguf for a .gguf model of Q4_0/Q4_1 linears where shoal's native CPU "
        "kernels load (the default model: perplexity +0.44%% vs float32, the fastest mode "
        "within 1%%, docs/performance.md), else none; none = weights in --dtype, the exact "
        "path; int8 = int8 weights and per-token int8 activations for every linear layer and "
        "the LM head (+1.36%%); gguf = a .gguf model's 4-bit linear weights kept 4-bit (Q4_0/"
        "Q4_1 blocks, per-block int8 activations; the LM head int8). int8 and gguf: CPU, "
        "float32 only; greedy text drifts from float32's. The engine logs the mode it runs "
        "(default: %(default)s)",
    )


def add_engine_args(g: ArgGroup) -> None:
    """Scheduler and KV-cache flags."""
    g.add_argument(
        "--max-num-seqs",
        type=int,
        default=config_default(SchedulerConfig, "max_num_seqs"),
        help="cap on running sequences per engine (default: %(default)s)",
    )
    g.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=config_default(SchedulerConfig, "max_num_batched_tokens"),
        help="token budget of one engine step: prompt chunks plus one token per running "
        "request (default: 512 on CPU, 2048 on CUDA; a larger budget prefills a burst of "
        "prompts in fewer, longer steps)",
    )
    g.add_argument(
        "--block-size",
        type=int,
        default=config_default(CacheConfig, "block_size"),
        help="tokens per KV-cache block (default: %(default)s)",
    )
    g.add_argument(
        "--num-blocks",
        type=int,
        default=config_default(CacheConfig, "num_blocks"),
        help="exact number of KV blocks (overrides --kv-cache-memory-bytes)",
    )
    g.add_argument(
        "--kv-cache-memory-bytes",
        type=int,
        default=config_default(CacheConfig, "kv_cache_memory_bytes"),
        help="memory given to each engine's KV cache (default: %(default)s)",
    )
    g.add_argument(
        "--kv-cache-dtype",
        choices=KV_CACHE_DTYPES,
        default=config_default(CacheConfig, "kv_cache_dtype"),
        help="KV cache storage: auto = the model's dtype, except float16 for a float32 model "
        "in int8 or gguf mode; float16 halves the memory and the bytes decode attention reads, "
        "rounding keys and values (default: %(default)s)",
    )
    g.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=config_default(CacheConfig, "enable_prefix_caching"),
        help="reuse the KV blocks of earlier prompts' common prefixes; "
        "--no-enable-prefix-caching turns it off (default: on)",
    )
