"""Every environment variable shoal reads, typed, read once (prefix SHOAL_)."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Any


def _bool(name: str, default: bool = False) -> bool:
    raw = os.environ.get(name)
    if raw is None:
        return default
    return raw.strip().lower() in ("1", "true", "yes", "on")


def _number(name: str, default: float, kind: type = float, what: str = "a number") -> Any:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return kind(raw)
    except ValueError as e:
        raise ValueError(f"environment variable {name}={raw!r} is not {what}") from e


def _int(name: str, default: int) -> int:
    return int(_number(name, default, int, "an integer"))


def _float(name: str, default: float) -> float:
    return float(_number(name, default))


def _native_isa() -> str:
    raw = (os.environ.get("SHOAL_NATIVE_ISA") or "auto").strip().lower()
    # SHOAL_NATIVE_MARCH (the -march of the run-time builds this replaced): x86-64-v3 meant
    # the AVX2 level.
    if raw == "auto" and os.environ.get("SHOAL_NATIVE_MARCH", "").strip() == "x86-64-v3":
        return "avx2"
    return raw


@dataclass(frozen=True)
class Envs:
    # Deadline for engines' READY handshake and for API servers to report bound addresses.
    engine_ready_timeout_s: float
    # Parent directory of the private per-run IPC directory (mode 0700).
    rpc_base_path: str
    logging_level: str
    # Usage stats (report_usage_stats): off with either variable set.
    no_usage_stats: bool
    do_not_track: bool
    config_root: str
    usage_stats_server: str | None
    # Path of the native frontend binary ("" = frontend-rs/target/release, else PATH).
    rust_frontend_path: str
    # HTTP keep-alive seconds for API servers.
    http_timeout_keep_alive_s: float
    # --restart-dead-engines: one engine is restarted at most this many times within the
    # window; one more death ends the run.
    max_engine_restarts: int
    engine_restart_window_s: float
    # Development-only HTTP routes (GET /debug/kv_cache); never set it in production.
    server_dev_mode: bool
    # Native CPU kernels (shoal/native): off with SHOAL_NATIVE=0 (int8 then unavailable,
    # attention on torch ops); SHOAL_NATIVE_ATTENTION=0 keeps them for int8 but not for
    # decode attention (A/B runs); SHOAL_NATIVE_LM_HEAD=0 likewise for the greedy LM head
    # (argmax without logits). SHOAL_NATIVE_ISA picks the compiled level: "auto" (the best
    # this CPU runs), "avx2", "avx512" or "avx512bf16" (shoal/native/variants.py), e.g. avx2
    # to measure what an AVX2-only host runs.
    native: bool
    native_attention: bool
    native_lm_head: bool
    native_isa: str
    # CPU weights and KV cache in 2 MB pages (shoal/worker/huge_pages.py); off with
    # SHOAL_HUGE_PAGES=0 (A/B runs).
    huge_pages: bool
    # Seconds between the engines' stats lines under `shoal serve` (vLLM's
    # VLLM_LOG_STATS_INTERVAL); --disable-log-stats turns them off.
    log_stats_interval_s: float = 10.0
    # Shared secret of the engine sockets that cross hosts (tcp://): with it, each speaks
    # ZMQ CURVE under keys derived from it (shoal.runtime.addresses; docs/scale-out.md).
    engine_secret: str | None = None


def _read() -> Envs:
    config_home = os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")
    return Envs(
        engine_ready_timeout_s=_float("SHOAL_ENGINE_READY_TIMEOUT_S", 600.0),
        rpc_base_path=os.environ.get("SHOAL_RPC_BASE_PATH") or tempfile.gettempdir(),
        logging_level=os.environ.get("SHOAL_LOGGING_LEVEL", "INFO").upper(),
        no_usage_stats=_bool("SHOAL_NO_USAGE_STATS"),
        do_not_track=_bool("DO_NOT_TRACK") or _bool("SHOAL_DO_NOT_TRACK"),
        config_root=os.environ.get("SHOAL_CONFIG_ROOT") or os.path.join(config_home, "shoal"),
        usage_stats_server=os.environ.get("SHOAL_USAGE_STATS_SERVER") or None,
        rust_frontend_path=os.environ.get("SHOAL_RUST_FRONTEND_PATH", ""),
        http_timeout_keep_alive_s=_float("SHOAL_HTTP_TIMEOUT_KEEP_ALIVE", 5.0),
        max_engine_restarts=_int("SHOAL_MAX_ENGINE_RESTARTS", 3),
        engine_restart_window_s=_float("SHOAL_ENGINE_RESTART_WINDOW_S", 600.0),
        server_dev_mode=_bool("SHOAL_SERVER_DEV_MODE"),
        native=_bool("SHOAL_NATIVE", True),
        native_attention=_bool("SHOAL_NATIVE_ATTENTION", True),
        native_lm_head=_bool("SHOAL_NATIVE_LM_HEAD", True),
        native_isa=_native_isa(),
        huge_pages=_bool("SHOAL_HUGE_PAGES", True),
        log_stats_interval_s=_float("SHOAL_LOG_STATS_INTERVAL_S", 10.0),
        engine_secret=os.environ.get("SHOAL_ENGINE_SECRET") or None,
    )


ENVS: Envs = _read()


def refresh() -> Envs:
    """Re-read the environment (tests and child processes that changed it call this)."""
    global ENVS
    ENVS = _read()
    return ENVS
