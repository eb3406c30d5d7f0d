"""Bounded soak of a real `shoal serve`: continuous streaming load, per-role RSS / fd / CPU
samples and /metrics gauges, growth first-vs-last third, and a drained-engine check at the end.

Run from the repository root: `.venv/bin/python benchmarks/soak.py --duration-s 180
--concurrency 16 --out /tmp/soak.json`. It starts the server itself (on 127.0.0.1 only, the
tiny random-weight model with `--load-format dummy` unless `--model` is given), stops by itself
and SIGTERMs the server in `finally` (SIGKILL for whatever is left after `--stop-timeout-s`).
Exit status 0 when every check passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
import psutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOST = "127.0.0.1"  # the only address this script ever talks to
TITLE_PREFIX = "shoal::"
# `shoal:num_requests_running{engine="0"} 3.0`: name, labels, value.
_METRIC_LINE = re.compile(r"^(shoal:[a-z_]+)(?:\{([^}]*)\})?\s+(\S+)$")
_ENGINE_GAUGES = (
    "num_requests_running",
    "num_requests_waiting",
    "kv_cache_blocks_total",
    "kv_cache_blocks_free",
    "kv_cache_usage_perc",
)
# Prompt text: common words, about one token each in the default tokenizer.
_WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "small")


@dataclass
class SoakConfig:
    """What to run; every field has a flag of the same name."""

    duration_s: float = 600.0
    concurrency: int = 32
    api_server_count: int = 1
    data_parallel_size: int = 1
    sample_interval_s: float = 5.0
    max_prompt_words: int = 200
    max_tokens: int = 128
    disconnect_fraction: float = 0.1
    max_num_seqs: int = 0  # 0: --concurrency (nothing waits); smaller makes requests queue
    num_blocks: int = 512
    max_model_len: int = 512
    request_timeout_s: float = 120.0
    drain_timeout_s: float = 60.0
    startup_timeout_s: float = 300.0
    stop_timeout_s: float = 60.0
    model: str | None = None
    seed: int = 0
    out: str | None = None

    def validate(self) -> None:
        """`ValueError` naming the flag of the first bad field."""
        positive = ("duration_s", "concurrency", "sample_interval_s", "max_tokens")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive")
        if self.max_num_seqs < 0:
            raise ValueError("--max-num-seqs must be at least 0")
        if self.api_server_count < 1 or self.data_parallel_size < 1:
            raise ValueError("--api-server-count and --data-parallel-size must be at least 1")
        if not 0.0 <= self.disconnect_fraction <= 1.0:
            raise ValueError("--disconnect-fraction must be within [0, 1]")
        if self.max_prompt_words + self.max_tokens + 16 > self.max_model_len:
            raise ValueError("--max-prompt-words + --max-tokens must fit in --max-model-len")


@dataclass
class LoadStats:
    """What the clients saw. `errors` maps an error kind to its count."""

    started: int = 0
    completed: int = 0
    disconnected: int = 0  # streams this script closed early on purpose
    output_chunks: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


# -- the server's process tree -------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _role(proc: psutil.Process, root_pid: int) -> str:
    """`ApiServer_0`, `EngineCore_0`, ... from the process title; `Launcher` for the root."""
    cmdline = proc.cmdline()
    title = cmdline[0] if cmdline else proc.name()
    if title.startswith(TITLE_PREFIX):
        return title[len(TITLE_PREFIX) :].strip()
    if proc.pid == root_pid:
        return "Launcher"
    return "ResourceTracker" if any("resource_tracker" in p for p in cmdline) else proc.name()


def sample_processes(root: psutil.Process) -> dict[str, dict[str, float]]:
    """role -> {rss_mib, fds, cpu_s, procs} summed over the role's live processes."""
    out: dict[str, dict[str, float]] = {}
    with contextlib.suppress(psutil.NoSuchProcess):
        for proc in [root, *root.children(recursive=True)]:
            try:
                with proc.oneshot():
                    role = _role(proc, root.pid)
                    cpu = proc.cpu_times()
                    row = {
                        "rss_mib": proc.memory_info().rss / 2**20,
                        "fds": float(proc.num_fds()),
                        "cpu_s": cpu.user + cpu.system,
                        "procs": 1.0,
                    }
            except psutil.Error:
                continue  # exited between listing and reading
            acc = out.setdefault(role, dict.fromkeys(row, 0.0))
            for key, value in row.items():
                acc[key] += value
    return out


