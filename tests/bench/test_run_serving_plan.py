"""benchmarks/run_serving.py's plan: the default server runs with no flags, float32 is one
flag away, and the llama-server / vLLM rows appear when installed and are skipped with a note
otherwise; the anchor table compares shoal's no-flags row with them."""

from __future__ import annotations

import sys

import pytest

from tests.helpers import load_benchmark

run_serving = load_benchmark("run_serving")


def _plan(tmp_path, *argv: str) -> tuple[dict, list[str]]:
    args = run_serving.parse_args(list(argv))
    specs = run_serving.plan(args, str(tmp_path))
    return {s.name: s for s in specs}, args.skipped


def test_default_has_no_flags_and_float32_is_pinned(tmp_path) -> None:
    specs, _ = _plan(tmp_path, "--only", "default,float32")
    assert specs["default-1"].extra_args == []
    assert specs["float32-1"].extra_args == ["--quantization", "none"]


def test_llama_server_row_when_found_else_a_note(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(run_serving, "find_llama_server", lambda path: None)
    specs, skipped = _plan(tmp_path, "--only", "llama", "--concurrency", "1,16")
    assert "llama-1" not in specs
    assert any(note.startswith("llama-server: not found") for note in skipped)

    fake = tmp_path / "llama-server"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setattr(run_serving, "find_llama_server", lambda path: str(fake))
    specs, _ = _plan(tmp_path, "--only", "llama", "--concurrency", "1,16")
    llama = specs["llama-1"]
    assert [w.concurrency for w in llama.workloads] == [1, 16]
    argv = run_serving.server_argv(llama, "127.0.0.1", 8080)
    assert argv[0] == str(fake) and argv[-4:] == ["--host", "127.0.0.1", "--port", "8080"]
    assert argv[argv.index("-np") + 1] == "64" and argv[argv.index("-m") + 1].endswith(".gguf")


def test_find_llama_server_prefers_the_flag(tmp_path) -> None:
    fake = tmp_path / "llama-server"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    assert run_serving.find_llama_server(str(fake)) == str(fake)


def test_vllm_row_when_its_venv_and_model_exist_else_a_note(tmp_path) -> None:
    venv, hf = tmp_path / "venv", tmp_path / "hf"
    flags = ("--only", "vllm", "--vllm-venv", str(venv), "--hf-model-dir", str(hf))
    specs, skipped = _plan(tmp_path, *flags)
    assert specs == {} and any("setup_vllm_cpu.sh" in note for note in skipped)

    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "vllm").write_text("#!/bin/sh\n")
    (venv / "bin" / "vllm").chmod(0o755)
    hf.mkdir()
    specs, _ = _plan(tmp_path, *flags)
    vllm = specs["vllm-1"]
    argv = run_serving.server_argv(vllm, "127.0.0.1", 8080)
    assert argv[:3] == [str(venv / "bin" / "vllm"), "serve", str(hf)]
    assert argv[argv.index("--dtype") + 1] == "bfloat16"
    assert vllm.env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1"


def test_vllm_client_needs_its_venv(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit):
        run_serving.parse_args(["--client", "vllm", "--vllm-venv", str(tmp_path / "none")])
    assert "setup_vllm_cpu.sh" in capsys.readouterr().err


def test_vllm_client_argv_and_summary(tmp_path, monkeypatch) -> None:
    """The `vllm bench serve` command for a workload, and its result JSON read back as the
    summary the report prints (a stand-in script writes vLLM's keys)."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    fake = venv / "bin" / "vllm"
    # Writes a result with vLLM's key names where --result-dir/--result-filename say.
    fake.write_text(
        "#!" + sys.executable + "\n"
        "import json, sys\n"
        "a = sys.argv\n"
        "path = a[a.index('--result-dir') + 1] + '/' + a[a.index('--result-filename') + 1]\n"
        "json.dump({'duration': 2.0, 'completed': 4, 'failed': 0, 'total_input_tokens': 512,"
        " 'total_output_tokens': 512, 'request_throughput': 2.0, 'output_throughput': 256.0,"
        " 'total_token_throughput': 512.0, 'median_ttft_ms': 30.0, 'p99_ttft_ms': 40.0,"
        " 'median_tpot_ms': 5.0, 'median_itl_ms': 5.0, 'p99_itl_ms': 9.0,"
        " 'argv': a[1:]}, open(path, 'w'))\n"
    )
    fake.chmod(0o755)
    hf = tmp_path / "hf"
    hf.mkdir()
    args = run_serving.parse_args(
        ["--client", "vllm", "--vllm-venv", str(venv), "--hf-model-dir", str(hf)]
    )
    args.run_dir = str(tmp_path)
    workload = run_serving.Workload(concurrency=4, num_prompts=4, input_len=128, output_len=128)
    argv = run_serving.vllm_client_argv(args, "http://h:1", workload, str(tmp_path / "r.json"))
    assert argv[:3] == [str(fake), "bench", "serve"]
    for flag, value in [
        ("--base-url", "http://h:1"),
        ("--tokenizer", str(hf)),
        ("--random-input-len", "128"),
        ("--max-concurrency", "4"),
        ("--num-prompts", "4"),
    ]:
        assert argv[argv.index(flag) + 1] == value
    assert "--ignore-eos" in argv

    calls = []
    hooks = run_serving.Hooks(lambda: calls.append("start"), lambda: calls.append("end"))

    class Server:
        base_url = "http://h:1"

    summary = run_serving.run_vllm_client(args, Server(), workload, "t-c4", hooks)
    assert calls == ["start", "end"]
    assert summary["output_throughput"] == 256.0 and summary["median_ttft_ms"] == 30.0
    assert summary["p99_e2el_ms"] is None and summary["client"] == "vllm bench serve"


def test_anchor_ratios() -> None:
    def server(name: str, rows: list[tuple[int, float, float]]) -> dict:
        workloads = [
            {
                "workload": {"concurrency": c},
                "summary": {"output_throughput": tput, "median_ttft_ms": ttft, "failed": 0},
            }
            for c, tput, ttft in rows
        ]
        return {"name": name, "workloads": workloads}

    report = {
        "servers": [
            server("default-1", [(1, 100.0, 50.0), (16, 400.0, 500.0)]),
            server("llama-1", [(1, 50.0, 200.0), (16, 100.0, 2000.0)]),
        ],
        "skipped": ["vLLM: not installed"],
    }
    lines = run_serving.anchor_ratios(report)
    assert "- skipped: vLLM: not installed" in lines
    assert "| llama-1 | 1 | 100 / 50 | 2.00x | 50 / 200 | 0.25x | 0 / 0 |" in lines
    assert "| llama-1 | 16 | 400 / 100 | 4.00x | 500 / 2000 | 0.25x | 0 / 0 |" in lines
