"""The `shoal serve` argument parser and its mapping to the two configs (torch-free, fast):
`config_from_args` -> `ShoalConfig` (the engines), `server_config_from_args` -> `ServerConfig`
(the launcher and every API-server process, which receives it pickled). Defaults come from
the dataclass fields, so the flags never drift from the configs.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from typing import Any

from shoal import envs
from shoal.config import (
    DATA_PARALLEL_BACKENDS,
    FRONTENDS,
    RAY_PLACEMENT_STRATEGIES,
    UVICORN_LOG_LEVELS,
    CacheConfig,
    ModelConfig,
    ParallelConfig,
    ScaleOutConfig,
    SchedulerConfig,
    ServerConfig,
    ShoalConfig,
)
from shoal.entrypoints.engine_args import add_engine_args, add_model_args
from shoal.entrypoints.engine_args import config_default as _default
from shoal.processing.tool_parsers import TOOL_PARSERS

DEFAULT_SHUTDOWN_TIMEOUT_S: float = _default(ServerConfig, "shutdown_timeout_s")


def add_serve_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add every `shoal serve` flag to `parser` and return it."""
    parser.add_argument(
        "model",
        nargs="?",
        default=_default(ModelConfig, "model"),
        metavar="MODEL",
        help="a Hugging Face model directory or a .gguf file (default: the embedded "
        "SmolLM2-135M-Instruct)",
    )
    _add_server_args(parser.add_argument_group("server"))
    _add_frontend_args(parser.add_argument_group("OpenAI front end"))
    _add_tool_args(parser.add_argument_group("tool calling (docs/structured-outputs.md)"))
    _add_scale_out_args(parser.add_argument_group("engines on other hosts (docs/scale-out.md)"))
    _add_model_args(parser.add_argument_group("model"))
    add_engine_args(parser.add_argument_group("engine"))
    return parser


def _add_server_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--host",
        default=_default(ServerConfig, "host"),
        help="address to listen on (default: %(default)s)",
    )
    g.add_argument(
        "--port",
        type=int,
        default=_default(ServerConfig, "port"),
        help="TCP port to listen on; 0 = any free port, printed once ready (default: %(default)s)",
    )
    g.add_argument(
        "--api-server-count",
        type=int,
        default=_default(ServerConfig, "api_server_count"),
        help="API-server processes sharing the listening socket (default: %(default)s)",
    )
    g.add_argument(
        "--data-parallel-size",
        type=int,
        default=_default(ServerConfig, "data_parallel_size"),
        help="engine-core processes, each a full model replica (default: %(default)s)",
    )
    g.add_argument(
        "--shutdown-timeout",
        type=float,
        default=DEFAULT_SHUTDOWN_TIMEOUT_S,
        help="seconds SIGINT/SIGTERM let in-flight requests finish before they are "
        "aborted; 0 = abort at once (default: %(default)s)",
    )
    g.add_argument(
        "--engine-ready-timeout",
        type=float,
        default=_default(ServerConfig, "engine_ready_timeout_s"),
        help="seconds to wait for every engine to load its model and report READY "
        "(default: $SHOAL_ENGINE_READY_TIMEOUT_S or 600)",
    )
    g.add_argument(
        "--engine-stall-timeout",
        type=float,
        default=_default(ServerConfig, "engine_stall_timeout_s"),
        help="seconds an engine holding requests may send nothing before the API servers "
        "declare it hung (/health 503, its requests fail); 0 = never (default: %(default)s)",
    )
    g.add_argument(
        "--restart-dead-engines",
        action="store_true",
        default=_default(ServerConfig, "restart_dead_engines"),
        help="when an engine process dies (crash, kill -9, OOM), fail only its in-flight "
        "requests (503 + Retry-After) and start a fresh engine of the same index while the "
        "others keep serving, instead of stopping the whole run; an engine that dies again "
        "before it is ready, or more than $SHOAL_MAX_ENGINE_RESTARTS (3) times within "
        "$SHOAL_ENGINE_RESTART_WINDOW_S (600) seconds, still stops the run (default: off)",
    )
    g.add_argument(
        "--api-key",
        default=_default(ServerConfig, "api_key"),
        help="require `Authorization: Bearer <key>` on /v1 routes",
    )
    g.add_argument(
        "--max-num-queued-requests",
        type=int,
        default=_default(ServerConfig, "max_num_queued_requests"),
        help="refuse new /v1 generation requests with 503 + Retry-After once this many are "
        "in flight over all API servers (default: no limit)",
    )
    g.add_argument(
        "--max-request-body-bytes",
        type=int,
        default=_default(ServerConfig, "max_request_body_bytes"),
        help="largest request body accepted; larger gets 413 (default: %(default)s)",
    )
    g.add_argument(
        "--stream-interval",
        type=int,
        default=_default(ServerConfig, "stream_interval"),
        help="tokens per streamed chunk: a running stream's first token goes at once, then "
        "one chunk per this many tokens, and the rest at the end; larger values cost the API "
        "servers less CPU per token at the price of burstier chunks (default: %(default)s, "
        "a chunk per token)",
    )
    g.add_argument(
        "--uvicorn-log-level",
        default=_default(ServerConfig, "uvicorn_log_level"),
        choices=UVICORN_LOG_LEVELS,
        help="uvicorn's own log level (default: %(default)s)",
    )


