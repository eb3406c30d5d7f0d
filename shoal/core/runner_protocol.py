"""`Runner`: what `EngineCore` needs from a model runner (the real one is
`shoal.worker.model_runner.ModelRunner`; tests hand the core fakes)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from shoal.config import SchedulerConfig, ShoalConfig
from shoal.core.scheduler_output import ModelRunnerOutput, SchedulerOutput


class Runner(Protocol):
    """The model side of one engine, as the core drives it.

    Order of calls: `num_blocks_for_memory` (only when `--num-blocks` is not given), then
    `initialize_kv_cache` once, then `execute_model` once per step that scheduled tokens.
    The core reads the properties at any time after construction.
    """

    @property
    def vocab_size(self) -> int:
        """Number of token ids the model embeds: a prompt id must lie in [0, vocab_size)."""
        ...

    @property
    def max_model_len(self) -> int:
        """Longest request (prompt + output tokens) the model takes; the core lowers it to
        what the KV cache holds."""
        ...

    @property
    def scheduler_config(self) -> SchedulerConfig:
        """The scheduler settings with `max_num_batched_tokens` set (the step token budget
        this runner's device is sized for)."""
        ...

    def num_blocks_for_memory(self, memory_bytes: int) -> int:
        """How many KV blocks `memory_bytes` holds (0 if not even one)."""
        ...

    def initialize_kv_cache(self, num_blocks: int) -> None:
        """Allocate `num_blocks` KV blocks (block ids 0..num_blocks-1)."""
        ...

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        """Run one step: drop the state of `finished_req_ids` and `preempted_req_ids`, add
        the new requests, compute the scheduled tokens, and sample one token for each request
        whose step reaches its last known token. A step with nothing scheduled only drops
        state (the core sends one after its warm-up)."""
        ...


# Builds an engine's runner in the engine's own process. Passed to engine processes across
# a spawn, so it must pickle: a module-level function or class.
RunnerFactory = Callable[[ShoalConfig], Runner]
