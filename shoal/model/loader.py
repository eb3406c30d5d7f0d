"""Build a `LlamaForCausalLM` and fill its weights: HF safetensors, GGUF, or dummy random."""

from __future__ import annotations

import glob
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator

import torch
from tqdm import tqdm

from shoal.config import ModelConfig
from shoal.logger import init_logger
from shoal.model.arch import ArchConfig
from shoal.model.int8 import quantize_int8
from shoal.model.llama import Linear, LlamaForCausalLM
from shoal.model.rotary import rope_inv_freq
from shoal.model_source import ModelSource

logger = init_logger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# GGUF tensor name (after "blk.N.") -> Hugging Face name (after "model.layers.N.").
_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


def resolve_device(device: str) -> torch.device:
    """`--device`: "auto" = cuda when available, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device: cuda requested but torch sees no CUDA device")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`--dtype`: "auto" = float32 on CPU, bfloat16 on CUDA; float16 only on CUDA."""
    if dtype == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if dtype == "float16" and device.type == "cpu":
        raise ValueError("--dtype: float16 is supported on CUDA only; use bfloat16 or float32")
    if dtype not in _DTYPES:
        raise ValueError(f"--dtype: unknown dtype {dtype!r}")
    return _DTYPES[dtype]


def load_model(
    config: ModelConfig,
    source: ModelSource,
    arch: ArchConfig,
    max_positions: int,
    dtype: torch.dtype,
    device: torch.device,
) -> LlamaForCausalLM:
    """The model with weights from `source` per `config.load_format` ("auto" follows the
    source's format; "dummy" = random weights drawn from `config.seed`), quantized per
    `config.quantization` ("auto" resolved by shoal.model.mode). Shows progress on stderr and logs the duration. `ValueError` on a
    format mismatch, missing weights or an unsupported quantization."""
    start = time.perf_counter()
    if config.quantization == "auto":  # an engine resolves it first (resolve_engine_mode)
        from shoal.model.mode import resolve_mode

        config, _ = resolve_mode(config, source, device, dtype)
    quantization = config.quantization
    if quantization and (device.type != "cpu" or dtype != torch.float32):
        raise ValueError(f"--quantization: {quantization} needs --device cpu and --dtype float32")
    load_format = config.load_format
    if load_format == "auto":
        load_format = "gguf" if source.is_gguf else "safetensors"
    if quantization == "gguf" and load_format != "gguf":
        raise ValueError(
            "--quantization gguf keeps a GGUF file's 4-bit weights: it needs a .gguf model "
            f"(--model path/to/model.gguf) loaded as GGUF; {source.path!r} is loaded as "
            f"{load_format}"
        )
    if load_format == "gguf" and not source.is_gguf:
        raise ValueError(f"--load-format gguf: {source.path!r} is not a .gguf file")
    if load_format == "safetensors" and source.is_gguf:
        raise ValueError(f"--load-format safetensors: {source.path!r} is a .gguf file")
    with torch.device(device):
        model = LlamaForCausalLM(arch, max_positions, dtype, device)
    if load_format == "dummy":
        _fill_dummy(model, config.seed)
    elif load_format == "gguf":
        # --quantization gguf: each Linear's 4-bit blocks by Hugging Face name, kept beside
        # the dequantized float32 weights (calibration and fallbacks use those).
        sink: dict[str, torch.Tensor] | None = {} if quantization == "gguf" else None
        _load_named(model, arch, _gguf_weights(source.path, arch, model, sink))
    else:
        _load_named(model, arch, _safetensors_weights(source.path))
    num_params = sum(p.numel() for p in model.parameters())
    if quantization == "int8":
        quantize_int8(model)
    elif quantization == "gguf":
        from shoal.model.gguf_quant import quantize_gguf

        quantize_gguf(model, _fused_blocks(sink or {}))
    model.eval()
    logger.info(
        "loaded %s (%s weights, %.1fM parameters, %s%s on %s) in %.2f s",
        source.name, load_format, num_params / 1e6, str(dtype).removeprefix("torch."),
        f" + {quantization} linears" if quantization else "", device,
        time.perf_counter() - start,
    )  # fmt: skip
    return model


def _progress(total: int, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, unit="tensor", file=sys.stderr, leave=False)