def _add_frontend_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--frontend",
        choices=FRONTENDS,
        default=_default(ServerConfig, "frontend"),
        help="what serves HTTP: python = --api-server-count API-server processes; rust = one "
        "native shoal-frontend process (built by scripts/bootstrap.sh, or `cd frontend-rs && "
        "cargo build --release`; docs/native-frontend.md) (default: %(default)s)",
    )
    g.add_argument(
        "--enable-prompt-embeds",
        action="store_true",
        default=_default(ServerConfig, "enable_prompt_embeds"),
        help="accept `prompt_embeds` on /v1/completions (base64 of torch.save of a [tokens, "
        "hidden] tensor), carried to the engines in shared memory (default: off)",
    )
    for flag, field, what in (
        ("--allowed-origins", "allowed_origins", "origins"),
        ("--allowed-methods", "allowed_methods", "methods"),
        ("--allowed-headers", "allowed_headers", "request headers"),
    ):
        g.add_argument(
            flag,
            type=_json_list(flag),
            default=list(_default(ServerConfig, field)),
            help=f"CORS: allowed {what}, a JSON list (default: '[\"*\"]', any)",
        )
    g.add_argument(
        "--allow-credentials",
        action="store_true",
        default=_default(ServerConfig, "allow_credentials"),
        help="CORS: allow credentials (cookies, Authorization) on cross-origin requests",
    )
    g.add_argument(
        "--chat-template",
        default=_default(ServerConfig, "chat_template"),
        help="the chat template (Jinja): a file, or the template itself (default: the tokenizer's)",
    )
    g.add_argument(
        "--enable-access-log",
        dest="access_log",
        action="store_true",
        default=_default(ServerConfig, "access_log"),
        help="log one line per HTTP request (client, method, path, status, duration)",
    )
    g.add_argument(
        "--disable-uvicorn-access-log",
        dest="access_log",
        action="store_false",
        help="no per-request log lines (the default; vLLM's spelling, accepted)",
    )
    g.add_argument(
        "--disable-log-stats",
        action="store_true",
        default=False,
        help="no periodic stats line from the engines (default: one every "
        "$SHOAL_LOG_STATS_INTERVAL_S = 10 s while busy)",
    )


def _add_tool_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        default=_default(ServerConfig, "enable_auto_tool_choice"),
        help='accept tool_choice "auto" (the default with tools): the model may call tools, '
        "found in its output by --tool-call-parser (vLLM's flag)",
    )
    g.add_argument(
        "--tool-call-parser",
        choices=sorted(TOOL_PARSERS),
        default=_default(ServerConfig, "tool_call_parser"),
        help="how tool calls are written in the model's output: hermes = "
        "<tool_call>{json}</tool_call> (Hermes, Qwen, and the prompt shoal gives templates "
        "without tools) (default: none)",
    )


