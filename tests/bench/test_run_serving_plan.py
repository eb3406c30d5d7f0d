"""benchmarks/run_serving.py's plan: the default server runs with no flags, float32 is one
flag away, and the llama-server / vLLM rows appear when installed and are skipped with a note
otherwise; the anchor table compares shoal's no-flags row with them."""

from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "run_serving", os.path.join(REPO, "benchmarks", "run_serving.py")
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["run_serving"] = module
    spec.loader.exec_module(module)
    return module


run_serving = _load()


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


def test_vllm_row_skipped_with_a_note_when_not_installed(tmp_path) -> None:
    specs, skipped = _plan(tmp_path, "--only", "vllm")
    if importlib.util.find_spec("vllm") is None:
        assert specs == {} and any(note.startswith("vLLM: not installed") for note in skipped)
    else:
        assert "vllm-1" in specs


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
