"""`StatsLogger`: an engine's periodic one-line stats log, as vLLM prints it."""

from __future__ import annotations

import time
from collections.abc import Callable

from shoal.logger import init_logger
from shoal.protocol import EngineCoreOutputs, SchedulerStats

logger = init_logger(__name__)


class StatsLogger:
    """Sums each step's figures and, at most every `interval_s`, logs one INFO line:

        Avg prompt throughput: 812.4 tokens/s, Avg generation throughput: 95.2 tokens/s,
        Running: 4 reqs, Waiting: 0 reqs, KV cache usage: 12.5%, Prefix cache hit rate: 40.0%

    Throughputs and the hit rate cover the interval since the last line; queue lengths and KV
    usage are the latest. An idle engine logs once more (its zeros), then stays quiet.
    """

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self._clock = clock
        self._since = clock()
        self._prompt_tokens = 0
        self._generation_tokens = 0
        self._queries = 0
        self._hits = 0
        self._latest = SchedulerStats()
        self._was_idle = True

    def record(self, step: EngineCoreOutputs) -> None:
        """Count one step's outputs and stats."""
        stats = step.scheduler_stats
        self._generation_tokens += sum(len(o.new_token_ids) for o in step.outputs)
        if stats is None:
            return
        self._latest = stats
        self._prompt_tokens += stats.num_ctx_tokens
        self._queries += stats.prefix_cache_queries
        self._hits += stats.prefix_cache_hits

    def maybe_log(self) -> str | None:
        """Log (and return) the line when the interval has passed and there is something to
        say; None otherwise."""
        now = self._clock()
        elapsed = now - self._since
        if elapsed < self.interval_s:
            return None
        s = self._latest
        idle = (
            not (self._prompt_tokens or self._generation_tokens)
            and not s.num_running_reqs
            and not s.num_waiting_reqs
        )
        line = None
        if not (idle and self._was_idle):
            line = format_stats(
                self._prompt_tokens / elapsed,
                self._generation_tokens / elapsed,
                s,
                self._hits / self._queries if self._queries else 0.0,
            )
            logger.info("%s", line)
        self._was_idle = idle
        self._since = now
        self._prompt_tokens = self._generation_tokens = self._queries = self._hits = 0
        return line


def format_stats(
    prompt_tps: float, generation_tps: float, stats: SchedulerStats, hit_rate: float
) -> str:
    return (
        f"Avg prompt throughput: {prompt_tps:.1f} tokens/s, "
        f"Avg generation throughput: {generation_tps:.1f} tokens/s, "
        f"Running: {stats.num_running_reqs} reqs, Waiting: {stats.num_waiting_reqs} reqs, "
        f"KV cache usage: {100 * stats.kv_cache_usage:.1f}%, "
        f"Prefix cache hit rate: {100 * hit_rate:.1f}%"
    )
