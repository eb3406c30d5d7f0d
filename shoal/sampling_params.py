"""`SamplingParams`: how one request is sampled and when it stops (vLLM-shaped, msgspec)."""

from __future__ import annotations

import msgspec


class SamplingParams(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Per-request sampling settings. Invalid values raise `ValueError` naming the field.

    Stop strings are applied by the front end's detokenizer (left out of the text unless
    `include_stop_str_in_output`); stop token ids, EOS, `max_tokens` and `min_tokens` by the
    engine's scheduler.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    # 0 (or -1) disables top-k.
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    # None = up to max_model_len - prompt length.
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] = []
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    # Number of top alternatives to return per generated token; 0 = only the sampled token's
    # logprob; None = no logprobs.
    logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        if self.top_k == -1:
            self.top_k = 0
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        _require(self.n >= 1, "n", "must be at least 1")
        _require(self.temperature >= 0.0, "temperature", "must be non-negative")
        _require(0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]")
        _require(self.top_k >= 0, "top_k", "must be -1 (disabled) or positive")
        _require(0.0 <= self.min_p <= 1.0, "min_p", "must be in [0, 1]")
        if self.max_tokens is not None:
            _require(self.max_tokens >= 1, "max_tokens", "must be at least 1")
        _require(self.min_tokens >= 0, "min_tokens", "must be non-negative")
        if self.max_tokens is not None:
            _require(self.min_tokens <= self.max_tokens, "min_tokens", "must not exceed max_tokens")
        _require(
            all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings"
        )
        if self.logprobs is not None:
            _require(0 <= self.logprobs <= 20, "logprobs", "must be in [0, 20]")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < 1e-5


def _require(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"{name}: {msg}")
