"""The run's Prometheus metrics (vLLM v1's names and labels), in mmap'd files every API server shares.

Why files: each API server sees only its own requests, and each engine sends its scheduler
stats only to the API servers it has outputs for. So every server keeps its figures in a
small file of float64 slots (`api_server_<i>.metrics` in a directory all servers share), and
`/metrics` on any server reads every file: request counters and histograms are summed (each
request belongs to exactly one server), engine figures are taken from whichever file holds
that engine's most recent stats (the engine sends totals, not deltas: shoal.engine.stats).
Any server therefore answers with the same numbers.

Names: every family vLLM v1 has is served twice, as `vllm:<name>` (what vLLM's Grafana
dashboards query) and `shoal:<name>`, with vLLM's labels (`model_name`, `engine`);
shoal's own families (KV blocks, the last step's details, admission) only as `shoal:`.
`/metrics?prefix=vllm` (or `shoal`) serves one set (docs/observability.md).

Layout of one file (float64 each):

    [magic, pid, requests received]
    per engine: [request counters and histograms (buckets..., +Inf, sum, count)]
                [timestamp, engine gauges, engine totals, iteration-tokens histogram]
"""

from __future__ import annotations

import contextlib
import glob
import json
import mmap
import os
import re
import time
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import parse_qs

from shoal.api.metric_families import (
    ENGINE_FIGURES,
    FINISH_REASONS,
    ITERATION_TOKENS,
    REQUEST_METRICS,
    REQUEST_SUCCESS,
    Metric,
)
from shoal.logger import init_logger
from shoal.protocol import SchedulerStats

logger = init_logger(__name__)

_MAGIC = 6.0  # bump when the layout changes
_HEADER = 3  # magic, pid, requests received
_RECEIVED = 2
PREFIXES = ("vllm:", "shoal:")
_MAX_ERRORS = 20  # recent errors kept per server (the dashboard's list)


_ENGINE_SLOTS = 1 + len(ENGINE_FIGURES) + ITERATION_TOKENS.num_slots
_REQUEST_SLOTS = sum(m.num_slots for m in REQUEST_METRICS)
_PER_ENGINE = _REQUEST_SLOTS + _ENGINE_SLOTS


def _num_slots(num_engines: int) -> int:
    return _HEADER + num_engines * _PER_ENGINE


@dataclass
class Snapshot:
    """Every server's slots combined (`values`), and the servers found: (index, pid)."""

    values: list[float]
    servers: list[tuple[int, int]]


