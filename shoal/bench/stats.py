"""Per-request benchmark results, their summary (throughput and latency percentiles) and the
printed report."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")
_METRIC_NAMES = {
    "ttft": "Time to First Token",
    "tpot": "Time per Output Token (excl. 1st token)",
    "itl": "Inter-token Latency",
    "e2el": "End-to-end Latency",
}
_MAX_ERRORS_KEPT = 10


@dataclass
class RequestResult:
    """What one streamed request measured. Times in seconds, from `time.perf_counter()`.

    `itl_s`: gaps between consecutive chunks that carried text (a chunk with several tokens
    is one gap, as in `vllm bench serve`). `output_tokens` comes from the final usage chunk
    (`output_tokens_from_usage`) or, without one, from the count of text chunks."""

    ok: bool = False
    error: str = ""
    prompt_len: int = 0  # tokens the dataset intended
    prompt_tokens: int = 0  # tokens the server counted (usage), else prompt_len
    output_tokens: int = 0
    output_tokens_from_usage: bool = False
    ttft_s: float = 0.0
    latency_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first; None for a single-token output."""
        if self.output_tokens <= 1:
            return None
        return (self.latency_s - self.ttft_s) / (self.output_tokens - 1)


def percentile(sorted_values: list[float], q: float) -> float:
    """The `q`-th percentile (0..100) of ascending `sorted_values`, linear interpolation
    (numpy's default); NaN for no values."""
    if not sorted_values:
        return math.nan
    rank = (len(sorted_values) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (rank - low)


def _distribution(values: list[float], percentiles: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    n = len(ordered)
    mean = sum(ordered) / n if n else math.nan
    std = math.sqrt(sum((v - mean) ** 2 for v in ordered) / n) if n else math.nan
    out = {"mean": mean, "median": percentile(ordered, 50.0), "std": std}
    for q in percentiles:
        out[f"p{q:g}"] = percentile(ordered, q)
    return out


def summarize(
    results: list[RequestResult], duration_s: float, percentiles: list[float]
) -> dict[str, Any]:
    """Throughput and latency figures of one run (latencies in ms), vLLM's key names:
    `completed`, `failed`, `request_throughput`, `output_throughput`, `mean_ttft_ms`,
    `median_tpot_ms`, `p99_itl_ms`, ... plus `errors` (the first few messages)."""
    done = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    total_in = sum(r.prompt_tokens for r in done)
    total_out = sum(r.output_tokens for r in done)
    summary: dict[str, Any] = {
        "duration": duration_s,
        "completed": len(done),
        "failed": len(failed),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "output_tokens_from_usage": all(r.output_tokens_from_usage for r in done),
        "request_throughput": len(done) / duration_s if duration_s > 0 else math.nan,
        "output_throughput": total_out / duration_s if duration_s > 0 else math.nan,
        "total_token_throughput": (total_in + total_out) / duration_s
        if duration_s > 0
        else math.nan,
        "errors": [r.error for r in failed[:_MAX_ERRORS_KEPT]],
    }
    samples = {
        "ttft": [r.ttft_s for r in done],
        "tpot": [t for r in done if (t := r.tpot_s) is not None],
        "itl": [gap for r in done for gap in r.itl_s],
        "e2el": [r.latency_s for r in done],
    }
    for metric in LATENCY_METRICS:
        for stat, value in _distribution(samples[metric], percentiles).items():
            summary[f"{stat}_{metric}_ms"] = value * 1000.0
    return summary


def format_report(summary: dict[str, Any], percentiles: list[float]) -> str:
    """The human-readable block `shoal bench serve` prints (the layout of vLLM's)."""
    lines = [f"{' Serving Benchmark Result ':=^60}"]

    def row(label: str, value: Any, fmt: str = "") -> None:
        lines.append(f"{label:<44}{format(value, fmt):>16}")

    row("Successful requests:", summary["completed"])
    row("Failed requests:", summary["failed"])
    if "max_concurrency" in summary:
        row("Maximum request concurrency:", str(summary["max_concurrency"]))
    row("Benchmark duration (s):", summary["duration"], ".2f")
    row("Total input tokens:", summary["total_input_tokens"])
    row("Total generated tokens:", summary["total_output_tokens"])
    row("Request throughput (req/s):", summary["request_throughput"], ".2f")
    row("Output token throughput (tok/s):", summary["output_throughput"], ".2f")
    row("Total token throughput (tok/s):", summary["total_token_throughput"], ".2f")
    if "client_cpu_s" in summary:
        row("Client CPU (s):", summary["client_cpu_s"], ".2f")
        row("Client CPU per output token (us):", summary["client_cpu_per_token_us"], ".2f")
    for metric in LATENCY_METRICS:
        lines.append(f"{' ' + _METRIC_NAMES[metric] + ' ':-^60}")
        row(f"Mean {metric.upper()} (ms):", summary[f"mean_{metric}_ms"], ".2f")
        row(f"Median {metric.upper()} (ms):", summary[f"median_{metric}_ms"], ".2f")
        for q in percentiles:
            row(f"P{q:g} {metric.upper()} (ms):", summary[f"p{q:g}_{metric}_ms"], ".2f")
    for error in summary.get("errors", [])[:3]:
        lines.append(f"error: {error}")
    lines.append("=" * 60)
    return "\n".join(lines)
