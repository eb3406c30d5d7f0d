"""`StructuredOutputManager`: the engine's grammars. Compiles on its own thread (cached by
spec), keeps each constrained request's matcher, fills the step's token bitmask and advances
the matchers with the sampled tokens. Nothing runs per step while no request has a grammar."""

from __future__ import annotations

from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from shoal.core.request import Request, RequestStatus
from shoal.logger import init_logger
from shoal.protocol import EngineCoreOutput, FinishReason
from shoal.structured.params import GRAMMAR_ERROR_PREFIX

if TYPE_CHECKING:
    from shoal.core.scheduler import Scheduler
    from shoal.core.scheduler_output import SchedulerOutput
    from shoal.structured.backend import XgrammarBackend
    from shoal.structured.params import StructuredOutputsParams

logger = init_logger(__name__)

# Compiled grammars kept (beside xgrammar's own cache, which holds their masks).
MAX_CACHED_GRAMMARS = 512


@dataclass
class _RequestGrammar:
    future: Future[Any]
    eos_token_id: int | None
    matcher: Any = None  # set once the compile is done (main thread)
    failed: str | None = None


class StructuredOutputManager:
    """One per engine. `add` starts the compile; the scheduler asks `is_ready` before it
    admits a request; `EngineCore.step` calls `before_step` and `after_step` (both return at
    once when no request holds a grammar)."""

    def __init__(self, tokenizer_name: str | None, vocab_size: int) -> None:
        self._tokenizer_name = tokenizer_name
        self._vocab_size = vocab_size
        self._executor: ThreadPoolExecutor | None = None
        self._backend_future: Future[XgrammarBackend] | None = None
        self._cache: OrderedDict[tuple[str, str], Future[Any]] = OrderedDict()
        self._grammars: dict[str, _RequestGrammar] = {}
        self._num_pending = 0  # requests whose grammar is not ready yet
        self._bitmask: Any = None

    # -- requests ------------------------------------------------------------------------------

    @property
    def is_active(self) -> bool:
        """Whether any request holds a grammar (else the step skips this object)."""
        return bool(self._grammars)

    @property
    def has_pending(self) -> bool:
        """Whether a request waits for its grammar (the scheduler's gate is then on)."""
        return self._num_pending > 0

    def add(self, request: Request, params: StructuredOutputsParams) -> None:
        """Start compiling `params` for `request` (a cached spec is ready at once)."""
        future = self._compile(params)
        self._grammars[request.request_id] = _RequestGrammar(future, request.eos_token_id)
        self._num_pending += 1

    def is_ready(self, request: Request) -> bool:
        """False while the request's grammar compiles (or failed: `take_failed` ends it)."""
        grammar = self._grammars.get(request.request_id)
        if grammar is None or grammar.matcher is not None:
            return True
        if not grammar.future.done() or grammar.future.exception() is not None:
            return False
        backend = self._backend()
        grammar.matcher = backend.matcher(grammar.future.result(), grammar.eos_token_id)
        self._num_pending -= 1
        return True

    def remove(self, request_id: str) -> None:
        grammar = self._grammars.pop(request_id, None)
        if grammar is not None and grammar.matcher is None and grammar.failed is None:
            self._num_pending -= 1

    def take_failed(self) -> list[tuple[str, str]]:
        """(request id, reason) for each request whose spec failed to compile, forgotten."""
        failed = []
        for request_id, grammar in self._grammars.items():
            if grammar.matcher is None and grammar.future.done():
                error = grammar.future.exception()
                if error is not None:
                    failed.append((request_id, str(error)))
        for request_id, _ in failed:
            self.remove(request_id)
        return failed

    def wait(self, timeout_s: float) -> None:
        """Block up to `timeout_s` for a pending compile (a step had nothing else to do)."""
        pending = [g.future for g in self._grammars.values() if g.matcher is None]
        if pending:
            wait_futures(pending, timeout=timeout_s, return_when="FIRST_COMPLETED")

    # -- the step ------------------------------------------------------------------------------

    def before_step(self, scheduler: Scheduler, output: EngineCoreOutputList) -> None:
        """Fail the requests whose spec did not compile (an error output each)."""
        if not self.has_pending:
            return
        for request_id, reason in self.take_failed():
            for request in scheduler.finish_requests([request_id], RequestStatus.FINISHED_ERROR):
                output.append(
                    EngineCoreOutput(
                        request.request_id,
                        [],
                        finish_reason=FinishReason.ERROR,
                        stop_reason=GRAMMAR_ERROR_PREFIX + reason,
                    )
                )

    def fill_bitmask(self, so: SchedulerOutput, requests: dict[str, Request]) -> None:
        """Set `so.grammar_req_ids` and `so.grammar_bitmask` ([rows, words] int32): one row
        per constrained request this step samples (it reaches its last known token)."""
        ids = []
        for request_id in so.num_scheduled_tokens:
            grammar = self._grammars.get(request_id)
            if grammar is None or grammar.matcher is None:
                continue
            request = requests[request_id]
            if request.num_computed_tokens >= request.num_tokens:
                ids.append(request_id)
        if not ids:
            return
        bitmask = self._bitmask_rows(len(ids))
        for row, request_id in enumerate(ids):
            self._grammars[request_id].matcher.fill_next_token_bitmask(bitmask, row)
        so.grammar_req_ids = ids
        so.grammar_bitmask = bitmask[: len(ids)]

    def after_step(self, scheduler: Scheduler, outputs: list[EngineCoreOutput]) -> None:
        """Feed each constrained request's new tokens to its matcher; a grammar that has
        ended finishes its request (stopped); finished requests drop their grammar."""
        for output in outputs:
            grammar = self._grammars.get(output.request_id)
            if grammar is None:
                continue
            if grammar.matcher is not None and output.finish_reason is None:
                if not self._accept(grammar, output):
                    scheduler.finish_requests([output.request_id], RequestStatus.FINISHED_ERROR)
                    output.finish_reason = FinishReason.ERROR
                    output.stop_reason = GRAMMAR_ERROR_PREFIX + "the output broke its grammar"
                elif grammar.matcher.is_terminated():
                    scheduler.finish_requests([output.request_id], RequestStatus.FINISHED_STOPPED)
                    output.finish_reason = FinishReason.STOP
            elif grammar.matcher is not None:
                self._accept(grammar, output)
            if output.finish_reason is not None:
                self.remove(output.request_id)

    def _accept(self, grammar: _RequestGrammar, output: EngineCoreOutput) -> bool:
        """Feed the new tokens; False when one breaks the grammar (only when something
        overrode the mask, e.g. min_tokens banned the only token the grammar allowed)."""
        matcher = grammar.matcher
        for token_id in output.new_token_ids:
            if matcher.is_terminated():
                break
            if not matcher.accept_token(token_id):
                logger.warning(
                    "request %s: token %d breaks its grammar", output.request_id, token_id
                )
                return False
        return True

    # -- compiling -----------------------------------------------------------------------------

    def _compile(self, params: StructuredOutputsParams) -> Future[Any]:
        key = params.cache_key()
        future = self._cache.get(key)
        if future is not None and not (future.done() and future.exception() is not None):
            self._cache.move_to_end(key)
            return future
        future = self._pool().submit(self._compile_now, params)
        self._cache[key] = future
        while len(self._cache) > MAX_CACHED_GRAMMARS:
            self._cache.popitem(last=False)
        return future

    def _compile_now(self, params: StructuredOutputsParams) -> Any:
        return self._backend().compile(params)

    def _pool(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="GrammarCompile")
            # The first job: load xgrammar and the vocabulary (a few seconds, once).
            self._backend_future = self._executor.submit(self._load_backend)
        return self._executor

    def _load_backend(self) -> XgrammarBackend:
        from shoal.structured.backend import XgrammarBackend

        backend = XgrammarBackend(self._tokenizer_name, self._vocab_size)
        logger.info("structured outputs: xgrammar ready (vocabulary of %d)", self._vocab_size)
        return backend

    def _backend(self) -> XgrammarBackend:
        assert self._backend_future is not None
        return self._backend_future.result()

    def _bitmask_rows(self, num_rows: int) -> Any:
        if self._bitmask is None or self._bitmask.shape[0] < num_rows:
            self._bitmask = self._backend().allocate_bitmask(max(num_rows, 64))
        return self._bitmask

    def shutdown(self) -> None:
        """Stop the compile thread (pending compiles are dropped)."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)


EngineCoreOutputList = list[EngineCoreOutput]