class MetricsStore:
    """This API server's slots, in a shared file when `directory` is given (else in memory).

    Writers: `inc`, `inc_finished`, `observe`, `set_engine_stats` (this process only).
    Readers: `snapshot()` combines every server's file of the run; `counter`, `gauge`,
    `histogram` read one engine's figures from a snapshot's values."""

    def __init__(
        self, num_engines: int, directory: str | None = None, client_index: int = 0
    ) -> None:
        self.num_engines = num_engines
        self.directory = directory
        self.client_index = client_index
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
        self._errors: list[dict[str, object]] = []
        # [engine][metric name] -> first slot
        self._offsets: list[dict[str, int]] = []
        for k in range(num_engines):
            offset = _HEADER + k * _PER_ENGINE
            offsets: dict[str, int] = {}
            for metric in REQUEST_METRICS:
                offsets[metric.name] = offset
                offset += metric.num_slots
            offsets[""] = offset  # the engine block: timestamp first
            self._offsets.append(offsets)

    # -- writers ------------------------------------------------------------------------------

    def inc_received(self) -> None:
        """One more request accepted (before an engine is chosen)."""
        self.slots[_RECEIVED] += 1

    def inc(self, engine: int, metric: Metric, value: float = 1.0) -> None:
        """Add `value` to request counter `metric` of `engine`."""
        self.slots[self._offsets[engine][metric.name]] += value

    def inc_finished(self, engine: int, reason: str) -> None:
        """One more request finished with `reason` (one of FINISH_REASONS)."""
        base = self._offsets[engine][REQUEST_SUCCESS.name]
        self.slots[base + FINISH_REASONS.index(reason)] += 1

    def observe(self, engine: int, metric: Metric, value: float) -> None:
        """Record `value` in request histogram `metric` of `engine`."""
        base = self._offsets[engine][metric.name]
        n = len(metric.buckets)
        # The first bucket with value <= bound (n: +Inf). Buckets hold plain counts;
        # exposition accumulates them.
        self.slots[base + bisect_left(metric.buckets, value)] += 1
        self.slots[base + n + 1] += value
        self.slots[base + n + 2] += 1

    def set_engine_stats(self, engine: int, timestamp: float, stats: SchedulerStats) -> None:
        """Keep `engine`'s figures from `stats` unless this file holds newer ones."""
        if not 0 <= engine < self.num_engines:
            return
        base = self._offsets[engine][""]
        if timestamp < self.slots[base]:
            return
        slots = self.slots
        for j, (_, field) in enumerate(ENGINE_FIGURES, 1):
            slots[base + j] = float(getattr(stats, field))
        hist = base + 1 + len(ENGINE_FIGURES)
        counts = stats.iteration_tokens_counts
        n = len(ITERATION_TOKENS.buckets)
        for i in range(n + 1):
            slots[hist + i] = float(counts[i]) if i < len(counts) else 0.0
        slots[hist + n + 1] = float(stats.iteration_tokens_sum)
        slots[hist + n + 2] = float(sum(counts))
        slots[base] = timestamp  # last, so a reader never pairs new time with old values

    def note_error(self, kind: str, message: str) -> None:
        """Keep an error for the dashboard's recent errors (the last `_MAX_ERRORS` of this
        server, in `api_server_<i>.errors` beside the metrics file: errors are rare, so the
        whole list is rewritten each time)."""
        entry = {"time": time.time(), "server": self.client_index, "kind": kind}
        entry["message"] = message[:500]
        self._errors.append(entry)
        del self._errors[:-_MAX_ERRORS]
        if self.path is None:
            return
        path = self.path[: -len(".metrics")] + ".errors"
        try:
            with open(path + ".tmp", "w") as f:
                json.dump(self._errors, f)
            os.replace(path + ".tmp", path)
        except OSError:
            logger.debug("could not write %s", path, exc_info=True)

    def recent_errors(self) -> list[dict[str, object]]:
        """Every server's recent errors, newest first (at most `_MAX_ERRORS`)."""
        errors = list(self._errors)
        if self.directory is not None and self.path is not None:
            own = self.path[: -len(".metrics")] + ".errors"
            for path in glob.glob(os.path.join(self.directory, "api_server_*.errors")):
                if path == own:
                    continue
                with contextlib.suppress(OSError, ValueError), open(path) as f:
                    errors += [e for e in json.load(f) if isinstance(e, dict)]
        errors.sort(key=lambda e: float(e.get("time", 0.0)), reverse=True)  # type: ignore[arg-type]
        return errors[:_MAX_ERRORS]

    # -- readers ------------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """Every server's slots combined: counters and histograms summed, engine figures from
        the file with the newest stats for that engine."""
        total = list(self.slots)
        servers = [(self.client_index, os.getpid())]
        for index, slots in self._peer_slots():
            servers.append((index, int(slots[1])))
            total[_RECEIVED] += slots[_RECEIVED]
            for k in range(self.num_engines):
                start = _HEADER + k * _PER_ENGINE
                for i in range(start, start + _REQUEST_SLOTS):
                    total[i] += slots[i]
                base = start + _REQUEST_SLOTS
                if slots[base] > total[base]:
                    total[base : base + _ENGINE_SLOTS] = slots[base : base + _ENGINE_SLOTS]
        servers.sort()
        return Snapshot(total, servers)

    def _peer_slots(self) -> list[tuple[int, list[float]]]:
        if self.directory is None:
            return []
        found = []
        for path in sorted(glob.glob(os.path.join(self.directory, "api_server_*.metrics"))):
            match = re.search(r"api_server_(\d+)\.metrics$", path)
            if path == self.path or match is None:
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
                found.append((int(match.group(1)), slots))
        return found

    def received(self, values: Sequence[float]) -> float:
        """Requests accepted, from a snapshot's values."""
        return values[_RECEIVED]

    def counter(self, values: Sequence[float], engine: int, metric: Metric) -> float:
        """A request counter (summed over finish reasons) or an engine figure."""
        if metric.name in self._offsets[engine]:
            base = self._offsets[engine][metric.name]
            return sum(values[base : base + metric.num_slots])
        base = self._offsets[engine][""]
        for j, (figure, _) in enumerate(ENGINE_FIGURES, 1):
            if figure is metric:
                return values[base + j]
        raise KeyError(metric.name)

    gauge = counter

    def finished(self, values: Sequence[float], engine: int, reason: str) -> float:
        """Requests of `engine` finished with `reason`, from a snapshot's values."""
        return values[self._offsets[engine][REQUEST_SUCCESS.name] + FINISH_REASONS.index(reason)]

    def histogram(
        self, values: Sequence[float], engine: int, metric: Metric
    ) -> tuple[list[float], float, float]:
        """(plain bucket counts with +Inf last, sum, count) of one engine's histogram."""
        if metric is ITERATION_TOKENS:
            base = self._offsets[engine][""] + 1 + len(ENGINE_FIGURES)
        else:
            base = self._offsets[engine][metric.name]
        n = len(metric.buckets)
        return list(values[base : base + n + 1]), values[base + n + 1], values[base + n + 2]

    def render(
        self,
        model_name: str,
        cache_config: Sequence[tuple[int, int]] = (),
        prefixes: Sequence[str] = PREFIXES,
    ) -> str:
        """The Prometheus text exposition (format 0.0.4) of `snapshot()`. `cache_config`:
        (block_size, num_blocks) of each engine, for `cache_config_info`."""
        return render(self.snapshot().values, self, model_name, cache_config, prefixes)

    def close(self) -> None:
        """Release the mapping and remove this server's file."""
        self.slots.release()
        if self._mmap is not None:
            self._mmap.close()
            self._mmap = None
        if self.path is not None:
            errors = self.path[: -len(".metrics")] + ".errors"
            for path in (self.path, errors, errors + ".tmp"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            self.path = None  # a late note_error must not write the errors file again


def metric_prefixes(query_string: bytes) -> tuple[str, ...]:
    """The name sets a /metrics query asks for: `prefix=vllm` or `prefix=shoal` one of them,
    none both. `ValueError` naming `prefix` for anything else."""
    chosen = parse_qs(query_string.decode("latin-1")).get("prefix")
    if not chosen:
        return PREFIXES
    wanted = tuple(f"{value}:" for value in chosen)
    unknown = [value for value in chosen if f"{value}:" not in PREFIXES]
    if unknown:
        raise ValueError(f"prefix: must be 'vllm' or 'shoal', got {unknown[0]!r}")
    return tuple(p for p in PREFIXES if p in wanted)


def render(
    values: Sequence[float],
    store: MetricsStore,
    model_name: str,
    cache_config: Sequence[tuple[int, int]] = (),
    prefixes: Sequence[str] = PREFIXES,
) -> str:
    """The exposition of `values` (a snapshot of `store`'s run), one block per prefix."""
    model = f'model_name="{_escape(model_name)}"'
    engines = range(store.num_engines)
    lines: list[str] = []
    for prefix in prefixes:
        is_vllm = prefix == "vllm:"
        for metric in (*REQUEST_METRICS, *(m for m, _ in ENGINE_FIGURES), ITERATION_TOKENS):
            if is_vllm and not metric.is_vllm:
                continue
            full = prefix + metric.name
            lines += [f"# HELP {full} {metric.help}", f"# TYPE {full} {metric.kind}"]
            for k in engines:
                labels = f'{model},engine="{k}"'
                if metric.kind == "histogram":
                    hist = store.histogram(values, k, metric)
                    lines += _histogram_lines(full, labels, metric, *hist)
                elif metric.by_reason:
                    for reason in FINISH_REASONS:
                        value = store.finished(values, k, reason)
                        lines.append(f'{full}{{{labels},finished_reason="{reason}"}} {_fmt(value)}')
                else:
                    lines.append(f"{full}{{{labels}}} {_fmt(store.counter(values, k, metric))}")
        lines += _cache_config_lines(prefix + "cache_config_info", model, cache_config)
        if not is_vllm:
            full = prefix + "requests_received_total"
            lines += [
                f"# HELP {full} Requests accepted by the API servers (n > 1 counts once).",
                f"# TYPE {full} counter",
                f"{full}{{{model}}} {_fmt(store.received(values))}",
            ]
    return "\n".join(lines) + "\n"


def _histogram_lines(
    full: str, labels: str, metric: Metric, counts: list[float], total: float, count: float
) -> list[str]:
    lines = []
    cumulative = 0.0
    for bound, value in zip((*metric.buckets, float("inf")), counts, strict=True):
        cumulative += value
        le = "+Inf" if bound == float("inf") else repr(float(bound))
        lines.append(f'{full}_bucket{{{labels},le="{le}"}} {_fmt(cumulative)}')
    lines.append(f"{full}_sum{{{labels}}} {_fmt(total)}")
    lines.append(f"{full}_count{{{labels}}} {_fmt(count)}")
    return lines


def _cache_config_lines(
    full: str, model: str, cache_config: Sequence[tuple[int, int]]
) -> list[str]:
    lines = [
        f"# HELP {full} The engines' KV-cache configuration (labels; the value is 1).",
        f"# TYPE {full} gauge",
    ]
    for k, (block_size, num_blocks) in enumerate(cache_config):
        labels = f'{model},engine="{k}",block_size="{block_size}",num_gpu_blocks="{num_blocks}"'
        lines.append(f"{full}{{{labels}}} 1")
    return lines


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
