"""Incremental detokenization and stop-string matching for one generated sequence."""

from __future__ import annotations

from tokenizers.decoders import DecodeStream

from shoal.processing.tokenizer import Tokenizer

# Prompt tokens the decode stream is primed with: enough for a decoder that strips the
# leading space of the first token (sentencepiece) to see it is not first.
PROMPT_CONTEXT_TOKENS = 6


def decode_context(tokenizer: Tokenizer, prompt_token_ids: list[int]) -> list[int]:
    """The prompt tokens the decode stream is primed with: the last `PROMPT_CONTEXT_TOKENS`,
    less those of a broken character at the end (token-id prompts can end inside one):
    primed with it, the stream would emit that tail, and text before it, again with the
    first output."""
    context = prompt_token_ids[-PROMPT_CONTEXT_TOKENS:]
    while context and tokenizer.decode(context, False).endswith("\ufffd"):
        context = context[:-1]
    return context


class IncrementalDetokenizer:
    """Turns token ids, as they arrive, into text increments.

    A token that ends inside a multi-byte UTF-8 character yields nothing until the character
    is complete, so the concatenated increments equal decoding all the ids at once.
    Special tokens are dropped when `skip_special_tokens`."""

    def __init__(
        self, tokenizer: Tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool
    ) -> None:
        self._backend = tokenizer.backend
        self._plain = tokenizer.plain_token_text
        self._known = tokenizer.plain_texts  # its cache: a hit skips the method call
        context = decode_context(tokenizer, prompt_token_ids)
        self._stream = DecodeStream(ids=context, skip_special_tokens=skip_special_tokens)
        # True while tokens must go through the decode stream: after it returned nothing (a
        # partial character, or a token that decodes to nothing) until it yields again, and
        # for good when the prompt may end inside a character (then the stream's handling of
        # the broken bytes decides what is shown).
        self._pending = not all(self._plain(t) is not None for t in context)
        self._fast = not self._pending

    def update(self, token_ids: list[int]) -> str:
        """The text that `token_ids` (the next generated tokens) add."""
        if len(token_ids) == 1 and not self._pending:
            # Fast path: a plain token after text that ended on a character boundary adds
            # its own text (byte-level decoding concatenates bytes). The stream does not
            # see it; its context is only ever used for text past a boundary, where the
            # byte-level result does not depend on earlier tokens.
            token_id = token_ids[0]
            text = self._known.get(token_id)
            if text is None:
                text = self._plain(token_id)
            if text is not None:
                return text
        pieces = []
        for token_id in token_ids:
            if not self._pending:
                text = self._plain(token_id)
                if text is not None:
                    pieces.append(text)
                    continue
            piece = self._stream.step(self._backend, token_id)
            if piece:
                pieces.append(piece)
                self._pending = not self._fast
            else:
                self._pending = True
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
