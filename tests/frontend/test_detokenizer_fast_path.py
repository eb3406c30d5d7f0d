"""The detokenizer's plain-token fast path gives the same text as the decode stream."""

from __future__ import annotations

import random

import pytest
from tokenizers.decoders import DecodeStream

from shoal.processing.detokenizer import IncrementalDetokenizer, decode_context
from shoal.processing.tokenizer import Tokenizer


def _stream_only(tok: Tokenizer, prompt: list[int], ids: list[list[int]], skip: bool) -> str:
    """What the decode stream alone yields (the behaviour before the fast path)."""
    stream = DecodeStream(ids=decode_context(tok, prompt), skip_special_tokens=skip)
    pieces = []
    for chunk in ids:
        for token_id in chunk:
            piece = stream.step(tok.backend, token_id)
            if piece:
                pieces.append(piece)
    return "".join(pieces)


def test_plain_token_text_matches_decode(default_tokenizer: Tokenizer) -> None:
    tok = default_tokenizer
    plain = 0
    for token_id in range(0, tok.vocab_size, 7):
        text = tok.plain_token_text(token_id)
        if text is not None:
            plain += 1
            assert text == tok.decode([token_id], skip_special_tokens=False)
            assert text.encode() == tok.token_bytes(token_id)
    assert plain > tok.vocab_size // 7 // 2  # most of a byte-level vocabulary is plain
    for special in tok.all_special_ids:
        assert tok.plain_token_text(special) is None


@pytest.mark.parametrize("skip", [True, False])
def test_fast_path_equals_decode_stream(default_tokenizer: Tokenizer, skip: bool) -> None:
    tok = default_tokenizer
    rng = random.Random(7)
    vocab = tok.vocab_size
    # Tokens that are not plain: byte tokens of multi-byte characters, special tokens.
    not_plain = [i for i in range(vocab) if tok.plain_token_text(i) is None]
    for _ in range(400):
        prompt = [rng.randrange(vocab) for _ in range(rng.randrange(1, 10))]
        generated = [
            rng.choice(not_plain) if rng.random() < 0.3 else rng.randrange(vocab)
            for _ in range(rng.randrange(1, 25))
        ]
        chunks, i = [], 0
        while i < len(generated):
            k = rng.randrange(1, 4)
            chunks.append(generated[i : i + k])
            i += k
        try:
            expected = _stream_only(tok, prompt, chunks, skip)
        except Exception:
            continue  # the stream itself rejects some broken byte sequences
        detok = IncrementalDetokenizer(tok, prompt, skip)
        assert "".join(detok.update(chunk) for chunk in chunks) == expected


def test_multibyte_character_split_over_tokens(default_tokenizer: Tokenizer) -> None:
    tok = default_tokenizer
    text = "héllo wörld — ünïcödé ✓ 漢字 🙂 done"
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, tok.encode("Say:", add_special_tokens=False), True)
    pieces = [detok.update([t]) for t in ids]
    assert "".join(pieces) == text
