"""Metrics cost: shoal's mmap'd slots (shoal.api.metrics) against prometheus_client's multiprocess mode.

    python benchmarks/metrics_overhead.py                 # 200k tokens, 2 API servers x 2 engines
    python benchmarks/metrics_overhead.py --tokens 50000 --out /tmp/metrics.json

What an API server records per generated token is one inter-token-latency observation and a
generated-tokens increment (one output of one sequence per engine message, the worst case:
stream_interval 1, batch of one). The benchmark times that hot path through each library, in
a fresh process each, and the cost of one /metrics scrape (every family, 2 servers' files).
prometheus_client runs as its documentation says for several processes:
PROMETHEUS_MULTIPROC_DIR set before import, labelled children cached, and
`MultiProcessCollector` + `generate_latest` for the scrape. Prints microseconds per token and
milliseconds per scrape, writes JSON (default benchmarks/results/metrics_overhead-<time>.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _shoal(num_tokens: int, directory: str) -> dict[str, float]:
    sys.path.insert(0, REPO)
    from shoal.api.metric_families import GENERATION_TOKENS, ITL, TTFT
    from shoal.api.metrics import MetricsStore

    stores = [MetricsStore(2, directory, i) for i in range(2)]
    store = stores[0]
    start = time.perf_counter()
    for i in range(num_tokens):
        engine = i & 1
        store.observe(engine, ITL, 0.012)
        store.inc(engine, GENERATION_TOKENS, 1)
    per_token_us = (time.perf_counter() - start) / num_tokens * 1e6
    for k in range(2):
        store.observe(k, TTFT, 0.1)
    start = time.perf_counter()
    for _ in range(50):
        text = store.render("model", [(16, 256), (16, 256)])
    scrape_ms = (time.perf_counter() - start) / 50 * 1e3
    for s in stores:
        s.close()
    return {"per_token_us": per_token_us, "scrape_ms": scrape_ms, "scrape_bytes": len(text)}


def _prometheus(num_tokens: int, directory: str) -> dict[str, float]:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory  # read when prometheus_client loads
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    sys.path.insert(0, REPO)
    from shoal.api.metric_families import ENGINE_FIGURES, ITERATION_TOKENS, REQUEST_METRICS

    labels = ["model_name", "engine"]
    families: dict[str, Any] = {}
    for metric in (*REQUEST_METRICS, *(m for m, _ in ENGINE_FIGURES), ITERATION_TOKENS):
        name = "vllm:" + metric.name.removesuffix("_total")
        if metric.kind == "histogram":
            families[metric.name] = Histogram(name, metric.help, labels, buckets=metric.buckets)
        elif metric.kind == "counter":
            extra = ["finished_reason"] if metric.by_reason else []
            families[metric.name] = Counter(name, metric.help, labels + extra)
        else:
            families[metric.name] = Gauge(name, metric.help, labels, multiprocess_mode="mostrecent")
    itl = [families["inter_token_latency_seconds"].labels("model", str(k)) for k in range(2)]
    generated = [families["generation_tokens_total"].labels("model", str(k)) for k in range(2)]
    start = time.perf_counter()
    for i in range(num_tokens):
        engine = i & 1
        itl[engine].observe(0.012)
        generated[engine].inc(1)
    per_token_us = (time.perf_counter() - start) / num_tokens * 1e6
    for k in range(2):  # every labelled series exists, as in a served run
        for metric in (*REQUEST_METRICS, *(m for m, _ in ENGINE_FIGURES), ITERATION_TOKENS):
            family = families[metric.name]
            if metric.by_reason:
                family.labels("model", str(k), "stop")
            else:
                family.labels("model", str(k))
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=directory)
    start = time.perf_counter()
    for _ in range(50):
        text = generate_latest(registry)
    scrape_ms = (time.perf_counter() - start) / 50 * 1e3
    return {"per_token_us": per_token_us, "scrape_ms": scrape_ms, "scrape_bytes": len(text)}


def _child(which: str, num_tokens: int) -> dict[str, float]:
    """Run one side in a fresh interpreter (prometheus_client picks its mode at import)."""
    with tempfile.TemporaryDirectory(prefix="metrics-bench-") as directory:
        cmd = [sys.executable, __file__, "--child", which, "--tokens", str(num_tokens)]
        cmd += ["--dir", directory]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    return json.loads(out.stdout)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=200_000)
    p.add_argument("--out", default=None)
    p.add_argument("--child", choices=("shoal", "prometheus_client"), help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        run = _shoal if args.child == "shoal" else _prometheus
        print(json.dumps(run(args.tokens, args.dir)))
        return
    results = {which: _child(which, args.tokens) for which in ("shoal", "prometheus_client")}
    for which, r in results.items():
        print(
            f"{which:>18}: {r['per_token_us']:.2f} us per token (ITL observe + counter inc), "
            f"{r['scrape_ms']:.2f} ms per scrape ({r['scrape_bytes'] / 1024:.0f} KiB)"
        )
    ratio = results["prometheus_client"]["per_token_us"] / results["shoal"]["per_token_us"]
    print(f"prometheus_client / shoal per token: {ratio:.1f}x")
    from shoal.bench.report import cpu_model_name

    report = {
        "tokens": args.tokens,
        "cpu": cpu_model_name(),
        "python": platform.python_version(),
        **results,
    }
    out = args.out or os.path.join(
        REPO, "benchmarks", "results", f"metrics_overhead-{time.strftime('%Y%m%d-%H%M%S')}.json"
    )
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
