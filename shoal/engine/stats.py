"""`EngineStatsTracker`: an engine's cumulative counters and per-request phase times, for /metrics.

Why cumulative, in the engine: an engine sends its `SchedulerStats` only with the outputs of
a step (or a heartbeat), so a step that prefills a chunk and samples nothing is never seen on
its own by an API server. Per-step figures would be lost there; totals since the engine
started are not: each API server keeps the newest totals it heard (shoal.api.metrics).

Phase times of one request (vLLM's definitions), measured on the engine's monotonic clock and
sent as durations with the request's final output (engines may run on other machines):

    queued --queue--> first scheduled --prefill--> first token --decode--> last token
                      |<------------------ inference ----------------->|
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable

from shoal.core.scheduler_output import SchedulerOutput
from shoal.protocol import EngineCoreOutput, RequestPhaseTimes, SchedulerStats

# Upper bounds of the tokens-per-step histogram (`iteration_tokens_total`); +Inf follows.
ITERATION_TOKENS_BUCKETS: tuple[int, ...] = (
    1,
    8,
    16,
    32,
    64,
    128,
    256,
    512,
    1024,
    2048,
    4096,
    8192,
    16384,
)

_QUEUED, _SCHEDULED, _FIRST_TOKEN, _LAST_TOKEN = range(4)


class EngineStatsTracker:
    """Counters since the engine started and the phase timestamps of its live requests.

    `on_add` when a request is queued, `on_step` after every step (with all of the step's
    outputs, aborts included), `fill` to copy the totals into a `SchedulerStats`."""

    def __init__(self) -> None:
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        self.num_preemptions = 0
        # Steps per tokens-scheduled bucket (+Inf last), and the tokens of every step.
        self.iteration_tokens_counts = [0] * (len(ITERATION_TOKENS_BUCKETS) + 1)
        self.iteration_tokens_sum = 0
        # request id -> [queued, first scheduled, first token, last token] (monotonic s; 0 =
        # not yet).
        self._times: dict[str, list[float]] = {}

    def on_add(self, request_id: str, now: float) -> None:
        """Request `request_id` was queued at `now`."""
        self._times[request_id] = [now, 0.0, 0.0, 0.0]

    def on_step(
        self,
        scheduler_output: SchedulerOutput,
        stats: SchedulerStats,
        outputs: Iterable[EngineCoreOutput],
        started_s: float,
        now: float,
    ) -> None:
        """Count the step (`stats` holds its per-step figures; it started at `started_s` and
        its outputs are ready at `now`) and note the phase times of its requests; a finished
        request's output gets its `RequestPhaseTimes`."""
        self.prefix_cache_queries += stats.prefix_cache_queries
        self.prefix_cache_hits += stats.prefix_cache_hits
        self.num_preemptions += stats.num_preemptions
        num_tokens = scheduler_output.total_num_scheduled_tokens
        if num_tokens > 0:
            self.iteration_tokens_counts[bisect_left(ITERATION_TOKENS_BUCKETS, num_tokens)] += 1
            self.iteration_tokens_sum += num_tokens
        times = self._times
        for new in scheduler_output.scheduled_new_reqs:
            entry = times.get(new.req_id)
            if entry is not None and not entry[_SCHEDULED]:
                entry[_SCHEDULED] = started_s
        for output in outputs:
            entry = times.get(output.request_id)
            if entry is None:
                continue
            if output.new_token_ids:
                if not entry[_FIRST_TOKEN]:
                    entry[_FIRST_TOKEN] = now
                entry[_LAST_TOKEN] = now
            if output.finish_reason is not None:
                del times[output.request_id]
                output.phase_times = _phase_times(entry, now)

    def fill(self, stats: SchedulerStats) -> SchedulerStats:
        """`stats` with the totals since the engine started."""
        stats.prefix_cache_queries_total = self.prefix_cache_queries
        stats.prefix_cache_hits_total = self.prefix_cache_hits
        stats.num_preemptions_total = self.num_preemptions
        stats.iteration_tokens_counts = list(self.iteration_tokens_counts)
        stats.iteration_tokens_sum = self.iteration_tokens_sum
        return stats


def _phase_times(entry: list[float], now: float) -> RequestPhaseTimes:
    """Durations of a finished request; phases it never reached last 0 (one never scheduled
    spent its whole life queued)."""
    queued, scheduled, first, last = entry
    if not scheduled:
        return RequestPhaseTimes(now - queued, 0.0, 0.0)
    if not first:
        return RequestPhaseTimes(scheduled - queued, now - scheduled, 0.0)
    return RequestPhaseTimes(scheduled - queued, first - scheduled, last - first)