def _json_list(flag: str) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise argparse.ArgumentTypeError(
                f"{flag}: expected a JSON list of strings, e.g. '[\"*\"]', got {text!r}"
            )
        return value

    return parse


def _frontend_fields(args: argparse.Namespace) -> dict[str, Any]:
    """ServerConfig's front-end fields; `ValueError` naming --chat-template when it is
    neither a readable file nor a Jinja template."""
    return {
        "enable_prompt_embeds": getattr(args, "enable_prompt_embeds", False),
        "allowed_origins": tuple(getattr(args, "allowed_origins", ["*"])),
        "allowed_methods": tuple(getattr(args, "allowed_methods", ["*"])),
        "allowed_headers": tuple(getattr(args, "allowed_headers", ["*"])),
        "allow_credentials": getattr(args, "allow_credentials", False),
        "chat_template": load_chat_template(getattr(args, "chat_template", None)),
        "access_log": getattr(args, "access_log", False),
        "frontend": getattr(args, "frontend", "python"),
    }


def load_chat_template(value: str | None) -> str | None:
    """`--chat-template`: the text of the file it names, else the value itself when it
    looks like a Jinja template; `ValueError` naming the flag otherwise, or when the
    template does not parse."""
    if value is None:
        return None
    if os.path.isfile(value):
        try:
            with open(value, encoding="utf-8") as f:
                template = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--chat-template: cannot read {value!r}: {e}") from e
    elif "{{" in value or "{%" in value:
        template = value
    else:
        raise ValueError(
            f"--chat-template: {value!r} is neither a file nor a Jinja template "
            "(no '{{' or '{%')"
        )
    import jinja2

    try:
        jinja2.Environment().parse(template)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"--chat-template: not a valid Jinja template: {e}") from e
    return template


def _add_scale_out_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--data-parallel-backend",
        default=_default(ScaleOutConfig, "data_parallel_backend"),
        choices=DATA_PARALLEL_BACKENDS,
        help="mp: engine processes on this host (plus --headless hosts); ray: every engine a "
        "Ray actor, one placement-group bundle each (pip install 'shoal[ray]') "
        "(default: %(default)s)",
    )
    g.add_argument(
        "--data-parallel-size-local",
        type=int,
        default=_default(ScaleOutConfig, "data_parallel_size_local"),
        help="engines this host runs (0 allowed on the front end); the others join from "
        "--headless hosts (default: all)",
    )
    g.add_argument(
        "--data-parallel-start-rank",
        type=int,
        default=_default(ScaleOutConfig, "data_parallel_start_rank"),
        help="index of this --headless host's first engine (default: %(default)s)",
    )
    g.add_argument(
        "--data-parallel-address",
        default=_default(ScaleOutConfig, "data_parallel_address"),
        help="the front end's address that engines on other hosts reach: its API servers, DP "
        "coordinator and handshake port bind there (default: --host; Ray: the head's IP)",
    )
    g.add_argument(
        "--data-parallel-rpc-port",
        type=int,
        default=_default(ScaleOutConfig, "data_parallel_rpc_port"),
        help="the front end's TCP port where --headless hosts join (default: %(default)s)",
    )
    g.add_argument(
        "--headless",
        action="store_true",
        default=_default(ScaleOutConfig, "headless"),
        help="run --data-parallel-size-local engines only, no API server; they join the "
        "front end at --data-parallel-address:--data-parallel-rpc-port",
    )
    g.add_argument(
        "--ray-address",
        default=_default(ScaleOutConfig, "ray_address"),
        help="the Ray cluster of --data-parallel-backend ray (default: $RAY_ADDRESS, else a "
        "local Ray instance started and stopped with the server)",
    )
    g.add_argument(
        "--ray-placement-strategy",
        default=_default(ScaleOutConfig, "ray_placement_strategy"),
        choices=RAY_PLACEMENT_STRATEGIES,
        help="how the engines' placement-group bundles spread over the nodes "
        "(default: %(default)s)",
    )
    g.add_argument(
        "--ray-cpus-per-engine",
        type=float,
        default=_default(ScaleOutConfig, "ray_cpus_per_engine"),
        help="CPUs in each engine's bundle (default: %(default)s)",
    )
    g.add_argument(
        "--ray-gpus-per-engine",
        type=float,
        default=_default(ScaleOutConfig, "ray_gpus_per_engine"),
        help="GPUs in each engine's bundle (default: 1 with --device cuda, else 0)",
    )


