"""The `shoal serve` argument parser and its mapping to the two configs (torch-free, fast):
`config_from_args` -> `ShoalConfig` (the engines), `server_config_from_args` -> `ServerConfig`
(the launcher and every API-server process, which receives it pickled). Defaults come from
the dataclass fields, so the flags never drift from the configs.
"""

from __future__ import annotations

import argparse

from shoal.config import (
    UVICORN_LOG_LEVELS,
    CacheConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    ServerConfig,
    ShoalConfig,
)
from shoal.entrypoints.engine_args import add_engine_args, add_model_args
from shoal.entrypoints.engine_args import config_default as _default

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
    )
