"""Markdown tables of a benchmarks/run_serving.py report: workloads, servers, issue-6 targets."""

from __future__ import annotations

import platform
from collections.abc import Callable
from typing import Any

from shoal.bench.procs import role_group

# (label, server name, concurrency or None for a server-level figure, figure getter,
#  comparison, target, anchors)
Getter = Callable[[dict[str, Any], dict[str, Any] | None], float | None]


def _num(value: Any, fmt: str = ".0f") -> str:
    return "-" if value is None else format(value, fmt)


def group_cpu_us_per_token(workload: dict[str, Any], group: str) -> float | None:
    """CPU microseconds per streamed token of every process of one role group."""
    tokens = workload["summary"]["total_output_tokens"]
    cpu = sum(c for r, c in workload["role_cpu_s"].items() if role_group(r) == group)
    return cpu / tokens * 1e6 if tokens else None


def _workload_rows(report: dict[str, Any]) -> list[str]:
    rows = [
        "| server | API procs | conc | in/out | requests | out tok/s | TTFT p50 / p99 ms "
        "| TPOT p50 ms | ITL p50 / p99 ms | failed | CPU us/token: API / engine / client "
        "| other work (cores) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for server in report["servers"]:
        front = "Worker" if server["kind"] == "bare" else "ApiServer"
        for w in server.get("workloads", []):
            s, wl = w["summary"], w["workload"]
            cpu = " / ".join(
                [
                    _num(group_cpu_us_per_token(w, front), ".1f"),
                    _num(group_cpu_us_per_token(w, "EngineCore"), ".0f")
                    if server["kind"] == "shoal"
                    else "-",
                    _num(s.get("client_cpu_per_token_us"), ".1f"),
                ]
            )
            rows.append(
                f"| {server['name']} | {server['num_api_servers']} | {wl['concurrency']} "
                f"| {wl['input_len']}/{wl['output_len']} | {s['completed']} "
                f"| {_num(s['output_throughput'])} "
                f"| {_num(s['median_ttft_ms'])} / {_num(s['p99_ttft_ms'])} "
                f"| {_num(s['median_tpot_ms'], '.1f')} "
                f"| {_num(s['median_itl_ms'], '.1f')} / {_num(s['p99_itl_ms'], '.1f')} "
                f"| {s['failed']} | {cpu} | {_num(w['other_cpu_cores'], '.2f')} |"
            )
    return rows


def _server_rows(report: dict[str, Any]) -> list[str]:
    rows = [
        "| server | model | startup to /health 200 (s) | SIGTERM to all gone (s) | exit "
        "| peak RSS MiB per role |",
        "|---|---|---|---|---|---|",
    ]
    for server in report["servers"]:
        rss = ", ".join(f"{r} {mb:.0f}" for r, mb in server.get("peak_rss_mb", {}).items())
        rows.append(
            f"| {server['name']} | {server['model']} | {_num(server.get('startup_s'), '.2f')} "
            f"| {_num(server.get('sigterm_to_gone_s'), '.3f')} | {server.get('exit_code')} "
            f"| {rss} |"
        )
    return rows


def _find(report: dict[str, Any], name: str, concurrency: int | None) -> tuple[Any, Any]:
    for server in report["servers"]:
        if server["name"] != name:
            continue
        if concurrency is None:
            return server, None
        for w in server.get("workloads", []):
            if w["workload"]["concurrency"] == concurrency:
                return server, w
    return None, None


def _tput(_s: Any, w: Any) -> float | None:
    return w["summary"]["output_throughput"]


def _ttft(_s: Any, w: Any) -> float | None:
    return w["summary"]["median_ttft_ms"]


def _api_cpu(_s: Any, w: Any) -> float | None:
    return group_cpu_us_per_token(w, "ApiServer")


Target = tuple[str, str, int | None, Getter, str, float, str]

_MODEL_TARGETS: list[Target] = [
    ("c=1 output tok/s", "default-1", 1, _tput, ">=", 80, "vLLM CPU 38; llama.cpp 67-76"),
    ("c=1 TTFT p50 (ms)", "default-1", 1, _ttft, "<=", 110, ""),
    ("c=16 output tok/s", "default-1", 16, _tput, ">=", 350, "vLLM 208"),
    ("c=16 TTFT p50 (ms)", "default-1", 16, _ttft, "<=", 1000, ""),
    ("c=64 output tok/s", "default-1", 64, _tput, ">=", 600, "vLLM 252"),
    ("c=64 TTFT p50 (ms)", "default-1", 64, _ttft, "<=", 2000, ""),
]

TARGETS: list[Target] = [
    *_MODEL_TARGETS,
    # The same model targets for the quantized servers (`--quantization int8`, `gguf`).
    *[
        (f"{label}, {quant}", f"{quant}-1", conc, getter, op, target, "")
        for quant in ("int8", "gguf")
        for label, _, conc, getter, op, target, _ in _MODEL_TARGETS
    ],
    (
        "tiny c=64 streamed tok/s, 1 API server",
        "tiny-1",
        64,
        _tput,
        ">=",
        10000,
        "vLLM 1,950; bare uvicorn ~90,000",
    ),
    ("tiny c=64 streamed tok/s, 2 API servers", "tiny-2", 64, _tput, ">=", 10000, ""),
    (
        "API-server CPU per streamed token (us), tiny, 1",
        "tiny-1",
        64,
        _api_cpu,
        "<=",
        30,
        "vLLM ~100",
    ),
    ("API-server CPU per streamed token (us), tiny, 2", "tiny-2", 64, _api_cpu, "<=", 30, ""),
    # The same two with several tokens per chunk (`--stream-interval`).
    ("tiny c=64 streamed tok/s, --stream-interval", "tinysi-1", 64, _tput, ">=", 10000, ""),
    (
        "API-server CPU per streamed token (us), tiny, --stream-interval",
        "tinysi-1",
        64,
        _api_cpu,
        "<=",
        30,
        "",
    ),
    (
        "default model startup to /health 200 (s)",
        "default-1",
        None,
        lambda s, _w: s.get("startup_s"),
        "<=",
        10,
        "",
    ),
    (
        "SIGTERM to every process gone (s), default",
        "default-1",
        None,
        lambda s, _w: s.get("sigterm_to_gone_s"),
        "<=",
        1,
        "",
    ),
    (
        "SIGTERM to every process gone (s), tiny, 2",
        "tiny-2",
        None,
        lambda s, _w: s.get("sigterm_to_gone_s"),
        "<=",
        1,
        "",
    ),
]


def _target_rows(report: dict[str, Any]) -> list[str]:
    rows = ["| figure | measured | target | met | anchors |", "|---|---|---|---|---|"]
    for label, name, conc, getter, op, target, anchors in TARGETS:
        server, workload = _find(report, name, conc)
        if server is None or (conc is not None and workload is None):
            continue
        value = getter(server, workload)
        met = value is not None and (value >= target if op == ">=" else value <= target)
        fmt = ".3f" if target <= 1 else ".1f" if target < 100 else ".0f"
        rows.append(
            f"| {label} | {_num(value, fmt)} | {op} {target:g} | {'yes' if met else 'NO'} "
            f"| {anchors} |"
        )
    return rows


# Frames every sample of a process passes through (process and thread entry points).
_BOOTSTRAP_FRAMES = {
    "<module>", "spawn_main", "_main", "BaseProcess._bootstrap", "BaseProcess.run",
    "Thread._bootstrap", "Thread._bootstrap_inner", "Thread.run", "run_engine_core",
    "run_api_server_worker_proc", "run", "Runner.run", "_serve", "main",
}  # fmt: skip


def _profile_lines(report: dict[str, Any], top: int = 12) -> list[str]:
    """Per profiled workload and role: the frames with the most inclusive samples."""
    lines: list[str] = []
    for server in report["servers"]:
        for w in server.get("workloads", []):
            for role, profile in sorted((w.get("profiles") or {}).items()):
                if not profile.get("samples"):
                    continue
                lines += [
                    f"### {server['name']} c={w['workload']['concurrency']} {role} "
                    f"({profile['samples']} samples)",
                    "",
                    "| inclusive | frame | | self | frame |",
                    "|---|---|---|---|---|",
                ]
                inclusive = [
                    item
                    for item in profile["inclusive"]
                    if item[1].split(" (")[0] not in _BOOTSTRAP_FRAMES
                ]
                pairs = zip(inclusive[:top], profile["self"][:top], strict=False)
                for (inc, inc_frame), (own, own_frame) in pairs:
                    lines.append(f"| {inc:.1%} | `{inc_frame}` | | {own:.1%} | `{own_frame}` |")
                lines.append("")
    return (["## Profiles (py-spy, share of samples)", "", *lines]) if lines else []


def markdown_report(report: dict[str, Any]) -> str:
    """The whole report as markdown (what run_serving.py writes beside its JSON)."""
    machine = report.get("machine", {})
    lines = [
        f"# Serving benchmark {report.get('date', '')}",
        "",
        f"Machine: {machine.get('cpus')} CPUs ({machine.get('cpu_model')}), "
        f"{machine.get('memory_gb')} GB, Python {machine.get('python')}. Prompts: random "
        f"tokens sent as {report.get('prompt_format')}, ignore_eos, greedy."
        + (" QUICK run (short prompts, few requests)." if report.get("quick") else ""),
        "",
        "## Workloads",
        "",
        *_workload_rows(report),
        "",
        "## Servers",
        "",
        *_server_rows(report),
        "",
        "## Issue 6 targets",
        "",
        *_target_rows(report),
        "",
        *_profile_lines(report),
    ]
    return "\n".join(lines)


def cpu_model_name() -> str:
    """The host CPU's name as /proc/cpuinfo gives it ("AMD EPYC", ...), named beside every
    figure; `platform.processor()` where there is no /proc."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