def parse_metrics(text: str) -> dict[str, float]:
    """The engine gauges of a /metrics body, summed over engines (`kv_cache_usage_perc`: the
    largest), plus `requests_received_total`."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        match = _METRIC_LINE.match(line)
        if not match:
            continue
        name, value = match.group(1)[len("shoal:") :], float(match.group(3))
        if name in _ENGINE_GAUGES:
            if name == "kv_cache_usage_perc":
                values[name] = max(values.get(name, 0.0), value)
            else:
                values[name] = values.get(name, 0.0) + value
        elif name == "requests_received_total":
            values[name] = value
    return values


def start_server(
    config: SoakConfig, model: str, port: int, log_path: str
) -> subprocess.Popen[bytes]:
    """`shoal serve` on HOST:port in its own session, output to `log_path`."""
    argv = [
        sys.executable,
        "-m",
        "shoal.entrypoints.cli",
        "serve",
        model,
        "--host",
        HOST,
        "--port",
        str(port),
    ]
    argv += ["--api-server-count", str(config.api_server_count)]
    argv += ["--data-parallel-size", str(config.data_parallel_size)]
    argv += ["--num-blocks", str(config.num_blocks), "--max-model-len", str(config.max_model_len)]
    argv += [
        "--max-num-seqs",
        str(config.max_num_seqs or config.concurrency),
        "--seed",
        str(config.seed),
    ]
    if config.model is None:
        argv += ["--load-format", "dummy"]
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )


def stop_server(proc: subprocess.Popen[bytes], timeout_s: float) -> dict[str, Any]:
    """SIGTERM the launcher, wait for the whole tree, SIGKILL what is left. Returns
    {exit_code, stop_s, killed}."""
    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    start = time.monotonic()
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout_s)
    _, alive = psutil.wait_procs(tree, timeout=max(0.1, timeout_s - (time.monotonic() - start)))
    for leftover in alive:
        with contextlib.suppress(psutil.Error):
            leftover.kill()
    psutil.wait_procs(alive, timeout=5)
    if proc.poll() is None:
        proc.kill()
        proc.wait(5)
    return {"exit_code": proc.returncode, "stop_s": time.monotonic() - start, "killed": len(alive)}


async def wait_healthy(
    client: httpx.AsyncClient, proc: subprocess.Popen[bytes], timeout_s: float
) -> float:
    """Seconds until GET /health answered 200; `RuntimeError` if the server exits or times out."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} during startup")
        with contextlib.suppress(httpx.HTTPError):
            if (await client.get("/health", timeout=2.0)).status_code == 200:
                return time.monotonic() - start
        await asyncio.sleep(0.2)
    raise RuntimeError(f"server not healthy after {timeout_s} s")


# -- load ------------------------------------------------------------------------------------------


