"""`OutputProcessor`: engine outputs -> `RequestOutput`s (detokenize, stop strings, n fan-in)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from shoal.processing.detokenizer import IncrementalDetokenizer, find_stop_string, stop_prefix_len
from shoal.processing.outputs import (
    CompletionOutput,
    Logprob,
    PromptLogprobs,
    RequestOutput,
    RequestOutputKind,
    SampleLogprobs,
)
from shoal.processing.processor import ProcessedRequest
from shoal.processing.tokenizer import Tokenizer
from shoal.protocol import EngineCoreOutput, TokenLogprobs
from shoal.sampling_params import SamplingParams


class _TextBuffer:
    """Generated text kept as chunks, so appending a token's text never copies the whole
    string (a plain `str +=` on an attribute is quadratic over a long generation)."""

    __slots__ = ("_chunks", "length")

    def __init__(self) -> None:
        self._chunks: list[str] = []
        self.length = 0

    def append(self, text: str) -> None:
        self._chunks.append(text)
        self.length += len(text)

    def value(self) -> str:
        if len(self._chunks) > 1:
            self._chunks = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""

    def since(self, offset: int) -> str:
        """The text from character `offset` to the end (walks back over the last chunks)."""
        need = self.length - offset
        if need <= 0:
            return ""
        last = self._chunks[-1]
        if len(last) >= need:  # the common case: only the newest chunk
            return last if len(last) == need else last[len(last) - need :]
        parts = []
        for chunk in reversed(self._chunks):
            if need <= 0:
                break
            parts.append(chunk if len(chunk) <= need else chunk[len(chunk) - need :])
            need -= len(chunk)
        return "".join(reversed(parts))

    def truncate(self, length: int) -> None:
        self._chunks = [self.value()[:length]]
        self.length = length


class _Sequence:
    """The state of one of a request's n sequences."""

    def __init__(
        self,
        index: int,
        engine_id: str,
        params: SamplingParams,
        detokenizer: IncrementalDetokenizer | None,
    ) -> None:
        self.index = index
        self.engine_id = engine_id
        self.detokenizer = detokenizer
        self.text = _TextBuffer()
        self.token_ids: list[int] = []
        wants_logprobs = params.logprobs is not None
        self.logprobs: SampleLogprobs | None = [] if wants_logprobs else None
        self.cumulative_logprob: float | None = 0.0 if wants_logprobs else None
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        # How much of each was already reported (DELTA).
        self.num_sent_chars = 0
        self.num_sent_tokens = 0


class _RequestState:
    def __init__(
        self, request: ProcessedRequest, kind: RequestOutputKind, sequences: list[_Sequence]
    ) -> None:
        self.request_id = request.request_id
        self.prompt = request.prompt
        self.prompt_token_ids = request.prompt_token_ids
        self.params = request.sampling_params
        self.kind = kind
        self.sequences = sequences
        self.num_unfinished = len(sequences)
        self.num_cached_tokens = 0
        self.max_stop_len = max((len(s) for s in self.params.stop), default=0)
        self.prompt_logprobs: PromptLogprobs | None = None
        self.embedding = b""


