"""The `random` benchmark dataset: prompts of random token ids of the server's tokenizer.

Each prompt is `input_len` token ids drawn uniformly from the vocabulary without its special
tokens. Sent as `token-ids` (the completions API's list-of-ids prompt: the engine sees exactly
`input_len` tokens and the server skips tokenization) or as `text`: the ids decoded to a
string, re-encoded and cut back to `input_len` a few times so the server's tokenization gives
`input_len` tokens, or within a few of it (plus BOS where the tokenizer adds one); the run
reports the prompt tokens the server counted.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Protocol

PROMPT_FORMATS = ("text", "token-ids")
_TEXT_ROUNDS = 4  # decode/re-encode rounds until the token count settles


class TokenizerLike(Protocol):
    vocab_size: int
    all_special_ids: list[int]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str: ...


@dataclass(frozen=True)
class BenchRequest:
    """One benchmark request: the prompt as sent, its intended length and `max_tokens`."""

    prompt: str | list[int]
    prompt_len: int
    output_len: int


def sample_lengths(rng: random.Random, mean: int, range_ratio: float, count: int) -> list[int]:
    """`count` lengths uniform in [mean * (1 - r), mean * (1 + r)] (at least 1)."""
    low = max(1, round(mean * (1 - range_ratio)))
    high = max(low, round(mean * (1 + range_ratio)))
    return [rng.randint(low, high) for _ in range(count)]


def random_requests(
    tokenizer: TokenizerLike,
    num_prompts: int,
    input_len: int,
    output_len: int,
    *,
    seed: int = 0,
    range_ratio: float = 0.0,
    prompt_format: str = "text",
) -> list[BenchRequest]:
    """`num_prompts` requests of random tokens (same `seed`, same requests). `ValueError`
    names the flag of a bad argument."""
    if num_prompts < 1:
        raise ValueError(f"--num-prompts: must be at least 1, got {num_prompts}")
    if input_len < 1:
        raise ValueError(f"--random-input-len: must be at least 1, got {input_len}")
    if output_len < 1:
        raise ValueError(f"--random-output-len: must be at least 1, got {output_len}")
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"--random-range-ratio: must be in [0, 1), got {range_ratio}")
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(
            f"--prompt-format: expected one of {PROMPT_FORMATS}, got {prompt_format!r}"
        )
    rng = random.Random(seed)
    special = set(tokenizer.all_special_ids)
    vocab = [i for i in range(tokenizer.vocab_size) if i not in special]
    input_lens = sample_lengths(rng, input_len, range_ratio, num_prompts)
    output_lens = sample_lengths(rng, output_len, range_ratio, num_prompts)
    requests = []
    for n_in, n_out in zip(input_lens, output_lens, strict=True):
        ids = [vocab[rng.randrange(len(vocab))] for _ in range(n_in)]
        prompt: str | list[int] = ids
        if prompt_format == "text":
            prompt = _text_of_length(tokenizer, ids, n_in)
        requests.append(BenchRequest(prompt, n_in, n_out))
    return requests


def _text_of_length(tokenizer: TokenizerLike, ids: list[int], length: int) -> str:
    # Decoding random ids and encoding the text again merges or splits tokens; cut or pad
    # with the original ids and repeat until the re-encoded length is `length`.
    text = tokenizer.decode(ids)
    for _ in range(_TEXT_ROUNDS):
        encoded = tokenizer.encode(text, add_special_tokens=False)
        if len(encoded) == length:
            break
        if len(encoded) > length:
            encoded = encoded[:length]
        else:
            encoded = encoded + ids[: length - len(encoded)]
        text = tokenizer.decode(encoded)
    return text
