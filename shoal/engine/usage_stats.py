"""Opt-out, local-first usage record of a run's configuration (`report_usage_stats`).

One JSON line per engine start is appended to `<config root>/usage_stats.jsonl`. Nothing is
sent over the network unless `SHOAL_USAGE_STATS_SERVER` names a URL. Off with
`SHOAL_NO_USAGE_STATS=1`, `DO_NOT_TRACK=1` / `SHOAL_DO_NOT_TRACK=1`, or a `do_not_track` file
in the config root.
"""

from __future__ import annotations

import json
import os
import platform
import threading
import time
import uuid
from typing import Any

from shoal import envs
from shoal.config import ShoalConfig
from shoal.logger import init_logger

logger = init_logger(__name__)

USAGE_CONTEXTS = (
    "UNKNOWN_CONTEXT",
    "LLM_CLASS",
    "API_SERVER",
    "OPENAI_API_SERVER",
    "ENGINE_CONTEXT",
)
STATS_FILE = "usage_stats.jsonl"
_POST_TIMEOUT_S = 5.0


def is_usage_stats_enabled() -> bool:
    """False when any opt-out is set (environment read at call time, see module docstring)."""
    env = envs.ENVS
    if env.no_usage_stats or env.do_not_track:
        return False
    return not os.path.exists(os.path.join(env.config_root, "do_not_track"))


def usage_record(config: ShoalConfig, usage_context: str) -> dict[str, Any]:
    """The record written for this run: the configuration, never prompts or outputs."""
    model, cache, sched, par = config.model, config.cache, config.scheduler, config.parallel
    return {
        "uuid": uuid.uuid4().hex,
        "timestamp": time.time(),
        "usage_context": usage_context,
        "shoal_version": _version(),
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "num_cpus": os.cpu_count(),
        "model_format": _model_format(model.model),
        "dtype": model.dtype,
        "device": model.device,
        "load_format": model.load_format,
        "max_model_len": model.max_model_len,
        "block_size": cache.block_size,
        "num_blocks": cache.num_blocks,
        "kv_cache_memory_bytes": cache.kv_cache_memory_bytes,
        "enable_prefix_caching": cache.enable_prefix_caching,
        "max_num_seqs": sched.max_num_seqs,
        "max_num_batched_tokens": sched.max_num_batched_tokens,
        "enable_chunked_prefill": sched.enable_chunked_prefill,
        "data_parallel_size": par.data_parallel_size,
        "api_server_count": par.api_server_count,
    }


def report_usage_stats(config: ShoalConfig, usage_context: str = "ENGINE_CONTEXT") -> None:
    """Record this run's configuration (see module docstring). Never raises."""
    try:
        if not is_usage_stats_enabled():
            return
        if usage_context not in USAGE_CONTEXTS:
            usage_context = "UNKNOWN_CONTEXT"
        record = usage_record(config, usage_context)
        _append_local(record)
        server = envs.ENVS.usage_stats_server
        if server:
            # A daemon thread so a slow or unreachable server never delays engine start.
            threading.Thread(
                target=_post, args=(server, record), name="UsageStats", daemon=True
            ).start()
    except Exception as e:  # usage stats must never break serving
        logger.debug("usage stats not recorded: %s", e)


def _append_local(record: dict[str, Any]) -> None:
    root = envs.ENVS.config_root
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, STATS_FILE), "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def _post(url: str, record: dict[str, Any]) -> None:
    import urllib.request

    try:
        req = urllib.request.Request(
            url,
            data=json.dumps(record).encode(),
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=_POST_TIMEOUT_S):
            pass
    except Exception as e:
        logger.debug("usage stats not sent to %s: %s", url, e)


def _model_format(model: str | None) -> str:
    # The kind of model only: a local path may name a user or a project.
    if model is None:
        return "default"
    return "gguf" if model.endswith(".gguf") else "hf"


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("shoal")
    except Exception:
        return "unknown"
