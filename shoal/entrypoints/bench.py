"""The `shoal bench` subcommand: `shoal bench serve` (flags named like `vllm bench serve`'s).

Light to import: the load generator (shoal.bench.serve) is imported only when a run starts.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from typing import Any


def register(subparsers: Any) -> None:
    """Add `bench` (with its `serve` subcommand) to the `shoal` command's subparsers."""
    bench = subparsers.add_parser(
        "bench", help="benchmark a running server", description="Benchmarks."
    )
    bench.set_defaults(func=lambda _args: _print_help(bench))
    sub = bench.add_subparsers(dest="bench_command", metavar="BENCHMARK")
    serve = sub.add_parser(
        "serve",
        help="load a running OpenAI-compatible server with streamed requests",
        description="Stream random-token requests to a running server at a fixed "
        "concurrency or Poisson rate; report throughput, TTFT, TPOT, ITL and errors.",
    )
    add_bench_serve_args(serve)
    serve.set_defaults(func=run_bench_serve)


def _print_help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def add_bench_serve_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Every `shoal bench serve` flag."""
    g = parser.add_argument_group("server")
    g.add_argument("--base-url", default=None, help="http://host:port (overrides --host/--port)")
    g.add_argument("--host", default="127.0.0.1", help="(default: %(default)s)")
    g.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
    g.add_argument(
        "--endpoint",
        default="/v1/completions",
        choices=("/v1/completions", "/v1/chat/completions"),
        help="(default: %(default)s)",
    )
    g.add_argument("--model", default=None, help="model name (default: GET /v1/models' first)")
    g.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer of the random prompts (default: MODEL if it is a local path, "
        "else the embedded default model's)",
    )
    g.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help=argparse.SUPPRESS)
    g.add_argument(
        "--ready-check-timeout-sec",
        type=float,
        default=60.0,
        help="wait this long for GET /health to answer 200 (default: %(default)s)",
    )
    d = parser.add_argument_group("dataset")
    d.add_argument("--dataset-name", default="random", choices=("random",))
    d.add_argument("--random-input-len", type=int, default=128, help="(default: %(default)s)")
    d.add_argument("--random-output-len", type=int, default=128, help="(default: %(default)s)")
    d.add_argument(
        "--random-range-ratio",
        type=float,
        default=0.0,
        help="lengths uniform in [len*(1-r), len*(1+r)] (default: %(default)s)",
    )
    d.add_argument(
        "--prompt-format",
        default="text",
        choices=("text", "token-ids"),
        help="send random tokens decoded to text, or as a token-id list (completions only) "
        "(default: %(default)s)",
    )
    d.add_argument("--num-prompts", type=int, default=100, help="(default: %(default)s)")
    d.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    lo = parser.add_argument_group("load")
    lo.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight")
    lo.add_argument(
        "--request-rate",
        type=float,
        default=math.inf,
        help="requests per second, Poisson arrivals; inf = all at once (default: %(default)s)",
    )
    lo.add_argument("--ignore-eos", action="store_true", help="generate exactly the output len")
    lo.add_argument("--temperature", type=float, default=0.0, help="(default: %(default)s)")
    lo.add_argument(
        "--num-warmups",
        type=int,
        default=None,
        help="warm-up requests before measuring (default: --max-concurrency, or 1)",
    )
    r = parser.add_argument_group("results")
    r.add_argument(
        "--metric-percentiles",
        default="99",
        help="comma-separated percentiles to report (default: %(default)s)",
    )
    r.add_argument("--save-result", action="store_true", help="write the results as JSON")
    r.add_argument("--result-dir", default=".", help="(default: the current directory)")
    r.add_argument(
        "--result-filename",
        default=None,
        help="JSON file name (implies --save-result; default: shoal-bench-<time>.json)",
    )
    return parser


def config_from_args(args: argparse.Namespace) -> Any:
    """The validated `BenchConfig`; `ValueError` names the offending flag."""
    from shoal.bench.serve import BenchConfig

    try:
        percentiles = tuple(float(q) for q in args.metric_percentiles.split(",") if q.strip())
    except ValueError:
        raise ValueError(
            f"--metric-percentiles: expected numbers like 50,99, got {args.metric_percentiles!r}"
        ) from None
    base_url = args.base_url or f"http://{args.host}:{args.port}"
    return BenchConfig(
        base_url=base_url,
        endpoint=args.endpoint,
        model=args.model,
        tokenizer=args.tokenizer,
        num_prompts=args.num_prompts,
        input_len=args.random_input_len,
        output_len=args.random_output_len,
        range_ratio=args.random_range_ratio,
        prompt_format=args.prompt_format,
        max_concurrency=args.max_concurrency,
        request_rate=args.request_rate,
        ignore_eos=args.ignore_eos,
        temperature=args.temperature,
        seed=args.seed,
        num_warmups=args.num_warmups,
        percentiles=percentiles,
        ready_timeout_s=args.ready_check_timeout_sec,
        api_key=args.api_key,
    )


def run_bench_serve(args: argparse.Namespace) -> int:
    """Run the benchmark, print the report, save JSON if asked. Exit 1 if a request failed."""
    from shoal.bench.serve import run_benchmark
    from shoal.bench.stats import format_report

    config = config_from_args(args)
    if config.num_prompts < 1:
        raise ValueError(f"--num-prompts: must be at least 1, got {config.num_prompts}")
    from shoal.bench.http import HTTPClientError

    try:
        summary = run_benchmark(config)
    except (TimeoutError, RuntimeError, HTTPClientError) as e:
        print(f"shoal bench serve: {e}", flush=True)
        return 1
    print(format_report(summary, list(config.percentiles)), flush=True)
    if args.save_result or args.result_filename:
        name = args.result_filename or time.strftime("shoal-bench-%Y%m%d-%H%M%S.json")
        path = os.path.join(args.result_dir, name)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        summary["date"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(json_safe(summary), f, indent=2)
        print(f"results written to {path}")
    return 1 if summary["failed"] else 0


def json_safe(value: Any) -> Any:
    """`value` with NaN / infinite floats as None (strict JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value
