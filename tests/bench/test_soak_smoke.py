"""benchmarks/soak.py end to end: a ~10 s soak of a real `shoal serve` on the tiny
random-weight model, its report's fields, the drained KV cache, and the server gone after."""

from __future__ import annotations

import json

import pytest

from tests.helpers import load_benchmark

soak = load_benchmark("soak")


def test_bad_flags_name_the_flag() -> None:
    with pytest.raises(ValueError, match="--concurrency"):
        soak.parse_args(["--concurrency", "0"]).validate()
    with pytest.raises(ValueError, match="--max-model-len"):
        soak.parse_args(["--max-tokens", "500", "--max-model-len", "256"]).validate()


def test_parse_metrics_sums_engines() -> None:
    text = (
        "# TYPE shoal:num_requests_running gauge\n"
        'shoal:num_requests_running{engine="0"} 2.0\n'
        'shoal:num_requests_running{engine="1"} 3.0\n'
        'shoal:kv_cache_blocks_free{engine="0"} 10.0\n'
        'shoal:kv_cache_usage_perc{engine="0"} 0.25\n'
        'shoal:kv_cache_usage_perc{engine="1"} 0.5\n'
        "shoal:requests_received_total 7.0\n"
    )
    assert soak.parse_metrics(text) == {
        "num_requests_running": 5.0,
        "kv_cache_blocks_free": 10.0,
        "kv_cache_usage_perc": 0.5,
        "requests_received_total": 7.0,
    }


@pytest.mark.timeout(180)
def test_short_soak_reports_and_drains(tmp_path) -> None:
    out = tmp_path / "soak.json"
    config = soak.SoakConfig(
        duration_s=10.0,
        concurrency=4,
        max_num_seqs=2,  # so requests also wait, and the waiting count must drain too
        sample_interval_s=2.0,
        max_prompt_words=64,
        max_tokens=32,
        disconnect_fraction=0.3,
        num_blocks=256,
        max_model_len=256,
        out=str(out),
    )
    report = soak.run_soak(config)

    assert report["checks"]["no_errors"], report["load"]["errors"]
    assert report["passed"], (report["checks"], report["server_log_tail"])
    final = report["final_metrics"]
    assert final["num_requests_running"] == 0 and final["num_requests_waiting"] == 0
    assert final["kv_cache_blocks_free"] == final["kv_cache_blocks_total"] == 256
    load = report["load"]
    assert load["completed"] > 0 and load["started"] >= load["completed"] + load["disconnected"]
    assert len(report["samples"]) >= 3
    # Every role of the process tree is sampled, with both thirds' figures.
    assert {"Launcher", "ApiServer_0", "EngineCore_0"} <= set(report["growth"])
    for row in report["growth"].values():
        assert {"rss_mib_first", "rss_mib_last", "rss_mib_growth", "fds_growth", "cpu_s"} <= set(
            row
        )
    assert report["server_stop"]["exit_code"] == 0 and report["server_stop"]["killed"] == 0
    assert json.loads(out.read_text())["checks"] == report["checks"]
    assert "ApiServer_0" in soak.format_table(report)
