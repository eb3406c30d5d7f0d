"""The load generator against real servers: `shoal serve` on a tiny random-weight model and
the bare-uvicorn baseline, each started, measured and stopped the way run_serving.py does."""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Iterator

import pytest

from shoal.bench.procs import ServerProcess, free_port, role_group
from shoal.bench.serve import BenchConfig, Hooks, run_benchmark
from shoal.entrypoints.cli import main
from tests.helpers import make_tiny_model_dir

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STARTUP_TIMEOUT_S = 240.0


def _started(argv: list[str], log_path: str) -> ServerProcess:
    port = free_port()
    server = ServerProcess([*argv, "--port", str(port)], "127.0.0.1", port, log_path)
    server.start()
    server.start_rss_sampler()
    try:
        server.wait_healthy(STARTUP_TIMEOUT_S)
    except BaseException:
        server.kill()
        raise
    return server


def _stop_cleanly(server: ServerProcess) -> None:
    try:
        _, code = server.stop(signal.SIGTERM, timeout_s=60)
        assert code == 0, server.log_tail()
        assert server.processes() == {}
    finally:
        server.kill()


@pytest.fixture
def shoal_server(tmp_path) -> Iterator[ServerProcess]:
    model = make_tiny_model_dir(str(tmp_path / "tiny"))
    argv = [
        sys.executable,
        "-m",
        "shoal.entrypoints.cli",
        "serve",
        model,
        "--load-format",
        "dummy",
        "--num-blocks",
        "256",
        "--max-model-len",
        "256",
    ]
    server = _started(argv, str(tmp_path / "serve.log"))
    yield server
    _stop_cleanly(server)


@pytest.fixture
def bare_server(tmp_path) -> Iterator[ServerProcess]:
    script = os.path.join(REPO, "benchmarks", "bare_uvicorn.py")
    # Paced like an engine: each stream sends a chunk every 20 ms.
    argv = [sys.executable, script, "--workers", "2", "--tick-ms", "20"]
    server = _started(argv, str(tmp_path / "bare.log"))
    yield server
    _stop_cleanly(server)


def _sane(summary: dict, num_prompts: int, output_len: int) -> None:
    assert summary["failed"] == 0, summary["errors"]
    assert summary["completed"] == num_prompts
    assert summary["total_output_tokens"] == num_prompts * output_len
    assert summary["output_tokens_from_usage"] is True
    assert summary["output_throughput"] > 0 and summary["request_throughput"] > 0
    for metric in ("ttft", "tpot", "itl", "e2el"):
        assert summary[f"median_{metric}_ms"] >= 0
    assert 0 < summary["median_ttft_ms"] <= summary["median_e2el_ms"]
    assert summary["p99_ttft_ms"] >= summary["median_ttft_ms"]
    assert summary["client_cpu_s"] > 0


def test_bench_against_shoal_serve(shoal_server: ServerProcess) -> None:
    marks: list[str] = []
    config = BenchConfig(
        base_url=shoal_server.base_url,
        num_prompts=12,
        input_len=16,
        output_len=8,
        max_concurrency=4,
        ignore_eos=True,
        prompt_format="token-ids",
    )
    cpu0 = shoal_server.cpu_by_role()
    summary = run_benchmark(
        config, Hooks(lambda: marks.append("start"), lambda: marks.append("end"))
    )
    assert marks == ["start", "end"]
    _sane(summary, 12, 8)
    assert summary["total_input_tokens"] == 12 * 16  # token-id prompts are exact
    assert summary["num_warmups"] == 4
    cpu = shoal_server.cpu_by_role()
    assert {"Launcher", "ApiServer_0", "EngineCore_0"} <= set(cpu)
    assert cpu["EngineCore_0"] > cpu0["EngineCore_0"]
    assert cpu["ApiServer_0"] > cpu0["ApiServer_0"]
    assert shoal_server.peak_rss_bytes.get("EngineCore_0", 0) > 0

    # Chat with text prompts at a Poisson rate and no concurrency cap.
    chat = BenchConfig(
        base_url=shoal_server.base_url,
        endpoint="/v1/chat/completions",
        num_prompts=6,
        input_len=16,
        output_len=5,
        request_rate=50.0,
        ignore_eos=True,
        num_warmups=0,
    )
    _sane(run_benchmark(chat), 6, 5)

    # Failures are counted and described, not raised.
    wrong = BenchConfig(
        base_url=shoal_server.base_url,
        model="no-such-model",
        tokenizer=None,
        num_prompts=2,
        input_len=4,
        output_len=2,
        num_warmups=0,
    )
    failed = run_benchmark(wrong)
    assert failed["failed"] == 2 and failed["completed"] == 0
    assert "HTTP 404" in failed["errors"][0]


def test_bench_cli_against_bare_baseline(bare_server: ServerProcess, tmp_path) -> None:
    roles = {role_group(role) for role, _ in bare_server.processes().values()}
    assert "Worker" in roles
    code = main(
        [
            "bench",
            "serve",
            "--base-url",
            bare_server.base_url,
            "--num-prompts",
            "32",
            "--max-concurrency",
            "8",
            "--random-input-len",
            "8",
            "--random-output-len",
            "16",
            "--ignore-eos",
            "--result-dir",
            str(tmp_path),
            "--result-filename",
            "out.json",
        ]
    )
    assert code == 0
    with open(tmp_path / "out.json", encoding="utf-8") as f:
        summary = json.load(f)
    _sane(summary, 32, 16)
    assert summary["model"] == "bare-uvicorn" and summary["max_concurrency"] == 8
    # --tick-ms 20: one chunk per stream per tick, so 16 chunks take at least 15 ticks (a
    # busy client may read several chunks at once, so the gaps between them can read 0).
    assert summary["median_e2el_ms"] >= 290