async def one_request(
    client: httpx.AsyncClient, config: SoakConfig, model: str, rng: random.Random, stats: LoadStats
) -> None:
    """Stream one completion; with probability `disconnect_fraction` close it after a few
    chunks. Counts the outcome in `stats`."""
    prompt = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, config.max_prompt_words)))
    max_tokens = rng.randint(1, config.max_tokens)
    # Disconnect only where the stream has chunks left to cut.
    cut_after = rng.randint(1, max_tokens) if rng.random() < config.disconnect_fraction else None
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True}
    body |= {"ignore_eos": True, "temperature": 1.0, "seed": rng.randrange(2**31)}
    stats.started += 1
    chunks = 0
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                stats.error(f"http_{response.status_code}")
                return
            async for line in response.aiter_lines():
                if line == "data: [DONE]":
                    stats.completed += 1
                    return
                if line.startswith("data: "):
                    if '"error"' in line[:40]:
                        stats.error("stream_error_event")
                        return
                    chunks += 1
                    stats.output_chunks += 1
                    if cut_after is not None and chunks >= cut_after:
                        stats.disconnected += 1
                        return  # leaving the block closes the connection mid-stream
            stats.error("stream_ended_without_done")
    except httpx.HTTPError as exc:
        stats.error(type(exc).__name__)


async def client_loop(
    client: httpx.AsyncClient,
    config: SoakConfig,
    model: str,
    seed: int,
    deadline: float,
    stats: LoadStats,
) -> None:
    """Send requests back to back until `deadline` (monotonic)."""
    rng = random.Random(seed)
    while time.monotonic() < deadline:
        await one_request(client, config, model, rng, stats)


# -- sampling and the report ---------------------------------------------------------------------


async def take_sample(client: httpx.AsyncClient, root: psutil.Process, t0: float) -> dict[str, Any]:
    """One sample: seconds since the load began, per-role process figures, /metrics gauges."""
    roles = await asyncio.to_thread(sample_processes, root)
    try:
        response = await client.get("/metrics", timeout=10.0)
        metrics = parse_metrics(response.text)
    except httpx.HTTPError as exc:
        metrics = {"error": type(exc).__name__}  # type: ignore[dict-item]
    return {"t_s": round(time.monotonic() - t0, 2), "roles": roles, "metrics": metrics}


async def sampler(
    client: httpx.AsyncClient,
    root: psutil.Process,
    t0: float,
    deadline: float,
    interval_s: float,
    out: list[dict[str, Any]],
) -> None:
    """Append a sample every `interval_s` until `deadline`."""
    while True:
        out.append(await take_sample(client, root, t0))
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        await asyncio.sleep(min(interval_s, remaining))


