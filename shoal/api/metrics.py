"""Prometheus metrics of the API servers, shared across N processes through mmap'd files.

Why files: each API server sees only its own requests, and each engine sends its scheduler
stats only to the API servers it has outputs for. So every server keeps its figures in a
small file of float64 slots (`api_server_<i>.metrics` in a directory all servers share), and
`/metrics` on any server reads every file: request counters and histograms are summed (each
request belongs to exactly one server), engine gauges are taken from whichever file holds that
engine's most recent stats. Any server therefore answers with the same numbers.

Layout of one file (float64 each):

    [magic, pid] [counters ...] [per histogram: buckets..., +Inf, sum, count]
    [per engine: timestamp, running, waiting, kv usage, blocks total, blocks free,
                 ctx requests, ctx tokens, generation requests, generation tokens, preemptions]
"""

from __future__ import annotations

import contextlib
import glob
import mmap
import os
from bisect import bisect_left
from dataclasses import dataclass

from shoal.logger import init_logger
from shoal.protocol import SchedulerStats

logger = init_logger(__name__)

_MAGIC = 5.0  # bump when the layout changes
_HEADER = 2

FINISH_REASONS = ("stop", "length", "abort", "error")
COUNTERS: tuple[tuple[str, str], ...] = (
    ("prompt_tokens_total", "Prompt tokens processed."),
    ("generation_tokens_total", "Generated tokens."),
    ("requests_received_total", "Requests accepted by the API servers (n > 1 counts once)."),
) + tuple(
    (f"request_success_total:{r}", "Finished sequences by finish reason.") for r in FINISH_REASONS
)

_LATENCY_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)


@dataclass(frozen=True)
class HistogramDef:
    name: str
    help: str
    buckets: tuple[float, ...]

    @property
    def num_slots(self) -> int:
        return len(self.buckets) + 3  # +Inf, sum, count


HISTOGRAMS = (
    HistogramDef("time_to_first_token_seconds", "Time to first token.", _LATENCY_BUCKETS),
    HistogramDef(
        "inter_token_latency_seconds",
        "Time between consecutive outputs of a sequence.",
        _LATENCY_BUCKETS,
    ),
    HistogramDef(
        "e2e_request_latency_seconds",
        "Time from arrival to finish of a sequence.",
        _LATENCY_BUCKETS + (160.0, 320.0),
    ),
)

# Per-engine gauges, in slot order after the timestamp: (metric name, help, SchedulerStats field)
ENGINE_GAUGES: tuple[tuple[str, str, str], ...] = (
    ("num_requests_running", "Requests running in the engine.", "num_running_reqs"),
    ("num_requests_waiting", "Requests waiting in the engine.", "num_waiting_reqs"),
    ("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1).", "kv_cache_usage"),
    ("kv_cache_blocks_total", "KV-cache blocks of the engine.", "num_blocks_total"),
    ("kv_cache_blocks_free", "Free KV-cache blocks of the engine.", "num_blocks_free"),
    (
        "iteration_context_requests",
        "Context (prefill) requests in the engine's last step.",
        "num_ctx_requests",
    ),
    (
        "iteration_context_tokens",
        "Context (prefill) tokens in the engine's last step.",
        "num_ctx_tokens",
    ),
    (
        "iteration_generation_requests",
        "Generation requests in the engine's last step.",
        "num_generation_requests",
    ),
    (
        "iteration_generation_tokens",
        "Generation tokens in the engine's last step.",
        "num_generation_tokens",
    ),
    ("preemptions_last_step", "Requests preempted in the engine's last step.", "num_preemptions"),
)
_ENGINE_SLOTS = 1 + len(ENGINE_GAUGES)
PREFIX = "shoal:"


def _num_slots(num_engines: int) -> int:
    return (
        _HEADER + len(COUNTERS) + sum(h.num_slots for h in HISTOGRAMS) + num_engines * _ENGINE_SLOTS
    )