def _add_model_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--served-model-name",
        default=_default(ModelConfig, "served_model_name"),
        help="the name clients put in `model` (default: derived from MODEL)",
    )
    add_model_args(g)
    g.add_argument(
        "--seed",
        type=int,
        default=_default(ModelConfig, "seed"),
        help="random seed of dummy weights and unseeded sampling (default: %(default)s)",
    )


def make_serve_parser(prog: str = "shoal serve") -> argparse.ArgumentParser:
    """A standalone `shoal serve` parser (the CLI adds the same flags to its subparser)."""
    parser = argparse.ArgumentParser(prog=prog, description="Start the OpenAI-compatible server.")
    return add_serve_args(parser)


def config_from_args(args: argparse.Namespace) -> ShoalConfig:
    """The engines' validated config; `ValueError` names the offending flag. Checks the
    server flags too (`server_config_from_args`), so one call validates the command line."""
    server_config_from_args(args)
    return ShoalConfig(
        model=ModelConfig(
            model=args.model,
            tokenizer=args.tokenizer,
            dtype=args.dtype,
            load_format=args.load_format,
            max_model_len=args.max_model_len,
            device=args.device,
            seed=args.seed,
            served_model_name=args.served_model_name,
            quantization=args.quantization,
        ),
        cache=CacheConfig(
            block_size=args.block_size,
            kv_cache_memory_bytes=args.kv_cache_memory_bytes,
            num_blocks=args.num_blocks,
            enable_prefix_caching=args.enable_prefix_caching,
            kv_cache_dtype=args.kv_cache_dtype,
        ),
        scheduler=SchedulerConfig(
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_num_seqs=args.max_num_seqs,
        ),
        parallel=ParallelConfig(
            data_parallel_size=args.data_parallel_size,
            api_server_count=args.api_server_count,
        ),
        log_stats_interval_s=(
            0.0 if getattr(args, "disable_log_stats", True) else envs.ENVS.log_stats_interval_s
        ),
    )


def server_config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The launcher's and API servers' validated config; `ValueError` names the flag."""
    return ServerConfig(
        model=args.model,
        tokenizer=args.tokenizer,
        served_model_name=args.served_model_name,
        host=args.host,
        port=args.port,
        api_server_count=args.api_server_count,
        data_parallel_size=args.data_parallel_size,
        shutdown_timeout_s=args.shutdown_timeout,
        engine_ready_timeout_s=args.engine_ready_timeout,
        engine_stall_timeout_s=args.engine_stall_timeout,
        restart_dead_engines=args.restart_dead_engines,
        api_key=args.api_key,
        max_num_queued_requests=args.max_num_queued_requests,
        max_request_body_bytes=args.max_request_body_bytes,
        stream_interval=args.stream_interval,
        uvicorn_log_level=args.uvicorn_log_level,
        **_frontend_fields(args),
        enable_auto_tool_choice=getattr(args, "enable_auto_tool_choice", False),
        tool_call_parser=getattr(args, "tool_call_parser", None),
        scale_out=ScaleOutConfig(
            data_parallel_backend=args.data_parallel_backend,
            data_parallel_size_local=args.data_parallel_size_local,
            data_parallel_start_rank=args.data_parallel_start_rank,
            data_parallel_address=args.data_parallel_address,
            data_parallel_rpc_port=args.data_parallel_rpc_port,
            headless=args.headless,
            ray_address=args.ray_address,
            ray_placement_strategy=args.ray_placement_strategy,
            ray_cpus_per_engine=args.ray_cpus_per_engine,
            ray_gpus_per_engine=args.ray_gpus_per_engine,
        ),
    )
