"""`InputProcessor`: a prompt plus `SamplingParams` -> validated `EngineCoreRequest`s."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from shoal.processing.tokenizer import Tokenizer
from shoal.protocol import EngineCoreRequest
from shoal.sampling_params import SamplingParams

# A prompt: text, token ids, or {"prompt": text} / {"prompt_token_ids": ids}.
PromptType = str | Sequence[int] | Mapping[str, Any]


@dataclass
class ProcessedRequest:
    """A client request ready for the engine, and what the output side needs to answer it."""

    request_id: str
    # The prompt text (None when the client sent token ids).
    prompt: str | None
    prompt_token_ids: list[int]
    # With max_tokens resolved (never None).
    sampling_params: SamplingParams
    # One request, or for n > 1 one child per sequence (`<request_id>-<i>`, n = 1 each), all
    # with the same prompt so the engine's prefix cache shares its blocks.
    engine_requests: list[EngineCoreRequest]
    arrival_time: float
    # The prompt as input embeddings (a torch.Tensor [tokens, hidden]; prompt_token_ids are
    # placeholders): sent on the tensor queue, one copy per engine request.
    prompt_embeds: Any = None


def child_request_id(request_id: str, index: int) -> str:
    """The engine-side id of sequence `index` of a request with n > 1."""
    return f"{request_id}-{index}"


class InputProcessor:
    """Tokenizes and validates prompts for one model; torch-free (runs in the API server).

    Every problem raises `ValueError` naming the field (`prompt`, `prompt_token_ids`,
    `max_tokens`, ...)."""

    def __init__(
        self, tokenizer: Tokenizer, max_model_len: int, model_vocab_size: int | None = None
    ) -> None:
        """`model_vocab_size`: the model's embedding rows, when known. Ids must be below it
        and the tokenizer's vocabulary size both: a tokenizer can know more tokens than the
        model has rows (added tokens), and the engine rejects such an id."""
        if max_model_len <= 0:
            raise ValueError(f"max_model_len: must be positive, got {max_model_len}")
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.vocab_size = tokenizer.vocab_size
        # Text encodes to the tokenizer's ids: checked only when the model has fewer.
        self._check_text_ids = False
        if model_vocab_size is not None and model_vocab_size < self.vocab_size:
            self.vocab_size, self._check_text_ids = model_vocab_size, True

    def process(
        self,
        request_id: str,
        prompt: PromptType,
        sampling_params: SamplingParams | None = None,
        *,
        arrival_time: float | None = None,
        client_index: int = 0,
        add_special_tokens: bool = True,
    ) -> ProcessedRequest:
        """Validate `prompt` and `sampling_params` and build the engine request(s).

        `max_tokens=None` becomes `max_model_len - len(prompt)`; n > 1 fans out into children
        whose seeds are `seed + i` when a seed is given."""
        params = sampling_params if sampling_params is not None else SamplingParams()
        text, token_ids = self.tokenize(prompt, add_special_tokens=add_special_tokens)
        params = self._resolve_max_tokens(params, len(token_ids))
        if params.has_logits_controls or params.bad_words:
            params = self._resolve_controls(params)
        arrival = time.time() if arrival_time is None else arrival_time
        eos = self.tokenizer.eos_token_id
        if params.n == 1:
            requests = [
                EngineCoreRequest(request_id, token_ids, params, eos, arrival, client_index)
            ]
        else:
            requests = [
                EngineCoreRequest(
                    child_request_id(request_id, i),
                    token_ids,
                    _child_params(params, i),
                    eos,
                    arrival,
                    client_index,
                )
                for i in range(params.n)
            ]
        return ProcessedRequest(request_id, text, token_ids, params, requests, arrival)

    def tokenize(
        self, prompt: PromptType, add_special_tokens: bool = True
    ) -> tuple[str | None, list[int]]:
        """`(prompt text or None, prompt token ids)`, checked: non-empty, ids within the
        vocabulary, shorter than max_model_len."""
        if isinstance(prompt, Mapping):
            if "prompt_token_ids" in prompt:
                return None, self._check_ids(prompt["prompt_token_ids"], "prompt_token_ids")
            if "prompt" in prompt:
                prompt = prompt["prompt"]
                if not isinstance(prompt, str):
                    raise ValueError("prompt: must be a string")
            else:
                raise ValueError("prompt: a mapping needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt: must not be empty")
            ids = self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
            return prompt, self._check_ids(ids, "prompt", check_vocab=self._check_text_ids)
        if isinstance(prompt, (bytes, bytearray)) or not isinstance(prompt, Sequence):
            raise ValueError(
                f"prompt: must be a string or a list of token ids, got {type(prompt).__name__}"
            )
        return None, self._check_ids(prompt, "prompt_token_ids")

    def _check_ids(self, ids: Any, field: str, check_vocab: bool = True) -> list[int]:
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
            raise ValueError(f"{field}: must be a list of token ids")
        if not ids:
            raise ValueError(f"{field}: must not be empty")
        vocab_size = self.vocab_size
        for i, t in enumerate(ids if check_vocab else ()):
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size:
                raise ValueError(
                    f"{field}: token id {t!r} at position {i} is not in the "
                    f"vocabulary [0, {vocab_size})"
                )
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"{field}: the prompt has {len(ids)} tokens; this model's maximum context "
                f"length is {self.max_model_len} tokens, which must leave room for at least "
                "one generated token"
            )
        return list(ids)

    def _resolve_max_tokens(self, params: SamplingParams, num_prompt_tokens: int) -> SamplingParams:
        room = self.max_model_len - num_prompt_tokens
        if params.max_tokens is None:
            return msgspec.structs.replace(params, max_tokens=room)
        if params.max_tokens > room:
            raise ValueError(
                f"max_tokens: this model's maximum context length is {self.max_model_len} "
                f"tokens; you requested {num_prompt_tokens + params.max_tokens} tokens "
                f"({num_prompt_tokens} in the prompt, {params.max_tokens} for max_tokens). "
                "Reduce the prompt or max_tokens."
            )
        return params

    def _resolve_controls(self, params: SamplingParams) -> SamplingParams:
        """Token ids of the logits controls checked against the vocabulary (`ValueError`
        naming the field); `bad_words` tokenized into `bad_words_token_ids`."""
        vocab_size = self.vocab_size
        for field, ids in (
            ("logit_bias", list(params.logit_bias or ())),
            ("allowed_token_ids", params.allowed_token_ids or []),
        ):
            bad = next((t for t in ids if not 0 <= t < vocab_size), None)
            if bad is not None:
                raise ValueError(
                    f"{field}: token id {bad} is not in the vocabulary [0, {vocab_size})"
                )
        if not params.bad_words:
            return params
        return msgspec.structs.replace(
            params, bad_words_token_ids=bad_words_token_ids(self.tokenizer, params.bad_words)
        )


def bad_words_token_ids(tokenizer: Tokenizer, words: list[str]) -> list[list[int]]:
    """Each word's token ids as it would appear at the start of the text and after a space
    (vLLM's rule: both spellings are banned), without duplicates."""
    sequences: list[list[int]] = []
    for word in words:
        for spelling in (word.lstrip(" "), " " + word.lstrip(" ")):
            ids = tokenizer.encode(spelling, add_special_tokens=False)
            if ids and ids not in sequences:
                sequences.append(ids)
    return sequences


def _child_params(params: SamplingParams, index: int) -> SamplingParams:
    seed = params.seed + index if params.seed is not None else None
    return msgspec.structs.replace(params, n=1, seed=seed)
