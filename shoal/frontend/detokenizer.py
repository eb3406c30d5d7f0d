"""Incremental detokenization and stop-string matching for one generated sequence."""

from __future__ import annotations

from tokenizers.decoders import DecodeStream

from shoal.frontend.tokenizer import Tokenizer

# Prompt tokens the decode stream is primed with: enough for a decoder that strips the
# leading space of the first token (sentencepiece) to see it is not first.
PROMPT_CONTEXT_TOKENS = 6


class IncrementalDetokenizer:
    """Turns token ids, as they arrive, into text increments.

    A token that ends inside a multi-byte UTF-8 character yields nothing until the character
    is complete, so the concatenated increments equal decoding all the ids at once.
    Special tokens are dropped when `skip_special_tokens`."""

    def __init__(
        self, tokenizer: Tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool
    ) -> None:
        self._backend = tokenizer.backend
        self._stream = DecodeStream(
            ids=prompt_token_ids[-PROMPT_CONTEXT_TOKENS:], skip_special_tokens=skip_special_tokens
        )

    def update(self, token_ids: list[int]) -> str:
        """The text that `token_ids` (the next generated tokens) add."""
        pieces = []
        for token_id in token_ids:
            piece = self._stream.step(self._backend, token_id)
            if piece:
                pieces.append(piece)
        return "".join(pieces)


def find_stop_string(
    text: str, num_new_chars: int, stop: list[str], include_stop_str_in_output: bool
) -> tuple[str, int] | None:
    """The stop string that the last `num_new_chars` characters of `text` complete, as
    `(stop string, length the text is cut to)`; the earliest match wins. Only matches ending
    in the new characters count (older text was checked before)."""
    if not stop or num_new_chars <= 0:
        return None
    best: tuple[str, int] | None = None
    best_start = len(text)
    for s in stop:
        # A match must end after the old text, so it starts at most len(s)-1 before it.
        start = text.find(s, max(0, len(text) - num_new_chars - len(s) + 1))
        if start != -1 and start < best_start:
            best_start = start
            best = (s, start + len(s) if include_stop_str_in_output else start)
    return best


def stop_prefix_len(text: str, stop: list[str]) -> int:
    """Length of the longest suffix of `text` that could be the start of a stop string: a
    stream holds those characters back until the next tokens settle it."""
    longest = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:k]):
                longest = k
                break
    return longest
