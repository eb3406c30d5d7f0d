"""`EngineCore`: one engine's step loop body (schedule -> execute model -> update), no I/O."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from shoal.config import ShoalConfig
from shoal.core.request import Request, RequestStatus
from shoal.core.runner_protocol import Runner
from shoal.core.scheduler import Scheduler
from shoal.core.scheduler_output import ModelRunnerOutput, SchedulerOutput
from shoal.engine.stats import EngineStatsTracker
from shoal.logger import init_logger
from shoal.protocol import (
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
    FinishReason,
    SchedulerStats,
)
from shoal.sampling_params import SamplingParams
from shoal.structured.manager import StructuredOutputManager

logger = init_logger(__name__)


class EngineCore:
    """The scheduler and the model runner of one engine, driven one `step()` at a time.

    No sockets and no threads: the engine process wraps it with ZMQ I/O threads, and the
    offline `LLM` drives it in-process. Not thread-safe: call every method from one thread.
    """

    def __init__(
        self, config: ShoalConfig, engine_index: int = 0, runner: Runner | None = None
    ) -> None:
        """Size and allocate the KV cache, build the scheduler, warm up.

        `runner`: the model side (see `Runner`); None loads the model of `config` into a
        `ModelRunner`. The number of blocks is `config.cache.num_blocks`, else what
        `kv_cache_memory_bytes` holds. `max_model_len` is the runner's, capped to what the
        KV cache can hold for one request. `ValueError` for settings that cannot work.
        """
        self.config = config
        self.engine_index = engine_index
        self.model_runner: Runner = runner if runner is not None else _load_model_runner(config)
        block_size = config.cache.block_size
        num_blocks = config.cache.num_blocks or self.model_runner.num_blocks_for_memory(
            config.cache.kv_cache_memory_bytes
        )
        if num_blocks < 1:
            raise ValueError(
                f"--kv-cache-memory-bytes: {config.cache.kv_cache_memory_bytes} bytes hold no "
                "KV block of this model; raise it"
            )
        self.model_runner.initialize_kv_cache(num_blocks)
        max_model_len = min(self.model_runner.max_model_len, num_blocks * block_size)
        if max_model_len < self.model_runner.max_model_len:
            logger.warning(
                "max_model_len lowered from %d to %d: the KV cache holds only %d blocks of %d "
                "tokens; raise --kv-cache-memory-bytes or --num-blocks for longer requests",
                self.model_runner.max_model_len,
                max_model_len,
                num_blocks,
                block_size,
            )
        self._scheduler_args = (
            self.model_runner.scheduler_config,
            config.cache,
            num_blocks,
            max_model_len,
        )
        self.scheduler = Scheduler(*self._scheduler_args)
        # Grammars of structured outputs: compiled on their own thread, so a request waits
        # in the scheduler (the gate) while the batch goes on.
        self.structured = StructuredOutputManager(
            config.model.tokenizer or config.model.model, self.model_runner.vocab_size
        )
        self.scheduler.gate = self.structured
        self._pending_outputs: list[EngineCoreOutput] = []
        self.stats = EngineStatsTracker()
        self.warm_up()
        logger.info(
            "KV cache: %d blocks x %d tokens = %d token slots (%.2fx requests of max_model_len "
            "%d at once); prefix caching %s",
            num_blocks,
            block_size,
            num_blocks * block_size,
            num_blocks * block_size / max_model_len,
            max_model_len,
            "on" if config.cache.enable_prefix_caching else "off",
        )

    @property
    def max_model_len(self) -> int:
        return self.scheduler.max_model_len

    @property
    def hidden_size(self) -> int:
        """The model's hidden size (0 for a runner without an `arch`, as tests' fakes)."""
        arch = getattr(self.model_runner, "arch", None)
        return int(getattr(arch, "hidden_size", 0))

    @property
    def num_blocks(self) -> int:
        return self.scheduler.kv.num_blocks

    @property
    def block_size(self) -> int:
        return self.scheduler.block_size

    def add_request(
        self,
        request: EngineCoreRequest,
        prompt_embeds: Any = None,
        cache_salt: bytes | None = None,
    ) -> None:
        """Queue a request. `ValueError` for an empty prompt, a prompt longer than
        `max_model_len`, a prompt token id outside the model's vocabulary, or a request id
        already in the engine. `prompt_embeds`: the prompt's [num_prompt_tokens, hidden]
        input embeddings (the token ids are then placeholders), with `cache_salt` (a digest
        of them) starting its block-hash chain."""
        # The engine checks the ids itself: the embedding lookup does not, and an id past it
        # fails the whole step (every request of the engine) on CPU, and on CUDA would be a
        # device-side assert.
        # The API server's check uses the tokenizer's vocabulary, which can differ from the
        # model's, and other clients of the engine socket may send anything.
        vocab_size = self.model_runner.vocab_size
        engine_request = Request.from_engine_core_request(request, self.max_model_len, vocab_size)
        if prompt_embeds is not None:
            check_prompt_embeds(prompt_embeds, engine_request.num_prompt_tokens, self.hidden_size)
            engine_request.prompt_embeds = prompt_embeds
            engine_request.cache_salt = cache_salt
        self.scheduler.add_request(engine_request)
        if request.sampling_params.structured_outputs is not None:
            self.structured.add(engine_request, request.sampling_params.structured_outputs)
        self.stats.on_add(request.request_id, time.monotonic())

    def abort_requests(self, request_ids: Iterable[str]) -> None:
        """Abort requests at any stage and free their blocks. Each one that was unfinished
        gets an output with finish_reason ABORT in the next `step()`; others are ignored."""
        for request in self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED):
            self._pending_outputs.append(
                EngineCoreOutput(
                    request.request_id,
                    [],
                    finish_reason=FinishReason.ABORT,
                    num_cached_tokens=max(request.num_cached_tokens, 0),
                )
            )

    def abort_all_requests(self) -> None:
        """Abort every unfinished request (shutdown without draining)."""
        self.abort_requests(list(self.scheduler.requests))

    def has_unfinished_requests(self) -> bool:
        """True while a `step()` has work: requests to run or abort outputs to deliver."""
        return self.scheduler.has_unfinished_requests() or bool(self._pending_outputs)

    def step(self) -> EngineCoreOutputs:
        """Run one step: schedule, execute the model (skipped when nothing is scheduled),
        update. Returns outputs for requests that got tokens or finished (aborts included),
        and this step's scheduler stats."""
        outputs, self._pending_outputs = self._pending_outputs, []
        structured = self.structured
        structured.before_step(self.scheduler, outputs)
        started_s = time.monotonic()
        scheduler_output = self.scheduler.schedule()
        if structured.is_active:
            structured.fill_bitmask(scheduler_output, self.scheduler.requests)
        if scheduler_output.total_num_scheduled_tokens > 0:
            runner_output = self.model_runner.execute_model(scheduler_output)
        else:
            runner_output = ModelRunnerOutput()
            if structured.has_pending:
                structured.wait(0.005)  # only grammars to wait for: do not spin
        outputs.extend(self.scheduler.update_from_output(scheduler_output, runner_output))
        if structured.is_active:
            structured.after_step(self.scheduler, outputs)
        stats = self.scheduler.get_stats()
        self.stats.on_step(scheduler_output, stats, outputs, started_s, time.monotonic())
        return EngineCoreOutputs(
            engine_index=self.engine_index,
            outputs=outputs,
            scheduler_stats=self.stats.fill(stats),
            timestamp=time.time(),
        )

    def warm_up(self) -> None:
        """Run a few short requests through every step path before the engine reports ready:
        a greedy request alone (the greedy LM head, the fused decode path), then a greedy and
        a seeded sampled one together (logits and the sampler), then one with logits controls
        beside a prompt-only one (penalties, prompt logprobs, pooling), each a prefill across
        a block boundary and a few decode steps. The first request otherwise paid for loading the
        native kernels, starting the thread pools and first-touch page faults (docs/serving.md,
        "Ready means ready"). Their blocks and stats are then discarded: the scheduler starts
        afresh, and the runner drops their state on a last step with nothing scheduled (every
        `Runner` takes one, fakes included, so warm-up runs whatever the runner)."""
        start = time.monotonic()
        block_size, max_len = self.block_size, self.max_model_len
        prompt_len = max(1, min(block_size + 3, max_len - 4))
        max_tokens = max(1, min(4, max_len - prompt_len))
        vocab = self.model_runner.vocab_size
        prompt = [(7 + 31 * i) % vocab for i in range(prompt_len)]
        greedy = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        sampled = SamplingParams(
            temperature=1.0, top_p=0.9, seed=0, logprobs=1, max_tokens=max_tokens, ignore_eos=True
        )
        # Logits controls, and the prompt pass (prompt logprobs, pooling) of prompt-only work.
        controlled = SamplingParams(
            temperature=0.0, max_tokens=max_tokens, ignore_eos=True, repetition_penalty=1.1,
            frequency_penalty=0.1, logit_bias={0: 1.0},
        )  # fmt: skip
        scored = SamplingParams(max_tokens=0, prompt_logprobs=1, pooling="mean")
        rounds = [[greedy], [greedy, sampled], [controlled, scored]]
        finished: set[str] = set()
        for r, round_params in enumerate(rounds):
            ids = [f"warmup-{r}-{i}" for i in range(len(round_params))]
            for request_id, params in zip(ids, round_params, strict=True):
                self.add_request(EngineCoreRequest(request_id, prompt, params, None, time.time()))
            for _ in range(8 * (prompt_len + max_tokens)):  # bounded: a tiny cache may stall
                if not self.has_unfinished_requests():
                    break
                self.step()
            self.abort_all_requests()
            finished.update(ids)
        # The runner drops a request's state when a later step names it finished.
        self.model_runner.execute_model(SchedulerOutput(finished_req_ids=finished))
        self._pending_outputs = []
        self.scheduler = Scheduler(*self._scheduler_args)
        self.scheduler.gate = self.structured
        self.stats = EngineStatsTracker()
        logger.info("warm-up: %.0f ms through every step path", 1e3 * (time.monotonic() - start))

    def get_stats(self) -> SchedulerStats:
        """Queue lengths and KV usage now, with the last step's figures and the totals."""
        return self.stats.fill(self.scheduler.get_stats())


def check_prompt_embeds(prompt_embeds: Any, num_prompt_tokens: int, hidden_size: int) -> None:
    """`ValueError` naming `prompt_embeds` unless it is [num_prompt_tokens, hidden_size]
    (any width when `hidden_size` is 0)."""
    shape = tuple(prompt_embeds.shape)
    if (
        len(shape) != 2
        or shape[0] != num_prompt_tokens
        or (hidden_size and shape[1] != hidden_size)
    ):
        raise ValueError(
            f"prompt_embeds: shape {list(shape)} does not match the request "
            f"([{num_prompt_tokens}, {hidden_size or 'hidden'}])"
        )


def _load_model_runner(config: ShoalConfig) -> Runner:
    """The real runner: `config`'s model loaded into a `ModelRunner`."""
    # How the OpenMP threads wait is fixed when torch is first imported: choose it now.
    from shoal.openmp_policy import configure_engine

    omp_policy = configure_engine(config)
    # Imported here: importing this module (the launcher does, through the engine process's
    # entry point) must not import torch.
    from shoal.worker.model_runner import ModelRunner

    if omp_policy:
        logger.info("OpenMP threads wait with %s", omp_policy)
    return ModelRunner(config)
