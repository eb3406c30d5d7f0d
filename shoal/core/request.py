"""One request's engine-side state: token ids, progress, block hashes and its status machine."""

from __future__ import annotations

import enum

from shoal.protocol import EngineCoreRequest, FinishReason
from shoal.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    """Where a request is in its life. Every status after PREEMPTED is final."""

    WAITING = 0  # queued, holds no KV blocks
    RUNNING = 1  # holds KV blocks, scheduled every step it fits in the budget
    PREEMPTED = 2  # back in the queue with its blocks freed; keeps its output tokens
    FINISHED_STOPPED = 3  # EOS or a stop token id
    FINISHED_LENGTH_CAPPED = 4  # max_tokens or max_model_len
    FINISHED_ABORTED = 5  # client abort, disconnect or shutdown
    FINISHED_ERROR = 6  # the engine failed this request

    @property
    def is_finished(self) -> bool:
        return self > RequestStatus.PREEMPTED

    @property
    def finish_reason(self) -> FinishReason | None:
        """The wire finish reason of a final status; None while unfinished."""
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: FinishReason.STOP,
    RequestStatus.FINISHED_LENGTH_CAPPED: FinishReason.LENGTH,
    RequestStatus.FINISHED_ABORTED: FinishReason.ABORT,
    RequestStatus.FINISHED_ERROR: FinishReason.ERROR,
}
FINISH_REASONS = _FINISH_REASONS  # status -> wire finish reason (final statuses only)
_FINAL = frozenset(s for s in RequestStatus if s.is_finished)
# Allowed moves of the state machine (an illegal move is a scheduler bug, hence an assert).
_TRANSITIONS: dict[RequestStatus, frozenset[RequestStatus]] = {
    RequestStatus.WAITING: frozenset({RequestStatus.RUNNING}) | _FINAL,
    RequestStatus.RUNNING: frozenset({RequestStatus.PREEMPTED}) | _FINAL,
    RequestStatus.PREEMPTED: frozenset({RequestStatus.RUNNING}) | _FINAL,
    **{s: frozenset() for s in _FINAL},
}


def check_token_ids_in_vocab(token_ids: list[int], vocab_size: int) -> None:
    """`ValueError` naming the first id outside `[0, vocab_size)` and the vocabulary size."""
    # min and max run in C; the culprit is searched for only when there is one.
    if not token_ids or (min(token_ids) >= 0 and max(token_ids) < vocab_size):
        return
    position, token_id = next((i, t) for i, t in enumerate(token_ids) if not 0 <= t < vocab_size)
    raise ValueError(
        f"prompt_token_ids: token id {token_id} at position {position} is outside the "
        f"model's vocabulary (size {vocab_size}: ids 0 to {vocab_size - 1})"
    )