class MetricsStore:
    """This API server's slots, in a shared file when `directory` is given (else in memory).

    Writers: `inc`, `observe`, `set_engine_stats` (this process only). Readers:
    `snapshot()` sums every server's file of the same run."""

    def __init__(
        self, num_engines: int, directory: str | None = None, client_index: int = 0
    ) -> None:
        self.num_engines = num_engines
        self.directory = directory
        self.num_slots = _num_slots(num_engines)
        self.path: str | None = None
        self._mmap: mmap.mmap | None = None
        if directory is not None:
            self.path = os.path.join(directory, f"api_server_{client_index}.metrics")
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.ftruncate(fd, self.num_slots * 8)
                self._mmap = mmap.mmap(fd, self.num_slots * 8)
            finally:
                os.close(fd)
            self.slots = memoryview(self._mmap).cast("d")
        else:
            self.slots = memoryview(bytearray(self.num_slots * 8)).cast("d")
        self.slots[1] = float(os.getpid())
        self.slots[0] = _MAGIC  # written last: a reader skips a file not yet initialised
        self._counter_index = {name: _HEADER + i for i, (name, _) in enumerate(COUNTERS)}
        offset = _HEADER + len(COUNTERS)
        self._hist_offset: dict[str, int] = {}
        for h in HISTOGRAMS:
            self._hist_offset[h.name] = offset
            offset += h.num_slots
        self._engine_offset = offset

    # -- writers ------------------------------------------------------------------------------

    def inc(self, name: str, value: float = 1.0) -> None:
        self.slots[self._counter_index[name]] += value

    def observe(self, hist: HistogramDef, value: float) -> None:
        base = self._hist_offset[hist.name]
        # The first bucket with value <= bound (len(buckets): +Inf).
        i = bisect_left(hist.buckets, value)
        # Buckets hold plain (non-cumulative) counts; exposition accumulates them.
        self.slots[base + i] += 1
        self.slots[base + len(hist.buckets) + 1] += value
        self.slots[base + len(hist.buckets) + 2] += 1

    def set_engine_stats(self, engine: int, timestamp: float, stats: SchedulerStats) -> None:
        base = self._engine_offset + engine * _ENGINE_SLOTS
        if not 0 <= engine < self.num_engines or timestamp < self.slots[base]:
            return
        for j, (_, _, field) in enumerate(ENGINE_GAUGES, 1):
            self.slots[base + j] = float(getattr(stats, field))
        self.slots[base] = timestamp  # last, so a reader never pairs new time with old values

    # -- readers ------------------------------------------------------------------------------

    def snapshot(self) -> list[float]:
        """Every server's slots combined: counters and histograms summed, engine gauges from
        the file with the newest stats for that engine."""
        total = list(self.slots)
        for slots in self._peer_slots():
            for i in range(_HEADER, self._engine_offset):
                total[i] += slots[i]
            for k in range(self.num_engines):
                base = self._engine_offset + k * _ENGINE_SLOTS
                if slots[base] > total[base]:
                    total[base : base + _ENGINE_SLOTS] = slots[base : base + _ENGINE_SLOTS]
        return total

    def _peer_slots(self) -> list[list[float]]:
        if self.directory is None:
            return []
        found = []
        for path in sorted(glob.glob(os.path.join(self.directory, "api_server_*.metrics"))):
            if path == self.path:
                continue
            try:
                with open(path, "rb") as f:
                    data = f.read(self.num_slots * 8)
            except OSError:
                continue  # a peer that exited and removed its file
            if len(data) != self.num_slots * 8:
                continue
            slots = list(memoryview(data).cast("d"))
            if slots[0] == _MAGIC:
                found.append(slots)
        return found

    def render(self, model_name: str) -> str:
        """The Prometheus text exposition (format 0.0.4) of `snapshot()`."""
        return render(self.snapshot(), self, model_name)

    def close(self) -> None:
        """Release the mapping and remove this server's file."""
        self.slots.release()
        if self._mmap is not None:
            self._mmap.close()
            self._mmap = None
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


def render(values: list[float], store: MetricsStore, model_name: str) -> str:
    label = f'model_name="{_escape(model_name)}"'
    lines: list[str] = []
    seen: set[str] = set()
    for name, help_text in COUNTERS:
        base_name, _, reason = name.partition(":")
        full = PREFIX + base_name
        if full not in seen:
            seen.add(full)
            lines += [f"# HELP {full} {help_text}", f"# TYPE {full} counter"]
        labels = label + (f',finished_reason="{reason}"' if reason else "")
        lines.append(f"{full}{{{labels}}} {_fmt(values[store._counter_index[name]])}")
    for hist in HISTOGRAMS:
        lines += _render_histogram(hist, values, store._hist_offset[hist.name], label)
    for j, (name, help_text, _) in enumerate(ENGINE_GAUGES, 1):
        full = PREFIX + name
        lines += [f"# HELP {full} {help_text}", f"# TYPE {full} gauge"]
        for k in range(store.num_engines):
            value = values[store._engine_offset + k * _ENGINE_SLOTS + j]
            lines.append(f'{full}{{{label},engine="{k}"}} {_fmt(value)}')
    return "\n".join(lines) + "\n"


def _render_histogram(hist: HistogramDef, values: list[float], base: int, label: str) -> list[str]:
    full = PREFIX + hist.name
    lines = [f"# HELP {full} {hist.help}", f"# TYPE {full} histogram"]
    cumulative = 0.0
    for i, bound in enumerate((*hist.buckets, float("inf"))):
        cumulative += values[base + i]
        le = "+Inf" if bound == float("inf") else repr(bound)
        lines.append(f'{full}_bucket{{{label},le="{le}"}} {_fmt(cumulative)}')
    n = len(hist.buckets)
    lines.append(f"{full}_sum{{{label}}} {_fmt(values[base + n + 1])}")
    lines.append(f"{full}_count{{{label}}} {_fmt(values[base + n + 2])}")
    return lines


def _fmt(value: float) -> str:
    return str(int(value)) if value.is_integer() else repr(value)


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
