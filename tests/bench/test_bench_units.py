"""The load generator's parts without a server: statistics, the random dataset, the CLI's
flag checks and import weight, the markdown report."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from shoal.bench.dataset import random_requests
from shoal.bench.report import markdown_report
from shoal.bench.stats import RequestResult, percentile, summarize
from shoal.entrypoints.cli import main
from shoal.processing.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_model(None)


def test_percentile_matches_numpy() -> None:
    values = sorted([3.0, 1.0, 7.5, 2.25, 9.0, 4.0, 4.0])
    for q in (1, 25, 50, 90, 99):
        assert percentile(values, q) == pytest.approx(np.percentile(values, q))
    assert percentile([], 50) != percentile([], 50)  # NaN


def test_summarize_counts_tokens_and_latencies() -> None:
    ok = RequestResult(
        ok=True,
        prompt_tokens=10,
        output_tokens=5,
        ttft_s=0.1,
        latency_s=0.5,
        itl_s=[0.1, 0.1, 0.1, 0.1],
        output_tokens_from_usage=True,
    )
    failed = RequestResult(ok=False, error="HTTP 500: boom")
    summary = summarize([ok, ok, failed], duration_s=2.0, percentiles=[99.0])
    assert summary["completed"] == 2 and summary["failed"] == 1
    assert summary["total_output_tokens"] == 10 and summary["total_input_tokens"] == 20
    assert summary["output_throughput"] == pytest.approx(5.0)
    assert summary["median_ttft_ms"] == pytest.approx(100.0)
    assert summary["mean_tpot_ms"] == pytest.approx(100.0)  # (0.5 - 0.1) / 4
    assert summary["p99_itl_ms"] == pytest.approx(100.0)
    assert summary["errors"] == ["HTTP 500: boom"]
    assert summary["output_tokens_from_usage"] is True


def test_random_token_id_prompts_are_exact_and_seeded(tokenizer: Tokenizer) -> None:
    requests = random_requests(tokenizer, 8, 32, 7, seed=3, prompt_format="token-ids")
    special = set(tokenizer.all_special_ids)
    for r in requests:
        assert isinstance(r.prompt, list) and len(r.prompt) == 32 == r.prompt_len
        assert r.output_len == 7
        assert all(0 <= t < tokenizer.vocab_size and t not in special for t in r.prompt)
    again = random_requests(tokenizer, 8, 32, 7, seed=3, prompt_format="token-ids")
    assert [r.prompt for r in again] == [r.prompt for r in requests]
    other = random_requests(tokenizer, 8, 32, 7, seed=4, prompt_format="token-ids")
    assert [r.prompt for r in other] != [r.prompt for r in requests]


def test_random_text_prompts_reencode_to_about_the_length(tokenizer: Tokenizer) -> None:
    requests = random_requests(tokenizer, 16, 64, 8, seed=0, prompt_format="text")
    lengths = [len(tokenizer.encode(str(r.prompt), add_special_tokens=False)) for r in requests]
    assert all(abs(n - 64) <= 2 for n in lengths), lengths


def test_range_ratio_spreads_lengths(tokenizer: Tokenizer) -> None:
    requests = random_requests(tokenizer, 32, 40, 20, range_ratio=0.5, prompt_format="token-ids")
    assert all(20 <= r.prompt_len <= 60 and 10 <= r.output_len <= 30 for r in requests)
    assert len({r.prompt_len for r in requests}) > 1


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--max-concurrency", "0"], "--max-concurrency"),
        (["--request-rate", "0"], "--request-rate"),
        (["--num-prompts", "0"], "--num-prompts"),
        (["--metric-percentiles", "50,x"], "--metric-percentiles"),
        (["--endpoint", "/v1/chat/completions", "--prompt-format", "token-ids"], "--prompt-format"),
        (["--base-url", "https://example.invalid"], "--base-url"),
    ],
)
def test_bad_flags_name_the_flag(
    flags: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["bench", "serve", "--ready-check-timeout-sec", "0.1", *flags])
    assert exc.value.code == 2
    assert named in capsys.readouterr().err


def test_bench_cli_import_is_light() -> None:
    code = (
        "import sys, shoal.entrypoints.bench; "
        "print([m for m in ('torch', 'shoal.bench.serve', 'tokenizers') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_markdown_report_checks_targets() -> None:
    summary = {
        "completed": 4,
        "failed": 0,
        "output_throughput": 12000.0,
        "median_ttft_ms": 50.0,
        "p99_ttft_ms": 80.0,
        "median_tpot_ms": 5.0,
        "median_itl_ms": 5.0,
        "p99_itl_ms": 9.0,
        "total_output_tokens": 1000,
        "client_cpu_per_token_us": 10.0,
    }
    workload = {
        "workload": {"concurrency": 64, "num_prompts": 4, "input_len": 8, "output_len": 250},
        "summary": summary,
        "role_cpu_s": {"ApiServer_0": 0.02, "EngineCore_0": 0.5, "Launcher": 0.0},
        "other_cpu_cores": 0.1,
    }
    report = {
        "servers": [
            {
                "name": "tiny-1",
                "kind": "shoal",
                "model": "tiny",
                "num_api_servers": 1,
                "workloads": [workload],
                "startup_s": 3.0,
                "sigterm_to_gone_s": 0.4,
                "exit_code": 0,
                "peak_rss_mb": {"ApiServer_0": 80.0},
            },
        ]
    }
    text = markdown_report(report)
    assert "| tiny-1 | 1 | 64 | 8/250 | 4 | 12000 |" in text
    assert "| tiny c=64 streamed tok/s, 1 API server | 12000 | >= 10000 | yes |" in text
    # 0.02 s of API-server CPU over 1000 tokens = 20 us per token
    assert "| API-server CPU per streamed token (us), tiny, 1 | 20.0 | <= 30 | yes |" in text
