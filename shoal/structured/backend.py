"""xgrammar behind a small interface: the tokenizer's vocabulary as xgrammar sees it, one
compiler with its cache, per-request matchers and the token bitmask (imports torch)."""

from __future__ import annotations

import json
from typing import Any

import torch
import xgrammar as xgr

from shoal.logger import init_logger
from shoal.processing.tokenizer import Tokenizer
from shoal.structured.params import StructuredOutputsParams

logger = init_logger(__name__)

# Any JSON object, properties free (response_format json_object).
_ANY_OBJECT = '{"type": "object"}'


class XgrammarBackend:
    """Compiles specs for one model's vocabulary. `compile` is thread-safe (xgrammar's
    compiler is) and the slow part; matchers and masks are per step."""

    def __init__(self, tokenizer_name: str | None, vocab_size: int) -> None:
        """`vocab_size`: the model's logits width (masks cover it; ids past the tokenizer's
        vocabulary are never allowed)."""
        tokenizer = Tokenizer.from_model(tokenizer_name)
        self.vocab_size = vocab_size
        self.stop_token_ids = list(tokenizer.eos_token_ids)
        self.tokenizer_info = _tokenizer_info(tokenizer, vocab_size)
        # One compile thread already runs per engine (the manager's): xgrammar's own pool
        # would only compete with the engine's step for the CPU.
        self.compiler = xgr.GrammarCompiler(self.tokenizer_info, max_threads=1)

    def compile(self, params: StructuredOutputsParams) -> xgr.CompiledGrammar:
        """The compiled grammar; `ValueError` with xgrammar's reason for a bad spec."""
        try:
            return self._compile(params)
        except (RuntimeError, ValueError) as e:
            raise ValueError(f"{_field(params)}: {_reason(e)}") from e

    def _compile(self, params: StructuredOutputsParams) -> xgr.CompiledGrammar:
        kind = params.kind
        if kind == "json":
            # No free whitespace: a model cannot pad the output with it until max_tokens.
            assert params.json is not None
            return self.compiler.compile_grammar(json_schema_grammar(params.json))
        if kind == "json_object":
            return self.compiler.compile_json_schema(
                _ANY_OBJECT, any_whitespace=False, strict_mode=False
            )
        if kind == "regex":
            assert params.regex is not None
            return self.compiler.compile_regex(params.regex)
        if kind == "choice":
            alternatives = " | ".join(
                json.dumps(c, ensure_ascii=False) for c in params.choice or []
            )
            return self.compiler.compile_grammar(f"root ::= {alternatives}")
        assert params.grammar is not None
        return self.compiler.compile_grammar(params.grammar)

    def matcher(self, compiled: xgr.CompiledGrammar, eos_token_id: int | None) -> Any:
        """A fresh matcher; the grammar ends with the request's EOS (the engine stops there)."""
        stop = [eos_token_id] if eos_token_id is not None else None
        return xgr.GrammarMatcher(compiled, override_stop_tokens=stop)

    def allocate_bitmask(self, num_rows: int) -> torch.Tensor:
        """[num_rows, ceil(vocab_size / 32)] int32: bit j of word w allows token 32 w + j."""
        return xgr.allocate_token_bitmask(num_rows, self.vocab_size)


# xgrammar 0.2.9 writes a length-bounded JSON string ({"type": "string", "maxLength": n}) as
# a repetition of this class, which admits raw control characters: invalid JSON (a
# random-weight model wrote a tab). The repetition stays (fast: ~15 us a mask inside a
# 400-character string; a regex pattern instead took ~15 ms), the class loses the control
# characters. Escapes stay out, as xgrammar has them: that only narrows the outputs.
_LOOSE_CHARS = '[^\\"\\\\\\r\\n]'
_JSON_CHARS = '[^\\"\\\\\\0-\\x1f]'


def json_schema_grammar(schema: str) -> xgr.Grammar:
    """The grammar of a JSON schema (no free whitespace, strict), with valid JSON strings."""
    grammar = xgr.Grammar.from_json_schema(schema, any_whitespace=False, strict_mode=True)
    text = str(grammar)
    if _LOOSE_CHARS not in text:
        return grammar
    return xgr.Grammar.from_ebnf(text.replace(_LOOSE_CHARS, _JSON_CHARS))


def _tokenizer_info(tokenizer: Tokenizer, vocab_size: int) -> xgr.TokenizerInfo:
    """xgrammar's view of a `tokenizers` tokenizer: every id's token string (raw, as the
    vocabulary stores it) and the encoding (byte-level, byte-fallback, ...) read from its
    JSON, as xgrammar's `from_huggingface` does without needing transformers' wrapper."""
    metadata = xgr.TokenizerInfo._detect_metadata_from_hf(tokenizer.backend.to_str())
    encoded = [""] * vocab_size
    for token, token_id in tokenizer.backend.get_vocab(with_added_tokens=True).items():
        if token_id < vocab_size:
            encoded[token_id] = token
    return xgr.TokenizerInfo(
        encoded,
        metadata["vocab_type"],
        vocab_size=vocab_size,
        stop_token_ids=list(tokenizer.eos_token_ids) or None,
        add_prefix_space=metadata["add_prefix_space"],
    )


def _field(params: StructuredOutputsParams) -> str:
    return {"json": "guided_json", "json_object": "response_format"}.get(
        params.kind, f"guided_{params.kind}"
    )


def _reason(error: Exception) -> str:
    # xgrammar prefixes "[hh:mm:ss] /path/file.cc:123: ": the client needs the rest.
    text = str(error).strip()
    if text.startswith("[") and ": " in text:
        head, _, rest = text.partition(": ")
        if ".cc:" in head or ".h:" in head:
            text = rest
    return text.splitlines()[0][:300] if text else type(error).__name__