def growth(
    samples: list[dict[str, Any]], idle: dict[str, Any] | None = None
) -> dict[str, dict[str, float]]:
    """Per role: mean RSS MiB and fds over the first and last third of `samples` (the first
    sample, taken before any request, is the `_base` column and in neither third), the
    difference, the `idle` sample's figures after the drain, and the CPU seconds used from
    the first sample to the last."""
    loaded = samples[1:] or samples
    third = max(1, len(loaded) // 3)
    first, last = loaded[:third], loaded[-third:]
    roles = sorted({role for s in samples for role in s["roles"]})
    out: dict[str, dict[str, float]] = {}
    for role in roles:
        row: dict[str, float] = {}
        for key in ("rss_mib", "fds"):
            a = [s["roles"][role][key] for s in first if role in s["roles"]]
            b = [s["roles"][role][key] for s in last if role in s["roles"]]
            if a and b:
                row[f"{key}_first"], row[f"{key}_last"] = sum(a) / len(a), sum(b) / len(b)
                row[f"{key}_growth"] = row[f"{key}_last"] - row[f"{key}_first"]
            if role in samples[0]["roles"]:
                row[f"{key}_base"] = samples[0]["roles"][role][key]
            if idle is not None and role in idle["roles"]:
                row[f"{key}_idle"] = idle["roles"][role][key]
        cpu = [s["roles"][role]["cpu_s"] for s in samples if role in s["roles"]]
        row["cpu_s"] = cpu[-1] - cpu[0] if cpu else 0.0
        out[role] = row
    return out


def peaks(samples: list[dict[str, Any]]) -> dict[str, float]:
    """Each /metrics gauge at its fullest over `samples`: the largest value, the smallest for
    `kv_cache_blocks_free` (over samples where every engine has reported: an engine with no
    stats yet reads 0 free of 0)."""
    full = max((s["metrics"].get("kv_cache_blocks_total", 0.0) for s in samples), default=0.0)
    out: dict[str, float] = {}
    for sample in samples:
        for name, value in sample["metrics"].items():
            if not isinstance(value, float):
                continue
            if name != "kv_cache_blocks_free":
                out[name] = max(out.get(name, value), value)
            elif sample["metrics"].get("kv_cache_blocks_total") == full:
                out[name] = min(out.get(name, value), value)
    return out


async def wait_drained(client: httpx.AsyncClient, timeout_s: float) -> dict[str, float]:
    """Poll /metrics until no request runs or waits and every KV block is free; the last
    gauges read (drained or not) once `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    metrics: dict[str, float] = {}
    while True:
        with contextlib.suppress(httpx.HTTPError):
            metrics = parse_metrics((await client.get("/metrics", timeout=10.0)).text)
        if _drained(metrics) or time.monotonic() >= deadline:
            return metrics
        await asyncio.sleep(0.5)


def _drained(m: dict[str, float]) -> bool:
    return (
        m.get("num_requests_running", -1) == 0
        and m.get("num_requests_waiting", -1) == 0
        and m.get("kv_cache_blocks_total", 0) > 0
        and m.get("kv_cache_blocks_free") == m.get("kv_cache_blocks_total")
    )


async def soak(config: SoakConfig, base_url: str, proc: subprocess.Popen[bytes]) -> dict[str, Any]:
    """Wait for health, load for `duration_s` while sampling, then check the drain. Returns
    the report (without the server's stop figures)."""
    limits = httpx.Limits(
        max_connections=config.concurrency + 4, max_keepalive_connections=config.concurrency + 4
    )
    timeout = httpx.Timeout(config.request_timeout_s, connect=10.0)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=timeout) as client:
        startup_s = await wait_healthy(client, proc, config.startup_timeout_s)
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        root = psutil.Process(proc.pid)
        stats = LoadStats()
        samples: list[dict[str, Any]] = []
        load_before = os.getloadavg()
        t0 = time.monotonic()
        deadline = t0 + config.duration_s
        workers = [
            asyncio.create_task(
                client_loop(client, config, model, config.seed * 1000 + i, deadline, stats)
            )
            for i in range(config.concurrency)
        ]
        await sampler(client, root, t0, deadline, config.sample_interval_s, samples)
        # Bounded: in-flight requests get one request timeout to finish, then are cancelled.
        _, late = await asyncio.wait(workers, timeout=config.request_timeout_s)
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)
        load_s = time.monotonic() - t0
        load_after = os.getloadavg()
        drain_start = time.monotonic()
        final = await wait_drained(client, config.drain_timeout_s)
        drain_s = time.monotonic() - drain_start
        idle = await take_sample(client, root, t0)
    return {
        "config": asdict(config),
        "startup_s": startup_s,
        "load_s": load_s,
        "loadavg_1_5_15": {"before": list(load_before), "after": list(load_after)},
        "load": {**asdict(stats), "cancelled_at_end": len(late)},
        "requests_per_s": stats.completed / load_s if load_s else 0.0,
        "chunks_per_s": stats.output_chunks / load_s if load_s else 0.0,
        "growth": growth(samples, idle),
        "peak_metrics": peaks(samples),
        "final_metrics": final,
        "drain_s": drain_s,
        "idle_sample": idle,
        "samples": samples,
    }


def checks(report: dict[str, Any]) -> dict[str, bool]:
    """Pass/fail per property: no client errors, engines drained, clean server exit."""
    final = report.get("final_metrics", {})
    return {
        "no_errors": not report.get("load", {}).get("errors"),
        "running_returned_to_0": final.get("num_requests_running") == 0,
        "waiting_returned_to_0": final.get("num_requests_waiting") == 0,
        "kv_blocks_all_free": final.get("kv_cache_blocks_total", 0) > 0
        and final.get("kv_cache_blocks_free") == final.get("kv_cache_blocks_total"),
        "server_exit_0": report.get("server_stop", {}).get("exit_code") == 0,
        "no_process_killed": report.get("server_stop", {}).get("killed") == 0,
    }


