"""`MetricsStore` on plain files: two API servers' stores in one directory render the same
figures, newer engine stats win, requests count per engine and finish reason, and the
dashboard's quantiles interpolate within buckets as Prometheus does. No server."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from shoal.api.dashboard import DashboardView, quantile
from shoal.api.metric_families import GENERATION_TOKENS, ITL, TTFT
from shoal.api.metrics import MetricsStore, metric_prefixes
from shoal.protocol import SchedulerStats


def _value(text: str, name: str, labels: str = "") -> float:
    pattern = rf"^{re.escape(name)}{{[^}}]*{re.escape(labels)}[^}}]*}} (\S+)$"
    match = re.search(pattern, text, re.M)
    assert match, f"{name} {labels} not in:\n{text}"
    return float(match.group(1))


def test_two_stores_in_one_directory_render_the_same_totals(tmp_path: Path) -> None:
    a = MetricsStore(num_engines=2, directory=str(tmp_path), client_index=0)
    b = MetricsStore(num_engines=2, directory=str(tmp_path), client_index=1)
    try:
        a.inc_received()
        b.inc_received()
        a.inc(0, GENERATION_TOKENS, 10)
        b.inc(1, GENERATION_TOKENS, 4)
        a.observe(0, TTFT, 0.003)
        b.observe(0, TTFT, 30.0)
        a.inc_finished(1, "length")
        # Engine 1's newest stats came through b, older ones through a: b's win everywhere.
        a.set_engine_stats(1, 100.0, SchedulerStats(num_running_reqs=5, kv_cache_usage=0.5))
        b.set_engine_stats(
            1,
            200.0,
            SchedulerStats(
                num_running_reqs=0,
                num_blocks_free=7,
                prefix_cache_hits_total=3,
                iteration_tokens_counts=[0, 2, 1],
                iteration_tokens_sum=20,
            ),
        )
        text_a, text_b = a.render("m"), b.render("m")
        assert text_a == text_b
        assert _value(text_a, "shoal:requests_received_total") == 2
        for prefix in ("vllm:", "shoal:"):
            assert _value(text_a, prefix + "generation_tokens_total", 'engine="0"') == 10
            assert _value(text_a, prefix + "generation_tokens_total", 'engine="1"') == 4
            assert _value(text_a, prefix + "num_requests_running", 'engine="1"') == 0
            assert _value(text_a, prefix + "prefix_cache_hits_total", 'engine="1"') == 3
            labels = 'engine="1",finished_reason="length"'
            assert _value(text_a, prefix + "request_success_total", labels) == 1
            ttft = prefix + "time_to_first_token_seconds"
            assert _value(text_a, ttft + "_count", 'engine="0"') == 2
            assert _value(text_a, ttft + "_bucket", 'engine="0",le="0.005"') == 1
            assert _value(text_a, ttft + "_bucket", 'engine="0",le="+Inf"') == 2
            steps = prefix + "iteration_tokens_total"
            assert _value(text_a, steps + "_bucket", 'engine="1",le="8.0"') == 2
            assert _value(text_a, steps + "_count", 'engine="1"') == 3
            assert _value(text_a, steps + "_sum", 'engine="1"') == 20
        assert _value(text_a, "shoal:kv_cache_blocks_free", 'engine="1"') == 7
        assert "vllm:kv_cache_blocks_free" not in text_a  # shoal's own: no vllm: name
        # Stale stats never overwrite newer ones.
        b.set_engine_stats(1, 150.0, SchedulerStats(num_running_reqs=9))
        assert _value(b.render("m"), "vllm:num_requests_running", 'engine="1"') == 0
        assert [index for index, _ in a.snapshot().servers] == [0, 1]
        # Errors noted by either server are seen by both, newest first.
        a.note_error("engine dead", "first")
        b.note_error("request failed", "second")
        assert [e["message"] for e in a.recent_errors()] == ["second", "first"]
    finally:
        a.close()
        b.close()
    assert list(tmp_path.iterdir()) == []


def test_store_without_directory_counts_this_process_only() -> None:
    store = MetricsStore(num_engines=1)
    store.inc_finished(0, "stop")
    text = store.render('quote"d', prefixes=("vllm:",))
    assert 'model_name="quote\\"d"' in text
    assert _value(text, "vllm:request_success_total", 'finished_reason="stop"') == 1
    assert "shoal:" not in text
    store.close()


def test_metric_prefixes_from_the_query_string() -> None:
    assert metric_prefixes(b"") == ("vllm:", "shoal:")
    assert metric_prefixes(b"prefix=vllm") == ("vllm:",)
    assert metric_prefixes(b"prefix=shoal&prefix=vllm") == ("vllm:", "shoal:")
    with pytest.raises(ValueError, match="^prefix: "):
        metric_prefixes(b"prefix=openmetrics")


def test_quantiles_interpolate_within_a_bucket() -> None:
    bounds = (1.0, 2.0, 4.0)
    assert quantile(0.5, bounds, [0, 0, 0, 0]) is None
    # 10 in (1, 2]: the median is halfway through that bucket.
    assert quantile(0.5, bounds, [0, 10, 0, 0]) == pytest.approx(1.5)
    assert quantile(0.25, bounds, [10, 10, 0, 0]) == pytest.approx(0.5)
    # In +Inf: the last finite bound, as histogram_quantile answers.
    assert quantile(0.99, bounds, [0, 0, 0, 5]) == 4.0


def test_the_view_reports_latency_since_its_oldest_sample() -> None:
    store = MetricsStore(num_engines=2)
    view = DashboardView(store, "m")
    try:
        first = view.build()  # the first sample: nothing observed yet
        assert first["latency"]["itl_s"]["count"] == 0
        for _ in range(9):
            store.observe(1, ITL, 0.015)
        store.observe(1, ITL, 0.5)
        later = view.build()
        itl = later["latency"]["itl_s"]
        assert itl["count"] == 10
        assert 0.01 < itl["p50"] <= 0.02 and itl["p99"] > 0.25
        assert later["engines"][0]["itl_s"]["count"] == 0
        assert later["engines"][1]["itl_s"]["count"] == 10
        assert later["servers"] == [
            {
                "index": 0,
                "name": "ApiServer_0",
                "pid": later["servers"][0]["pid"],
                "in_flight": None,
            }
        ]
    finally:
        store.close()
