"""Build a `tokenizers.Tokenizer` from a GGUF file's tokenizer metadata (byte-level BPE)."""

from __future__ import annotations

from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer

from shoal.logger import init_logger

logger = init_logger(__name__)

# llama.cpp token types (tokenizer.ggml.token_type).
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _gpt2() -> pre_tokenizers.PreTokenizer:
    # ByteLevel's built-in regex is GPT-2's.
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_then_gpt2() -> pre_tokenizers.PreTokenizer:
    # What SmolLM's / StarCoder's tokenizer.json do, and llama.cpp's "\p{N}" then GPT-2 split:
    # every digit stands alone, so a whitespace run before a digit stays one piece.
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2()])


def _split_then_bytes(pattern: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


# tokenizer.ggml.pre -> the pre-tokenizer its vocabulary was trained with.
PRE_TOKENIZERS: dict[str, Any] = {
    "default": _gpt2,
    "gpt-2": _gpt2,
    "gpt2": _gpt2,
    "olmo": _gpt2,
    "smollm": _digits_then_gpt2,
    "starcoder": _digits_then_gpt2,
    "refact": _digits_then_gpt2,
    "codeshell": _digits_then_gpt2,
    "llama-bpe": lambda: _split_then_bytes(_LLAMA3_SPLIT),
    "llama3": lambda: _split_then_bytes(_LLAMA3_SPLIT),
    "smaug-bpe": lambda: _split_then_bytes(_LLAMA3_SPLIT),
    "qwen2": lambda: _split_then_bytes(_QWEN2_SPLIT),
}


def build_gguf_backend(metadata: dict[str, Any], path: str) -> BackendTokenizer:
    """The tokenizer a GGUF file describes (`metadata`: `GGUFFile(path).all_metadata()`): BPE
    over its tokens and merges, the pre-tokenizer named by `tokenizer.ggml.pre`, byte-level
    decoding, control tokens as special tokens and user-defined tokens as added tokens.
    `ValueError` for a model type other than `gpt2`."""
    model_type = metadata.get("tokenizer.ggml.model")
    if model_type != "gpt2":
        raise ValueError(
            f"tokenizer: {path!r} holds a {model_type!r} tokenizer; only byte-level BPE ('gpt2') "
            "GGUF tokenizers are supported (pass --tokenizer with a Hugging Face directory)"
        )
    tokens: list[str] = metadata["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in metadata.get("tokenizer.ggml.merges", [])]
    vocab = {token: i for i, token in enumerate(tokens)}
    backend = BackendTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    pre = metadata.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        logger.warning("unknown GGUF pre-tokenizer %r; splitting text as GPT-2 does", pre)
    backend.pre_tokenizer = PRE_TOKENIZERS.get(pre, _gpt2)()
    if pre == "qwen2":
        backend.normalizer = normalizers.NFC()
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    _add_typed_tokens(backend, tokens, metadata.get("tokenizer.ggml.token_type") or [])
    return backend


def _add_typed_tokens(backend: BackendTokenizer, tokens: list[str], types: list[int]) -> None:
    """Control tokens (`<|im_end|>`) match whole and count as special; user-defined ones match
    whole and are decoded like text."""
    control = [
        AddedToken(t, special=True, normalized=False)
        for t, kind in zip(tokens, types, strict=False)
        if kind == TOKEN_TYPE_CONTROL
    ]
    user = [
        AddedToken(t, special=False, normalized=False)
        for t, kind in zip(tokens, types, strict=False)
        if kind == TOKEN_TYPE_USER_DEFINED
    ]
    if control:
        backend.add_special_tokens(control)
    if user:
        backend.add_tokens(user)


def token_string(metadata: dict[str, Any], key: str) -> str | None:
    """The token text that `tokenizer.ggml.<key>` (an id) names, or None."""
    token_id = metadata.get(f"tokenizer.ggml.{key}")
    tokens: list[str] = metadata["tokenizer.ggml.tokens"]
    if token_id is None or not 0 <= token_id < len(tokens):
        return None
    return tokens[token_id]