def run_soak(config: SoakConfig) -> dict[str, Any]:
    """Start the server, soak it, stop it (always), and return the report with `checks` and
    `passed`. Writes the JSON to `config.out` when set."""
    config.validate()
    report: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="shoal-soak-") as tmp:
        model = config.model or _tiny_model(os.path.join(tmp, "tiny"))
        port = _free_port()
        log_path = os.path.join(tmp, "serve.log")
        proc = start_server(config, model, port, log_path)
        try:
            report = asyncio.run(soak(config, f"http://{HOST}:{port}", proc))
        except BaseException as exc:
            report = {"config": asdict(config), "failure": repr(exc)}
            raise
        finally:
            report["server_stop"] = stop_server(proc, config.stop_timeout_s)
            report["server_log_tail"] = _tail(log_path)
            report["checks"] = checks(report)
            report["passed"] = all(report["checks"].values())
            if config.out:
                with open(config.out, "w", encoding="utf-8") as f:
                    json.dump(report, f, indent=1)
    return report


def _tiny_model(path: str) -> str:
    sys.path.insert(0, REPO)
    from tests.helpers import make_tiny_model_dir

    return make_tiny_model_dir(path)


def _tail(path: str, num_lines: int = 20) -> str:
    with contextlib.suppress(OSError), open(path, errors="replace") as f:
        return "".join(f.readlines()[-num_lines:])
    return ""


def format_table(report: dict[str, Any]) -> str:
    """The per-role growth table, the load figures and the checks, as plain text."""
    cols = [
        (f"{k}_{c}", f"{n} {c}")
        for k, n in (("rss_mib", "RSS"), ("fds", "fds"))
        for c in ("base", "first", "last", "growth", "idle")
    ]
    lines = [f"{'role':<16}" + "".join(f"{title:>11}" for _, title in cols) + f"{'CPU s':>9}"]
    for role, g in report.get("growth", {}).items():
        cells = "".join(f"{g.get(key, float('nan')):>11.1f}" for key, _ in cols)
        lines.append(f"{role:<16}{cells}{g.get('cpu_s', 0):>9.1f}")
    lines.append("(RSS in MiB; first/last = mean over the first/last third of the load's samples)")
    load = report.get("load", {})
    lines.append(
        f"requests: started {load.get('started')} completed {load.get('completed')} "
        f"disconnected on purpose {load.get('disconnected')} errors {load.get('errors')} "
        f"({report.get('requests_per_s', 0):.1f} req/s, {report.get('chunks_per_s', 0):.0f} chunks/s "
        f"over {report.get('load_s', 0):.0f} s, {len(report.get('samples', []))} samples)"
    )
    lines.append(f"load average before/after: {report.get('loadavg_1_5_15')}")
    lines.append(f"peak gauges: {report.get('peak_metrics')}")
    lines.append(f"after drain ({report.get('drain_s', 0):.1f} s): {report.get('final_metrics')}")
    lines.append(f"server stop: {report.get('server_stop')}")
    lines.append(
        "checks: "
        + ", ".join(f"{k}={'ok' if v else 'FAIL'}" for k, v in report.get("checks", {}).items())
    )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> SoakConfig:
    """Flags named after `SoakConfig`'s fields."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in asdict(SoakConfig()).items():
        flag = "--" + name.replace("_", "-")
        kind = str if default is None else type(default)
        parser.add_argument(flag, type=kind, default=default, help="(default: %(default)s)")
    return SoakConfig(**vars(parser.parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    """Run the soak; print the table; 0 when every check passed."""
    report = run_soak(parse_args(argv))
    print(format_table(report))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