class OutputProcessor:
    """Turns `EngineCoreOutput`s into `RequestOutput`s; torch-free and synchronous, cheap
    enough to call from an API server's event loop."""

    def __init__(self, tokenizer: Tokenizer, stream_interval: int = 1) -> None:
        """`stream_interval`: a DELTA output of a running sequence is held back until it
        carries this many new tokens (the first token and the end always go at once), so a
        streaming client gets one chunk per `stream_interval` tokens instead of one per token.
        1 reports every token."""
        if stream_interval < 1:
            raise ValueError(f"stream_interval: must be at least 1, got {stream_interval}")
        self.tokenizer = tokenizer
        self.stream_interval = stream_interval
        self._requests: dict[str, _RequestState] = {}
        # engine request id -> (its request, its sequence); removed when the sequence ends.
        self._by_engine_id: dict[str, tuple[_RequestState, _Sequence]] = {}

    def add_request(
        self,
        request: ProcessedRequest,
        output_kind: RequestOutputKind = RequestOutputKind.FINAL_ONLY,
    ) -> None:
        """Track a request whose `engine_requests` are being sent to the engine."""
        if request.request_id in self._requests:
            raise ValueError(f"request_id: {request.request_id!r} is already in flight")
        params = request.sampling_params
        # Offline batches without stop strings decode once at the end instead of per token.
        incremental = output_kind != RequestOutputKind.FINAL_ONLY or bool(params.stop)
        sequences = []
        for index, engine_request in enumerate(request.engine_requests):
            detokenizer = (
                IncrementalDetokenizer(
                    self.tokenizer, request.prompt_token_ids, params.skip_special_tokens
                )
                if incremental
                else None
            )
            sequences.append(_Sequence(index, engine_request.request_id, params, detokenizer))
        state = _RequestState(request, output_kind, sequences)
        self._requests[request.request_id] = state
        for seq in sequences:
            self._by_engine_id[seq.engine_id] = (state, seq)

    def abort_requests(self, request_ids: Iterable[str]) -> list[str]:
        """Forget these requests (client ids); returns the engine request ids to abort."""
        engine_ids = []
        for request_id in request_ids:
            state = self._requests.pop(request_id, None)
            if state is None:
                continue
            for seq in state.sequences:
                if self._by_engine_id.pop(seq.engine_id, None) is not None:
                    engine_ids.append(seq.engine_id)
        return engine_ids

    def abort_all_requests(self) -> list[str]:
        """Forget every request; returns the engine request ids to abort."""
        return self.abort_requests(list(self._requests))

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    def get_num_unfinished_requests(self) -> int:
        return len(self._requests)

    def process_outputs(
        self, outputs: Iterable[EngineCoreOutput]
    ) -> tuple[list[RequestOutput], list[str]]:
        """Apply one batch of engine outputs.

        Returns the `RequestOutput`s due (per request, as its output kind says) and the engine
        request ids that a stop string finished here, which the caller must abort in the
        engine. Outputs for unknown ids (already finished or aborted) are ignored."""
        # request id -> [its state, the sequences it got outputs for...], in arrival order
        touched: dict[str, list[Any]] = {}
        to_abort: list[str] = []
        by_engine_id = self._by_engine_id
        for output in outputs:
            found = by_engine_id.get(output.request_id)
            if found is None:
                continue
            state, seq = found
            if self._update(state, seq, output):
                to_abort.append(seq.engine_id)
            if seq.finish_reason is not None:
                del by_engine_id[seq.engine_id]
                state.num_unfinished -= 1
            entry = touched.get(state.request_id)
            if entry is None:
                touched[state.request_id] = [state, seq]
            elif seq not in entry:
                entry.append(seq)
        results = []
        for entry in touched.values():
            state = entry[0]
            result = self._make_output(state, entry[1:])
            if result is not None:
                results.append(result)
            if state.num_unfinished == 0:
                self._requests.pop(state.request_id, None)
        return results, to_abort

    # ----------------------------------------------------------------------------- update

    def _update(self, state: _RequestState, seq: _Sequence, output: EngineCoreOutput) -> bool:
        """Fold one engine output into `seq`; True if a stop string ended it early."""
        new_ids = output.new_token_ids
        seq.token_ids.extend(new_ids)
        if output.num_cached_tokens > state.num_cached_tokens:
            state.num_cached_tokens = output.num_cached_tokens
        if seq.logprobs is not None and output.new_logprobs:
            self._add_logprobs(seq, output.new_logprobs)
        if output.prompt_logprobs is not None:
            state.prompt_logprobs = [None] + [self._position(e) for e in output.prompt_logprobs]
        if output.embedding:
            state.embedding = output.embedding
        if seq.detokenizer is not None and new_ids:
            new_text = seq.detokenizer.update(new_ids)
            if new_text:
                if not state.max_stop_len:
                    seq.text.append(new_text)
                elif self._check_stop(state, seq, new_text):
                    return not output.finished
        if output.finish_reason is not None:
            seq.finish_reason = str(output.finish_reason)
            seq.stop_reason = output.stop_reason
        return False

    def _check_stop(self, state: _RequestState, seq: _Sequence, new_text: str) -> bool:
        old_len = seq.text.length
        seq.text.append(new_text)
        if not state.max_stop_len:
            return False
        # Only a stop string that ends in the new text can match; look just far enough back.
        window_start = max(0, old_len - state.max_stop_len + 1)
        window = seq.text.since(window_start)
        match = find_stop_string(
            window, len(new_text), state.params.stop, state.params.include_stop_str_in_output
        )
        if match is None:
            return False
        stop, cut = match
        seq.text.truncate(window_start + cut)
        seq.finish_reason, seq.stop_reason = "stop", stop
        return True

    def _add_logprobs(self, seq: _Sequence, entries: list[TokenLogprobs]) -> None:
        assert seq.logprobs is not None and seq.cumulative_logprob is not None
        for e in entries:
            seq.logprobs.append(self._position(e))
            seq.cumulative_logprob += e.logprob

    def _position(self, e: TokenLogprobs) -> dict[int, Logprob]:
        """One position's logprobs: the chosen token first, then the top alternatives."""
        text = self.tokenizer.token_text
        position = {e.token_id: Logprob(e.logprob, e.rank, text(e.token_id))}
        for rank, (token_id, logprob) in enumerate(
            zip(e.top_token_ids, e.top_logprobs, strict=True), 1
        ):
            if token_id not in position:
                position[token_id] = Logprob(logprob, rank, text(token_id))
        return position

    # ----------------------------------------------------------------------------- report

    def _make_output(self, state: _RequestState, seqs: list[_Sequence]) -> RequestOutput | None:
        finished = state.num_unfinished == 0
        if state.kind == RequestOutputKind.FINAL_ONLY:
            if not finished:
                return None
            outputs = [self._full(state, seq) for seq in state.sequences]
        elif state.kind == RequestOutputKind.CUMULATIVE:
            outputs = [self._full(state, seq) for seq in state.sequences]
        else:
            outputs = []
            for seq in seqs:
                delta = self._delta(state, seq)
                if delta is not None:
                    outputs.append(delta)
            if not outputs and not finished:
                return None
        return RequestOutput(
            state.request_id,
            state.prompt,
            state.prompt_token_ids,
            outputs,
            finished,
            state.num_cached_tokens,
            state.prompt_logprobs,
            state.embedding,
        )

    def _visible_len(self, state: _RequestState, seq: _Sequence) -> int:
        """Characters that may be shown: while running, a tail that could begin a stop string
        is held back."""
        if seq.finish_reason is not None or not state.max_stop_len:
            return seq.text.length
        tail = seq.text.since(max(0, seq.text.length - state.max_stop_len + 1))
        return seq.text.length - stop_prefix_len(tail, state.params.stop)

    def _full(self, state: _RequestState, seq: _Sequence) -> CompletionOutput:
        if seq.detokenizer is None:
            # Decoded once, at the end, by the streams' detokenizer: a character that
            # max_tokens cut is left out here too (a plain decode would show U+FFFD).
            text = (
                IncrementalDetokenizer(
                    self.tokenizer, state.prompt_token_ids, state.params.skip_special_tokens
                ).update(seq.token_ids)
                if seq.finish_reason is not None
                else ""
            )
        else:
            text = seq.text.value()[: self._visible_len(state, seq)]
        return CompletionOutput(
            seq.index,
            text,
            list(seq.token_ids),
            seq.cumulative_logprob,
            list(seq.logprobs) if seq.logprobs is not None else None,
            seq.finish_reason,
            seq.stop_reason,
        )

    def _delta(self, state: _RequestState, seq: _Sequence) -> CompletionOutput | None:
        running = seq.finish_reason is None
        num_new = len(seq.token_ids) - seq.num_sent_tokens
        if running and (num_new == 0 or (seq.num_sent_tokens and num_new < self.stream_interval)):
            return None
        new_tokens = seq.token_ids[seq.num_sent_tokens :]
        if state.max_stop_len:
            visible = self._visible_len(state, seq)
            text = seq.text.since(seq.num_sent_chars)[: max(0, visible - seq.num_sent_chars)]
        else:  # no stop strings: all new text is visible, nothing is ever cut
            visible = seq.text.length
            text = seq.text.since(seq.num_sent_chars)
        logprobs = seq.logprobs[seq.num_sent_tokens :] if seq.logprobs is not None else None
        seq.num_sent_chars = max(seq.num_sent_chars, visible)
        seq.num_sent_tokens = len(seq.token_ids)
        return CompletionOutput(
            seq.index,
            text,
            new_tokens,
            seq.cumulative_logprob,
            logprobs,
            seq.finish_reason,
            seq.stop_reason,
        )
