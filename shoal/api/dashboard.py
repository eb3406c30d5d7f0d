"""The live dashboard: `GET /dashboard` (a page shipped in the package) and `GET /dashboard/data` (its JSON).

The page polls `/dashboard/data` twice a second; `shoal top` reads the same JSON. Every figure
comes from the run's shared metrics files (shoal.api.metrics), so any API server answers with
the same view. Rates and latency percentiles need history: each API server samples the
combined metrics once a second (`MetricsSampler`, the last `HISTORY_S`), and a view compares
the figures of now with those of `RATE_WINDOW_S` (rates) and `LATENCY_WINDOW_S` (percentiles,
interpolated within histogram buckets as Prometheus' `histogram_quantile` does) ago.

With `--api-key`, every dashboard route wants the key: as `Authorization: Bearer <key>`,
`x-api-key`, or HTTP Basic credentials whose password is the key (what a browser's own login
prompt sends, so the page needs no key in its URL or code).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import secrets
import time
from collections import deque
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any

from shoal.api.admission import AdmissionControl
from shoal.api.asgi import App, HTTPError, Request, Response, json_response
from shoal.api.metric_families import (
    ENGINE_FIGURES,
    FINISH_REASONS,
    GENERATION_TOKENS,
    ITL,
    PROMPT_TOKENS,
    TTFT,
    Metric,
)
from shoal.api.metrics import MetricsStore, Snapshot
from shoal.logger import init_logger

logger = init_logger(__name__)

SAMPLE_PERIOD_S = 1.0
HISTORY_S = 600.0
RATE_WINDOW_S = 5.0
LATENCY_WINDOW_S = 300.0
QUANTILES = (0.5, 0.9, 0.99)
_ASSETS = {
    "/dashboard": ("index.html", b"text/html; charset=utf-8"),
    "/dashboard/dashboard.js": ("dashboard.js", b"text/javascript; charset=utf-8"),
    "/dashboard/dashboard.css": ("dashboard.css", b"text/css; charset=utf-8"),
}
_FIGURE = {metric.name: metric for metric, _ in ENGINE_FIGURES}


class MetricsSampler:
    """The combined metrics of the run, once per `SAMPLE_PERIOD_S`, for the last `HISTORY_S`."""

    def __init__(self, store: MetricsStore) -> None:
        self.store = store
        self.samples: deque[tuple[float, list[float]]] = deque()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start sampling on the running event loop (no loop yet: at the first view)."""
        if self._task is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._task = loop.create_task(self._run())

    async def stop(self) -> None:
        """Stop sampling (the app's shutdown hook)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                values = self.store.snapshot().values
            except ValueError:
                return  # the store was closed (shutdown without the lifespan hook)
            self.add(time.monotonic(), values)
            await asyncio.sleep(SAMPLE_PERIOD_S)

    def add(self, now: float, values: list[float]) -> None:
        """Keep one sample, dropping those older than `HISTORY_S`."""
        self.samples.append((now, values))
        while self.samples and now - self.samples[0][0] > HISTORY_S:
            self.samples.popleft()

    def before(self, now: float, window_s: float) -> tuple[float, list[float]] | None:
        """The newest sample at least `window_s` old, else the oldest one (None: none)."""
        found = None
        for sample in self.samples:
            if now - sample[0] >= window_s:
                found = sample
            else:
                break
        if found is None and self.samples:
            found = self.samples[0]
        return found


def quantile(q: float, bounds: Sequence[float], counts: Sequence[float]) -> float | None:
    """The q-quantile of a histogram (plain bucket counts, +Inf last), interpolated linearly
    within its bucket; None for an empty histogram. A quantile in +Inf is the last bound."""
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    cumulative = 0.0
    for i, count in enumerate(counts):
        if cumulative + count >= rank and count > 0:
            if i == len(bounds):
                return float(bounds[-1])
            lower = float(bounds[i - 1]) if i > 0 else 0.0
            return lower + (float(bounds[i]) - lower) * (rank - cumulative) / count
        cumulative += count
    return float(bounds[-1])


class DashboardView:
    """Builds the dashboard's JSON from the run's metrics, its history and this server's
    view of the engines."""

    def __init__(
        self,
        store: MetricsStore,
        model_name: str,
        admission: AdmissionControl | None = None,
        engines_down: Callable[[], dict[int, str]] = dict,
    ) -> None:
        self.store = store
        self.model_name = model_name
        self.admission = admission
        self.engines_down = engines_down
        self.sampler = MetricsSampler(store)

    def build(self) -> dict[str, Any]:
        """The view `/dashboard/data` answers (docs/observability.md lists its parts)."""
        self.sampler.start()
        now = time.monotonic()
        snap = self.store.snapshot()
        if not self.sampler.samples:
            self.sampler.add(now, snap.values)
        rate_base = self.sampler.before(now, RATE_WINDOW_S)
        latency_base = self.sampler.before(now, LATENCY_WINDOW_S)
        assert rate_base is not None and latency_base is not None
        engines = [
            self._engine(k, snap.values, now, rate_base, latency_base)
            for k in range(self.store.num_engines)
        ]
        latency_window_s = now - latency_base[0]
        return {
            "time": time.time(),
            "model": self.model_name,
            "rate_window_s": round(now - rate_base[0], 3),
            "latency_window_s": round(latency_window_s, 3),
            "engines": engines,
            "totals": _totals(engines),
            "latency": {
                "ttft_s": self._latency(TTFT, snap.values, latency_base[1]),
                "itl_s": self._latency(ITL, snap.values, latency_base[1]),
            },
            "requests": self._requests(snap.values),
            "servers": self._servers(snap),
            "errors": self.store.recent_errors(),
        }

    def _engine(
        self,
        k: int,
        values: list[float],
        now: float,
        rate_base: tuple[float, list[float]],
        latency_base: tuple[float, list[float]],
    ) -> dict[str, Any]:
        store = self.store

        def figure(name: str, at: Sequence[float] = values) -> float:
            return store.counter(at, k, _FIGURE[name])

        def rate(metric: Metric) -> float:
            elapsed = now - rate_base[0]
            if elapsed <= 0:
                return 0.0
            grown = store.counter(values, k, metric) - store.counter(rate_base[1], k, metric)
            return max(grown, 0.0) / elapsed

        queries = figure("prefix_cache_queries_total") - figure(
            "prefix_cache_queries_total", latency_base[1]
        )
        hits = figure("prefix_cache_hits_total") - figure(
            "prefix_cache_hits_total", latency_base[1]
        )
        down = self.engines_down().get(k)
        return {
            "engine": k,
            "state": "down" if down else "up",
            "down_reason": down,
            "running": figure("num_requests_running"),
            "waiting": figure("num_requests_waiting"),
            "kv_cache_usage": figure("kv_cache_usage_perc"),
            "kv_blocks_total": figure("kv_cache_blocks_total"),
            "kv_blocks_free": figure("kv_cache_blocks_free"),
            # Over the latency window (counters restart with the engine: never negative).
            "prefix_cache_hit_rate": hits / queries if queries > 0 and hits >= 0 else None,
            "prefix_cache_queries_total": figure("prefix_cache_queries_total"),
            "prefix_cache_hits_total": figure("prefix_cache_hits_total"),
            "preemptions_total": figure("num_preemptions_total"),
            "prompt_tokens_total": store.counter(values, k, PROMPT_TOKENS),
            "generation_tokens_total": store.counter(values, k, GENERATION_TOKENS),
            "prompt_tokens_per_s": rate(PROMPT_TOKENS),
            "generation_tokens_per_s": rate(GENERATION_TOKENS),
            "ttft_s": self._latency(TTFT, values, latency_base[1], [k]),
            "itl_s": self._latency(ITL, values, latency_base[1], [k]),
        }

    def _latency(
        self,
        metric: Metric,
        values: list[float],
        base: list[float],
        engines: Sequence[int] | None = None,
    ) -> dict[str, float | None]:
        """Percentiles of `metric` over the observations since `base`, over `engines`."""
        counts = [0.0] * (len(metric.buckets) + 1)
        for k in engines if engines is not None else range(self.store.num_engines):
            now_counts = self.store.histogram(values, k, metric)[0]
            then_counts = self.store.histogram(base, k, metric)[0]
            for i, (a, b) in enumerate(zip(now_counts, then_counts, strict=True)):
                counts[i] += max(a - b, 0.0)
        result: dict[str, float | None] = {
            f"p{round(q * 100)}": quantile(q, metric.buckets, counts) for q in QUANTILES
        }
        result["count"] = sum(counts)
        return result

    def _requests(self, values: list[float]) -> dict[str, Any]:
        store = self.store
        finished = {
            reason: sum(store.finished(values, k, reason) for k in range(store.num_engines))
            for reason in FINISH_REASONS
        }
        admission = self.admission
        return {
            "received_total": store.received(values),
            "finished_total": finished,
            "in_flight": admission.in_flight() if admission is not None else None,
            "rejected_total": admission.rejected() if admission is not None else None,
        }

    def _servers(self, snap: Snapshot) -> list[dict[str, Any]]:
        in_flight = self.admission.in_flight_by_server() if self.admission is not None else {}
        return [
            {
                "index": index,
                "name": f"ApiServer_{index}",
                "pid": pid,
                "in_flight": in_flight.get(index),
            }
            for index, pid in snap.servers
        ]


def _totals(engines: list[dict[str, Any]]) -> dict[str, float]:
    keys = (
        "running",
        "waiting",
        "kv_blocks_total",
        "kv_blocks_free",
        "prompt_tokens_per_s",
        "generation_tokens_per_s",
        "prompt_tokens_total",
        "generation_tokens_total",
        "preemptions_total",
    )
    return {key: sum(float(e[key]) for e in engines) for key in keys}


def dashboard_guard(api_key: str) -> Callable[[Request], None]:
    """401 (with a Basic challenge, so a browser asks for the key) unless the request carries
    the key as a Bearer token, `x-api-key` or a Basic password."""
    expected = api_key.encode()

    def check(request: Request) -> None:
        given = request.headers.get("x-api-key", "").encode("latin-1")
        auth = request.headers.get("authorization", "")
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer":
            given = value.encode("latin-1")
        elif scheme.lower() == "basic":
            with contextlib.suppress(binascii.Error, ValueError):
                given = base64.b64decode(value, validate=True).partition(b":")[2]
        if not secrets.compare_digest(given, expected):
            raise HTTPError(
                401,
                "invalid or missing API key (Authorization: Bearer <key>, x-api-key, or a "
                "Basic password)",
                headers=[(b"www-authenticate", b'Basic realm="shoal", charset="UTF-8"')],
            )

    return check


@functools.cache
def _asset(name: str) -> bytes:
    return resources.files("shoal.api").joinpath("dashboard_static", name).read_bytes()


def add_dashboard_routes(app: App, view: DashboardView, api_key: str | None) -> None:
    """Serve the page, its assets and `/dashboard/data` on `app` (behind `api_key` if set)."""
    guard = dashboard_guard(api_key) if api_key else None
    for path, (name, content_type) in _ASSETS.items():

        async def asset(
            request: Request, name: str = name, content_type: bytes = content_type
        ) -> Response:
            return Response(
                _asset(name), content_type=content_type, headers=[(b"cache-control", b"no-cache")]
            )

        app.route("GET", path, asset, guard=guard)

    async def data(request: Request) -> Response:
        return json_response(view.build(), headers=[(b"cache-control", b"no-store")])

    app.route("GET", "/dashboard/data", data, guard=guard)
    app.on_shutdown.append(view.sampler.stop)
    view.sampler.start()
