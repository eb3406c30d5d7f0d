"""`Tokenizer`: one model's tokenizer (Hugging Face directory or GGUF file), torch-free."""

from __future__ import annotations

import json
import os
from functools import lru_cache
from typing import Any

from tokenizers import AddedToken, decoders, processors
from tokenizers import Tokenizer as BackendTokenizer

from shoal.gguf_file import GGUFFile
from shoal.logger import init_logger
from shoal.model_source import resolve_model
from shoal.processing.chat_template import render_chat
from shoal.processing.gguf_tokenizer import build_gguf_backend, token_string

logger = init_logger(__name__)

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


class Tokenizer:
    """Encode, decode and render chat templates for one model.

    Wraps a `tokenizers.Tokenizer` (`.backend`) plus what Hugging Face keeps beside it: the
    chat template, the special token strings and the end-of-sequence ids (from
    generation_config.json when the model has one)."""

    def __init__(
        self,
        backend: BackendTokenizer,
        *,
        chat_template: str | None = None,
        special_tokens: dict[str, str | None] | None = None,
        eos_token_ids: list[int] | None = None,
        name_or_path: str = "",
    ) -> None:
        self.backend = backend
        self.chat_template = chat_template
        self.special_tokens = {
            name: (special_tokens or {}).get(name) for name in SPECIAL_TOKEN_NAMES
        }
        self.name_or_path = name_or_path
        eos = self.special_tokens["eos_token"]
        if eos_token_ids is None:
            eos_id = backend.token_to_id(eos) if eos else None
            eos_token_ids = [eos_id] if eos_id is not None else []
        self.eos_token_ids = list(eos_token_ids)
        added = backend.get_added_tokens_decoder()
        self.all_special_ids = sorted(i for i, tok in added.items() if tok.special)
        self.all_special_tokens = [added[i].content for i in self.all_special_ids]
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self._is_byte_level = isinstance(backend.decoder, decoders.ByteLevel)
        self.token_text = lru_cache(maxsize=1 << 16)(self._token_text)
        # token id -> its text when decoding it never depends on its neighbours (see
        # `plain_token_text`); filled lazily.
        self.plain_texts: dict[int, str | None] = {}
        self._added_ids = frozenset(added)

    # ----------------------------------------------------------------------------- loading

    @classmethod
    def from_model(cls, model: str | None) -> Tokenizer:
        """The tokenizer of `model` (None = the default model): a Hugging Face directory with
        tokenizer.json or a .gguf file, resolved by `shoal.model_source.resolve_model`."""
        source = resolve_model(model)
        if source.is_gguf:
            return cls.from_gguf(source.path)
        return cls.from_pretrained(source.path)

    @classmethod
    def from_gguf(cls, path: str) -> Tokenizer:
        """Build the tokenizer from a GGUF file's metadata (no tensors are read)."""
        metadata = GGUFFile(path).all_metadata()
        backend = build_gguf_backend(metadata, path)
        special = {
            name: token_string(metadata, key)
            for name, key in (
                ("bos_token", "bos_token_id"),
                ("eos_token", "eos_token_id"),
                ("unk_token", "unknown_token_id"),
                ("pad_token", "padding_token_id"),
            )
        }
        if metadata.get("tokenizer.ggml.add_bos_token") and special["bos_token"]:
            _add_bos_processor(backend, special["bos_token"])
        eos_ids = [
            metadata[k]
            for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")
            if metadata.get(k) is not None
        ]
        return cls(
            backend,
            chat_template=metadata.get("tokenizer.chat_template"),
            special_tokens=special,
            eos_token_ids=list(dict.fromkeys(eos_ids)),
            name_or_path=path,
        )

    @classmethod
    def from_pretrained(cls, path: str) -> Tokenizer:
        """Load a Hugging Face tokenizer directory (tokenizer.json, tokenizer_config.json,
        generation_config.json / config.json for the EOS ids)."""
        tokenizer_file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tokenizer_file):
            raise FileNotFoundError(f"tokenizer: {path!r} has no tokenizer.json")
        backend = BackendTokenizer.from_file(tokenizer_file)
        config = _read_json(os.path.join(path, "tokenizer_config.json"))
        special = {name: _token_content(config.get(name)) for name in SPECIAL_TOKEN_NAMES}
        bos = special["bos_token"]
        if config.get("add_bos_token") and bos and not _adds_bos(backend, bos):
            _add_bos_processor(backend, bos)
        return cls(
            backend,
            chat_template=_read_chat_template(path, config),
            special_tokens=special,
            eos_token_ids=_read_eos_ids(path, backend, special),
            name_or_path=path,
        )

    def save_pretrained(self, path: str) -> None:
        """Write tokenizer.json and tokenizer_config.json (chat template, special tokens) so
        `Tokenizer.from_pretrained(path)` and transformers' AutoTokenizer can load them."""
        os.makedirs(path, exist_ok=True)
        self.backend.save(os.path.join(path, "tokenizer.json"))
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "clean_up_tokenization_spaces": False,
            **{k: v for k, v in self.special_tokens.items() if v is not None},
        }
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)

    # ----------------------------------------------------------------------------- use

    @property
    def eos_token_id(self) -> int | None:
        return self.eos_token_ids[0] if self.eos_token_ids else None

    @property
    def bos_token_id(self) -> int | None:
        bos = self.special_tokens["bos_token"]
        return self.backend.token_to_id(bos) if bos else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special-token strings in the text map to their ids.
        `add_special_tokens` adds what the model's post-processor adds (BOS for Llama 2-style
        models, nothing for SmolLM)."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of `token_ids` (special tokens left out unless `skip_special_tokens=False`)."""
        return self.backend.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary entry (e.g. `Ġhello` in a byte-level vocabulary)."""
        return self.backend.id_to_token(token_id)

    def _token_text(self, token_id: int) -> str:
        return self.backend.decode([token_id], skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes one token stands for (a token may hold part of a UTF-8 character)."""
        token = self.backend.id_to_token(token_id)
        if token is None:
            return b""
        if self._is_byte_level and token_id not in self.backend.get_added_tokens_decoder():
            return bytes(_UNICODE_TO_BYTE.get(ch, 0) for ch in token)
        return self.token_text(token_id).encode("utf-8")

    def plain_token_text(self, token_id: int) -> str | None:
        """The token's text when it is "plain": a byte-level vocabulary entry (not an added
        token) whose bytes are complete UTF-8. Decoding a byte-level sequence concatenates
        its tokens' bytes, so such a token adds exactly this text after any text that ended
        on a character boundary. None otherwise (other decoders, partial characters)."""
        text = self.plain_texts.get(token_id, _UNKNOWN)
        if text is _UNKNOWN:
            text = None
            if self._is_byte_level and token_id not in self._added_ids:
                token = self.backend.id_to_token(token_id)
                if token is not None and all(ch in _UNICODE_TO_BYTE for ch in token):
                    try:
                        text = bytes(_UNICODE_TO_BYTE[ch] for ch in token).decode("utf-8")
                    except UnicodeDecodeError:
                        text = None
            self.plain_texts[token_id] = text
        return text

    def apply_chat_template(
        self,
        messages: Any,
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str:
        """The conversation rendered as prompt text (encode it with
        `add_special_tokens=False`: the template writes the special tokens itself).
        `ValueError` names a bad message field, or says the model has no chat template."""
        template = chat_template or self.chat_template
        if template is None:
            raise ValueError(
                f"chat_template: the tokenizer of {self.name_or_path!r} has none; "
                "pass one explicitly"
            )
        return render_chat(
            template,
            messages,
            add_generation_prompt=add_generation_prompt,
            special_tokens=self.special_tokens,
            **kwargs,
        )

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer({self.name_or_path!r}, vocab_size={self.vocab_size})"


def _byte_alphabet() -> dict[str, int]:
    """Inverse of GPT-2's byte -> printable character table (bytes_to_unicode)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


_UNICODE_TO_BYTE = _byte_alphabet()
_UNKNOWN: Any = object()


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


def _token_content(value: Any) -> str | None:
    # tokenizer_config.json spells a special token as a string or {"content": ...}.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_chat_template(path: str, config: dict[str, Any]) -> str | None:
    jinja_file = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja_file):
        with open(jinja_file, encoding="utf-8") as f:
            return f.read()
    template = config.get("chat_template") or _read_json(
        os.path.join(path, "chat_template.json")
    ).get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None


def _read_eos_ids(
    path: str, backend: BackendTokenizer, special: dict[str, str | None]
) -> list[int] | None:
    """EOS ids: generation_config.json, then config.json, then the tokenizer's eos_token."""
    for name in ("generation_config.json", "config.json"):
        eos = _read_json(os.path.join(path, name)).get("eos_token_id")
        if isinstance(eos, int):
            return [eos]
        if isinstance(eos, list) and eos and all(isinstance(i, int) for i in eos):
            return list(eos)
    eos_token = special["eos_token"]
    eos_id = backend.token_to_id(eos_token) if eos_token else None
    return [eos_id] if eos_id is not None else None


def _adds_bos(backend: BackendTokenizer, bos: str) -> bool:
    bos_id = backend.token_to_id(bos)
    return backend.encode("a", add_special_tokens=True).ids[:1] == [bos_id]


def _add_bos_processor(backend: BackendTokenizer, bos: str) -> None:
    """Make `encode(..., add_special_tokens=True)` start with BOS (add_bos_token)."""
    bos_id = backend.token_to_id(bos)
    if bos_id is None:
        backend.add_special_tokens([AddedToken(bos, special=True, normalized=False)])
        bos_id = backend.token_to_id(bos)
    template = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
    )
    existing = backend.post_processor
    backend.post_processor = (
        template if existing is None else processors.Sequence([existing, template])
    )