def _safetensors_weights(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ValueError(f"--model: {path!r} has no *.safetensors file (try --load-format dummy)")
    handles = [safe_open(f, framework="pt") for f in files]
    names = [(h, name) for h in handles for name in h.keys()]  # noqa: SIM118 (not a dict)
    with _progress(len(names), "Loading safetensors") as bar:
        for handle, name in names:
            yield name, handle.get_tensor(name)
            bar.update()


def _gguf_weights(
    path: str,
    arch: ArchConfig,
    model: LlamaForCausalLM,
    q4_sink: dict[str, torch.Tensor] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Dequantised GGUF tensors under Hugging Face names (q/k rows un-permuted). With
    `q4_sink`, also the layer Linears' 4-bit weights as Q4_1 blocks ([rows, K / 32, 20],
    rows un-permuted the same way) under their Hugging Face names."""
    from shoal.gguf_file import GGUFFile
    from shoal.model.gguf_dequant import dequantize
    from shoal.model.gguf_quant import q4_1_rows

    gguf = GGUFFile(path)
    with _progress(len(gguf.tensors), "Loading GGUF") as bar:
        for name, info in gguf.tensors.items():
            tensor = dequantize(gguf.raw(name), info.qtype, info.shape)
            bar.update()
            if name == "rope_freqs.weight":
                # llama3-style scaling in GGUF: per-frequency divisors instead of metadata.
                inv_freq = rope_inv_freq(arch) / tensor
                model.rotary.set_inv_freq(inv_freq.to(model.rotary.cos_table.device))
                continue
            hf_name = _hf_name_of_gguf(name)
            blocks = None
            if q4_sink is not None and _is_layer_linear_weight(hf_name):
                blocks = q4_1_rows(gguf.raw(name), info.qtype)
            heads = {".attn_q.": arch.num_heads, ".attn_k.": arch.num_kv_heads}
            for part, num_heads in heads.items():
                if part in name:
                    tensor = _unpermute_rope_rows(tensor, num_heads)
                    blocks = None if blocks is None else _unpermute_rope_rows(blocks, num_heads)
            if q4_sink is not None and blocks is not None:
                q4_sink[hf_name] = blocks
            yield hf_name, tensor


def _is_layer_linear_weight(hf_name: str) -> bool:
    m = re.fullmatch(r"model\.layers\.\d+\.(.+)\.weight", hf_name)
    return m is not None and m.group(1) in _FUSED_ROWS


def _fused_blocks(sink: dict[str, torch.Tensor]) -> dict[tuple[int, str], torch.Tensor]:
    """The 4-bit blocks of each fused Linear ((layer index, our Linear's name) -> Q4_1 blocks
    [rows, K / 32, 20], shards concatenated in row order), for the Linears whose every shard
    is 4-bit; the others are left out (they take the int8 path)."""
    shards: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    for hf_name, blocks in sink.items():
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", hf_name)
        assert m is not None  # the sink only holds layer Linear weights
        linear_name, shard, _ = _FUSED_ROWS[m.group(2)]
        shards.setdefault((int(m.group(1)), linear_name), {})[shard] = blocks
    num_shards = Counter(linear_name for linear_name, _, _ in _FUSED_ROWS.values())
    return {
        key: torch.cat([parts[i] for i in range(len(parts))])
        for key, parts in shards.items()
        if len(parts) == num_shards[key[1]]
    }


def _hf_name_of_gguf(name: str) -> str:
    base, _, suffix = name.rpartition(".")  # suffix: weight / bias
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    if m and m.group(2) in _GGUF_LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_GGUF_LAYER_NAMES[m.group(2)]}.{suffix}"
    if base in _GGUF_GLOBAL_NAMES:
        return f"{_GGUF_GLOBAL_NAMES[base]}.{suffix}"
    raise ValueError(f"GGUF tensor {name!r} has no counterpart in the Llama model")


def _unpermute_rope_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's converter, which reorders each head's q/k rows from rotate-half
    (pairs (i, i + d/2)) to interleaved (pairs (2i, 2i + 1)) for its rope kernel:
    rows viewed [heads, d/2, 2] are transposed back to [heads, 2, d/2]."""
    half = weight.shape[0] // num_heads // 2
    rows = weight.reshape(num_heads, half, 2, *weight.shape[1:])
    return rows.transpose(1, 2).reshape(weight.shape)


def _load_named(
    model: LlamaForCausalLM, arch: ArchConfig, weights: Iterator[tuple[str, torch.Tensor]]
) -> None:
    """Copy Hugging Face-named tensors into the (fused) parameters; every row of every
    parameter must be written exactly once."""
    rows_loaded = {id(p): 0 for p in model.parameters()}
    for name, tensor in weights:
        target = _target(model, arch, name)
        if target is None:
            continue
        param, offset, num_rows = target
        rows = param.data[offset : offset + num_rows]
        if rows.shape != tensor.shape:
            raise ValueError(
                f"weight {name!r}: shape {tuple(tensor.shape)}, expected {tuple(rows.shape)}"
            )
        rows.copy_(tensor)
        rows_loaded[id(param)] += tensor.shape[0]
    missing = [n for n, p in model.named_parameters() if rows_loaded[id(p)] != p.shape[0]]
    if missing:
        raise ValueError(f"checkpoint lacks weights for {', '.join(missing[:8])}")


# Hugging Face projection -> (our fused Linear, its shard index, shard sizes in rows).
_FUSED_ROWS: dict[str, tuple[str, int, Callable[[ArchConfig], list[int]]]] = {
    "self_attn.q_proj": ("qkv_proj", 0, lambda a: _qkv_rows(a)),
    "self_attn.k_proj": ("qkv_proj", 1, lambda a: _qkv_rows(a)),
    "self_attn.v_proj": ("qkv_proj", 2, lambda a: _qkv_rows(a)),
    "self_attn.o_proj": ("o_proj", 0, lambda a: [a.hidden_size]),
    "mlp.gate_proj": ("gate_up_proj", 0, lambda a: [a.intermediate_size] * 2),
    "mlp.up_proj": ("gate_up_proj", 1, lambda a: [a.intermediate_size] * 2),
    "mlp.down_proj": ("down_proj", 0, lambda a: [a.hidden_size]),
}


def _qkv_rows(arch: ArchConfig) -> list[int]:
    kv = arch.num_kv_heads * arch.head_dim
    return [arch.num_heads * arch.head_dim, kv, kv]


_NORMS = ("input_layernorm", "post_attention_layernorm")


def _target(
    model: LlamaForCausalLM, arch: ArchConfig, name: str
) -> tuple[torch.Tensor, int, int] | None:
    """(parameter, first row, number of rows) a Hugging Face tensor goes to; None for
    tensors to skip."""
    key = name.removeprefix("model.")
    if key == "embed_tokens.weight":
        return _whole(model.embed_tokens)
    if key == "norm.weight":
        return _whole(model.norm.weight)
    if key == "lm_head.weight":  # also present in some tied checkpoints: ignored then
        head = model.lm_head
        return _whole(head.weight) if isinstance(head, Linear) else None
    m = re.fullmatch(r"layers\.(\d+)\.(.+)\.(weight|bias|inv_freq)", key)
    if m and int(m.group(1)) < arch.num_layers:
        layer, module, kind = model.layers[int(m.group(1))], m.group(2), m.group(3)
        if module.endswith("rotary_emb"):
            return None
        if module in _NORMS and kind == "weight":
            return _whole(getattr(layer, module).weight)
        if module in _FUSED_ROWS:
            linear_name, shard, sizes = _FUSED_ROWS[module]
            param = getattr(getattr(layer, linear_name), kind, None)
            if param is not None:
                rows = sizes(arch)
                return param, sum(rows[:shard]), rows[shard]
    raise ValueError(f"checkpoint tensor {name!r} has no counterpart in the model")


def _whole(param: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    return param, 0, param.shape[0]


def _fill_dummy(model: LlamaForCausalLM, seed: int) -> None:
    """Norm weights 1, everything else N(0, 0.02), drawn on the CPU from `seed` so the values
    do not depend on the device or dtype."""
    generator = torch.Generator().manual_seed(seed)
    params = list(model.named_parameters())
    with _progress(len(params), "Random weights") as bar:
        for name, param in params:
            if "norm" in name:
                param.data.fill_(1.0)
            else:
                param.data.copy_(torch.empty(param.shape).normal_(0.0, 0.02, generator=generator))
            bar.update()
