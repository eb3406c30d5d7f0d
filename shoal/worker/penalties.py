"""Logits controls of one step's sampled rows: allowed token ids, bad words, logit bias and
the repetition / frequency / presence penalties, with vLLM's semantics.

Applied to the raw logits of the rows that use one, in this order (vLLM's), after the raw
logprobs were taken (logprobs report the model's distribution, as vLLM's default does):

1. `allowed_token_ids`: every other token gets -inf.
2. `bad_words`: a one-token word always gets -inf; a longer one gets -inf on its last token
   when the output so far ends with the word's other tokens.
3. `logit_bias`: each listed token's bias is added to its logit.
4. `repetition_penalty` r, over every token of the prompt and the output so far: a positive
   logit is divided by r, a negative one multiplied by r.
5. `frequency_penalty` f and `presence_penalty` p, over the output so far: a token seen c
   times loses f * c, then p once if c > 0.

A step whose rows use none of them builds nothing here (`build_controls` returns None from a
flag per row, set once when the request arrived).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from shoal.sampling_params import SamplingParams


class TokenHistory(Protocol):
    """What a controlled row's controls read (a `RequestState`): its token ids, where the
    prompt ends, its parameters."""

    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams


@dataclass
class LogitsControls:
    """The controls of one step: rows are indices into the step's logits."""

    rows: list[int]
    histories: Sequence[TokenHistory]

    def apply(self, logits: torch.Tensor) -> None:
        """Apply every row's controls to `logits` ([num_rows, vocab] float32) in place."""
        params = [h.params for h in self.histories]
        if any(p.allowed_token_ids for p in params):
            self._apply_allowed(logits, params)
        banned = [
            (row, token)
            for row, h in zip(self.rows, self.histories, strict=True)
            for token in _bad_word_tokens(h)
        ]
        if banned:
            rows, cols = zip(*banned, strict=True)
            logits[list(rows), list(cols)] = float("-inf")
        biased = [
            (row, token, bias)
            for row, p in zip(self.rows, params, strict=True)
            for token, bias in (p.logit_bias or {}).items()
        ]
        if biased:
            rows, cols, biases = zip(*biased, strict=True)
            device = logits.device
            idx = (torch.tensor(rows, device=device), torch.tensor(cols, device=device))
            values = torch.tensor(biases, dtype=logits.dtype, device=device)
            logits.index_put_(idx, values, accumulate=True)
        penalized = [
            i
            for i, p in enumerate(params)
            if p.repetition_penalty != 1.0 or p.frequency_penalty or p.presence_penalty
        ]
        if penalized:
            self._apply_penalties(logits, penalized)

    def _apply_allowed(self, logits: torch.Tensor, params: list[SamplingParams]) -> None:
        for row, p in zip(self.rows, params, strict=True):
            if p.allowed_token_ids:
                keep = torch.tensor(p.allowed_token_ids, device=logits.device)
                kept = logits[row, keep].clone()
                logits[row].fill_(float("-inf"))
                logits[row, keep] = kept

    def _apply_penalties(self, logits: torch.Tensor, penalized: list[int]) -> None:
        """Only the (row, token) pairs that occur are read and written: O(tokens so far)
        per step, not O(rows x vocab)."""
        histories = [self.histories[i] for i in penalized]
        device, dtype = logits.device, logits.dtype
        rows = torch.tensor([self.rows[i] for i in penalized], device=device)
        repetition = [h.params.repetition_penalty for h in histories]
        if any(r != 1.0 for r in repetition):
            index, tokens, _ = _occurrences(
                [h.token_ids for h in histories], logits.shape[-1], device
            )
            r = torch.tensor(repetition, dtype=dtype, device=device)[index]
            where = (rows[index], tokens)
            values = logits[where]
            logits[where] = torch.where(values > 0, values / r, values * r)
        frequency = [h.params.frequency_penalty for h in histories]
        presence = [h.params.presence_penalty for h in histories]
        if any(frequency) or any(presence):
            outputs = [h.token_ids[h.num_prompt_tokens :] for h in histories]
            index, tokens, counts = _occurrences(outputs, logits.shape[-1], device)
            where = (rows[index], tokens)
            values = logits[where]
            if any(frequency):
                f = torch.tensor(frequency, dtype=dtype, device=device)[index]
                values = values - f * counts.to(dtype)
            if any(presence):
                values = values - torch.tensor(presence, dtype=dtype, device=device)[index]
            logits[where] = values


def build_controls(
    histories: Sequence[TokenHistory], flags: Sequence[bool]
) -> LogitsControls | None:
    """The controls of the rows whose flag is set (`RequestState.has_controls`); None when no
    row has one."""
    if not any(flags):
        return None
    rows = [i for i, flag in enumerate(flags) if flag]
    return LogitsControls(rows, [histories[i] for i in rows])


def _occurrences(
    sequences: list[list[int]], vocab: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The distinct (sequence index, token id) pairs of `sequences` and how often each
    occurs: three int64 tensors of one length, on `device`."""
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.int64)
    flat = torch.tensor(list(itertools.chain.from_iterable(sequences)), dtype=torch.int64)
    owner = torch.repeat_interleave(torch.arange(len(sequences)), lengths)
    keys, counts = torch.unique(owner * vocab + flat, return_counts=True)
    keys, counts = keys.to(device), counts.to(device)
    return keys // vocab, keys % vocab, counts


def _bad_word_tokens(history: TokenHistory) -> list[int]:
    """Tokens that would complete one of the row's bad words now."""
    words = history.params.bad_words_token_ids
    if not words:
        return []
    output = history.token_ids[history.num_prompt_tokens :]
    banned = []
    for word in words:
        prefix = word[:-1]
        if not prefix or (
            len(output) >= len(prefix) and output[len(output) - len(prefix) :] == prefix
        ):
            banned.append(word[-1])
    return banned
