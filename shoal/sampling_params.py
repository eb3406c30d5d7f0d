"""`SamplingParams`: how one request is sampled and when it stops (vLLM-shaped, msgspec)."""

from __future__ import annotations

import msgspec

from shoal.structured.params import StructuredOutputsParams


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
    # Logits controls (shoal/worker/penalties.py), vLLM's semantics: presence and frequency
    # over the output tokens, repetition over prompt + output; 0 / 0 / 1 = off.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    # token id -> bias added to its logit, in [-100, 100] (OpenAI's logit_bias).
    logit_bias: dict[int, float] | None = None
    # Only these token ids may be sampled (vLLM's allowed_token_ids).
    allowed_token_ids: list[int] | None = None
    # Words never generated (vLLM's bad_words); the input processor tokenizes them into
    # `bad_words_token_ids`, which the engine applies.
    bad_words: list[str] = []
    bad_words_token_ids: list[list[int]] = []
    # Logprobs of the prompt tokens (top alternatives per position, like `logprobs`).
    prompt_logprobs: int | None = None
    # An embedding request: pool the prompt's final hidden states ("mean" or "last"),
    # L2-normalized when `normalize`; such a request is prompt only (max_tokens 0).
    pooling: str | None = None
    normalize: bool = True
    # The grammar the output must match (response_format, guided_*, forced tool calls); the
    # engine masks every token it forbids (docs/structured-outputs.md).
    structured_outputs: StructuredOutputsParams | None = None

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
            # 0: prompt only (scoring the prompt, an embedding): nothing is sampled.
            _require(self.max_tokens >= 0, "max_tokens", "must be non-negative")
        _require(self.min_tokens >= 0, "min_tokens", "must be non-negative")
        if self.max_tokens is not None:
            _require(self.min_tokens <= self.max_tokens, "min_tokens", "must not exceed max_tokens")
        _require(
            all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings"
        )
        if self.logprobs is not None:
            _require(0 <= self.logprobs <= 20, "logprobs", "must be in [0, 20]")
        self._check_controls()

    def _check_controls(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            _require(-2.0 <= getattr(self, name) <= 2.0, name, "must be in [-2, 2]")
        _require(self.repetition_penalty > 0.0, "repetition_penalty", "must be positive")
        if self.logit_bias is not None:
            _require(
                all(-100.0 <= b <= 100.0 for b in self.logit_bias.values()),
                "logit_bias",
                "biases must be in [-100, 100]",
            )
            _require(all(t >= 0 for t in self.logit_bias), "logit_bias", "negative token id")
        if self.allowed_token_ids is not None:
            _require(bool(self.allowed_token_ids), "allowed_token_ids", "must not be empty")
            _require(
                all(t >= 0 for t in self.allowed_token_ids),
                "allowed_token_ids",
                "negative token id",
            )
        _require(
            all(isinstance(w, str) and w for w in self.bad_words),
            "bad_words",
            "must be non-empty strings",
        )
        if self.prompt_logprobs is not None:
            _require(0 <= self.prompt_logprobs <= 20, "prompt_logprobs", "must be in [0, 20]")
        if self.pooling is not None:
            _require(self.pooling in POOLING_TYPES, "pooling", f"must be one of {POOLING_TYPES}")
            _require(self.max_tokens == 0, "max_tokens", "must be 0 for an embedding request")

    @property
    def has_logits_controls(self) -> bool:
        """Whether any logits control is set (the runner then leaves its plain paths)."""
        return bool(
            self.presence_penalty
            or self.frequency_penalty
            or self.repetition_penalty != 1.0
            or self.logit_bias
            or self.allowed_token_ids
            or self.bad_words_token_ids
        )

    @property
    def is_prompt_only(self) -> bool:
        """Nothing is sampled: the request ends once its prompt is computed."""
        return self.max_tokens == 0

    @property
    def is_greedy(self) -> bool:
        return self.temperature < 1e-5


POOLING_TYPES = ("mean", "last")


def _require(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"{name}: {msg}")
