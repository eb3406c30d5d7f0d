"""Model-step faults for the engine-process tests: fake runners that fail, hang or crawl.

Engines build them in their own process through `runner_factory` (a keyword of
`CoreEngineProcManager` and `run_engine_core`), so the factories here are module-level
functions: they cross the spawn by pickle. The runners are `FakeModelRunner`s shaped like
the configured model (vocabulary, context length), so API servers with its tokenizer accept
the prompts and decode the tokens.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

from shoal.config import ShoalConfig
from shoal.core.runner_protocol import RunnerFactory
from shoal.core.scheduler_output import ModelRunnerOutput, SchedulerOutput
from shoal.engine.core_proc import run_engine_core
from shoal.model.arch import load_arch_config
from tests.core.core_fakes import FakeModelRunner

# Each step of the runners below takes this long: 100 tokens of one request take 4 s, longer
# than the stall timeouts the tests use, in steps far shorter than them, and a long request
# is still running when a test kills its engine.
SLOW_STEP_S = 0.04


class FaultyRunner(FakeModelRunner):
    """A fake runner of `config`'s model shape. A step that holds a request whose id
    contains `fail_on` raises; one that holds a request whose id contains `hang_on` never
    returns (sleeping: the GIL is free for the watchdogs); every step takes `step_s`."""

    def __init__(
        self,
        config: ShoalConfig,
        *,
        fail_on: str | None = None,
        hang_on: str | None = None,
        step_s: float = 0.0,
    ) -> None:
        arch = load_arch_config(config.model.model)
        max_model_len = config.model.max_model_len or arch.max_position_embeddings
        super().__init__(config, arch.vocab_size, max_model_len)
        self.fail_on, self.hang_on, self.step_s = fail_on, hang_on, step_s

    def execute_model(self, so: SchedulerOutput) -> ModelRunnerOutput:
        if self.fail_on is not None and _holds(so, self.fail_on):
            raise RuntimeError("injected fatal error")
        if self.hang_on is not None and _holds(so, self.hang_on):
            while True:
                time.sleep(0.1)
        time.sleep(self.step_s)
        return super().execute_model(so)


def _holds(so: SchedulerOutput, word: str) -> bool:
    return any(word in request_id for request_id in so.num_scheduled_tokens)


def failing_on_boom(config: ShoalConfig) -> FaultyRunner:
    """A slow runner (`SLOW_STEP_S` per step) whose step fails once it holds a request whose
    id contains "boom": the stand-in for a fatal model error."""
    return FaultyRunner(config, fail_on="boom", step_s=SLOW_STEP_S)


def hanging_on_hang(config: ShoalConfig) -> FaultyRunner:
    """A slow runner (`SLOW_STEP_S` per step) whose step never returns once it holds a
    request whose id contains "hang": the stand-in for a wedged kernel or a deadlock. SIGKILL
    (or the engine's own stall watchdog) ends it."""
    return FaultyRunner(config, hang_on="hang", step_s=SLOW_STEP_S)


def engine_target(runner_factory: RunnerFactory) -> Callable[..., None]:
    """`run_engine_core` with `runner_factory`: a `target_fn` for helpers that take a
    target rather than a factory (`hand_built_topology`)."""
    return functools.partial(run_engine_core, runner_factory=runner_factory)


def exit_with_code_3() -> None:
    """A child that dies at once (stands in for an API server failing during start-up)."""
    raise SystemExit(3)