def check_control_ids_in_vocab(params: SamplingParams, vocab_size: int) -> None:
    """`ValueError` naming the logits control (`logit_bias`, `allowed_token_ids`,
    `bad_words`) that holds a token id outside `[0, vocab_size)`: the sampler indexes the
    logits with them, and an id past the vocabulary would fail the whole step."""
    for field, ids in (
        ("logit_bias", list(params.logit_bias or ())),
        ("allowed_token_ids", params.allowed_token_ids or []),
        ("bad_words", [t for word in params.bad_words_token_ids for t in word]),
    ):
        bad = next((t for t in ids if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise ValueError(
                f"{field}: token id {bad} is outside the model's vocabulary (size {vocab_size})"
            )
    if any(not word for word in params.bad_words_token_ids):
        raise ValueError("bad_words: an empty token sequence")


class Request:
    """A request as the scheduler sees it.

    `all_token_ids` = prompt + outputs; `num_computed_tokens` of them have KV in the cache.
    Each step the scheduler gives the request k more tokens to compute until it catches up
    with `num_tokens`; the step that reaches the last token samples the next one.
    """

    __slots__ = (
        "request_id",
        "prompt_token_ids",
        "output_token_ids",
        "all_token_ids",
        "sampling_params",
        "eos_token_id",
        "stop_token_ids",
        "arrival_time",
        "client_index",
        "max_tokens",
        "num_computed_tokens",
        "num_cached_tokens",
        "num_preemptions",
        "block_hashes",
        "status",
        "stop_reason",
        "has_sent_output",
        "prompt_embeds",
        "cache_salt",
        "prompt_logprobs",
        "needs_whole_prompt",
    )

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        eos_token_id: int | None,
        max_model_len: int,
        arrival_time: float = 0.0,
        client_index: int = 0,
        vocab_size: int | None = None,
    ) -> None:
        """`ValueError` for an empty prompt, one longer than `max_model_len`, or (given
        `vocab_size`) a token id outside the model's vocabulary."""
        if not prompt_token_ids:
            raise ValueError("prompt_token_ids: must not be empty")
        if len(prompt_token_ids) > max_model_len:
            raise ValueError(
                f"prompt_token_ids: the prompt has {len(prompt_token_ids)} tokens, more than "
                f"max_model_len ({max_model_len})"
            )
        if vocab_size is not None:
            check_token_ids_in_vocab(prompt_token_ids, vocab_size)
            if sampling_params.has_logits_controls:
                check_control_ids_in_vocab(sampling_params, vocab_size)
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.all_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.eos_token_id = eos_token_id
        self.stop_token_ids = frozenset(sampling_params.stop_token_ids)
        self.arrival_time = arrival_time
        self.client_index = client_index
        # None = as many as max_model_len leaves room for (the length check stops it there).
        self.max_tokens = (
            sampling_params.max_tokens
            if sampling_params.max_tokens is not None
            else max_model_len - len(prompt_token_ids)
        )
        self.num_computed_tokens = 0
        # Prompt tokens served from the prefix cache at first scheduling (-1: not yet).
        self.num_cached_tokens = -1
        self.num_preemptions = 0
        # Chained hashes of the full blocks of all_token_ids, filled lazily by the KV manager.
        self.block_hashes: list[bytes] = []
        self.status = RequestStatus.WAITING
        # The stop token id that finished the request (None for EOS or other reasons).
        self.stop_reason: int | None = None
        self.has_sent_output = False
        # Input embeddings of the prompt (an opaque tensor for the runner) and the salt of
        # its block hashes, so that embedding prompts never share blocks with token
        # prompts (whose placeholder ids they have) or other embeddings.
        self.prompt_embeds: object | None = None
        self.cache_salt: bytes | None = None
        # Prompt logprobs as the runner computes them, sent with the first output.
        self.prompt_logprobs: list[tuple[int, float, int, list[int], list[float]]] | None = (
            [] if sampling_params.prompt_logprobs is not None else None
        )
        # Every prompt position must run through the model (prompt logprobs, mean pooling):
        # no prefix-cache hits.
        self.needs_whole_prompt = (
            sampling_params.prompt_logprobs is not None or sampling_params.pooling == "mean"
        )

    @classmethod
    def from_engine_core_request(
        cls, req: EngineCoreRequest, max_model_len: int, vocab_size: int | None = None
    ) -> Request:
        """Build from the wire message; `ValueError` for an empty or too long prompt, or a
        token id outside `[0, vocab_size)`."""
        return cls(
            req.request_id,
            req.prompt_token_ids,
            req.sampling_params,
            req.eos_token_id,
            max_model_len,
            arrival_time=req.arrival_time,
            client_index=req.client_index,
            vocab_size=vocab_size,
        )

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status > RequestStatus.PREEMPTED

    def set_status(self, status: RequestStatus) -> None:
        """Move the state machine; an illegal move is a scheduler bug (AssertionError)."""
        assert status in _TRANSITIONS[self.status], (
            f"request {self.request_id}: illegal move {self.status.name} -> {status.name}"
        )
        self.status = status

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, {self.status.name}, prompt={self.num_prompt_tokens}, "
            f"outputs={self.num_output_tokens}, computed={self.num_computed_tokens})"
        )


def check_stop(request: Request, max_model_len: int) -> bool:
    """After a token was appended: finish the request if a stop condition holds.

    EOS (unless ignore_eos) and stop_token_ids stop only once `min_tokens` outputs exist;
    a stop token sets `stop_reason` to its id. Then max_tokens and max_model_len cap the
    length. The stopping token stays in `output_token_ids` (the front end hides it).
    """
    params = request.sampling_params
    outputs = request.output_token_ids
    last = outputs[-1]
    if len(outputs) >= params.min_tokens:
        if last == request.eos_token_id and not params.ignore_eos:
            request.set_status(RequestStatus.FINISHED_STOPPED)
            return True
        if last in request.stop_token_ids:
            request.stop_reason = last
            request.set_status(RequestStatus.FINISHED_STOPPED)
            return True
    if len(outputs) >= request.max_tokens or len(request.all_token_ids) >= max_model_len:
        request.set_status(RequestStatus.FINISHED_LENGTH_CAPPED)
        return True
    return False
