"""`RustFrontendProcessManager`: one native frontend subprocess on the inherited HTTP socket."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
from collections.abc import Mapping
from typing import Any

from shoal import envs
from shoal.logger import init_logger
from shoal.runtime.guard import popen_guard
from shoal.runtime.managers import ProcessManager
from shoal.runtime.procs import _SubprocessWrapper, run_on_stable_thread

logger = init_logger(__name__)

FRONTEND_PROCESS_NAME = "RustFrontend"
BINARY_NAME = "shoal-frontend"
# From the repository root. In frontend-rs/ itself, so that cargo reads its .cargo/config.toml
# (offline, Debian's crates): cargo finds config from the working directory, not from
# --manifest-path.
BUILD_COMMAND = "cd frontend-rs && cargo build --release"
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Where `cargo build --release` in the repository's workspace puts the binary.
WORKSPACE_BINARY = os.path.join(_REPO, "frontend-rs", "target", "release", BINARY_NAME)
# Flags that describe the Python-side topology, not the frontend: never forwarded.
EXCLUDED_ARGS = frozenset(
    {
        "api_server_count",
        "data_parallel_rank",
        "data_parallel_external_lb",
        "data_parallel_hybrid_lb",
    }
)
# Shown as "***" when the command line is logged.
SECRET_ARGS = frozenset({"api_key", "hf_token", "watermark_config"})


class RustFrontendProcessManager(ProcessManager):
    """Runs the native frontend binary in place of the Python API servers.

    Command line (every value a string):
    `<binary_path> frontend --listen-fd <fd> --input-address <in> --output-address <out>
    --engine-start-index <s> --engine-count <c> --data-parallel-size <n>
    [--coordinator-address <stats_update_address>] --args-json <json>`.
    The listening socket's fd is the only one passed (`pass_fds`); the binary binds the two
    ZMQ addresses itself (so give it concrete ports or IPC paths, not `tcp://h:0`). It runs
    in its own process group. `--args-json` is `frontend_args_json(args)`. `processes` is one
    `_SubprocessWrapper` named `RustFrontend`; `shutdown(timeout)` stops it like any other
    child (the caller's timeout honoured) and unlinks IPC socket files of both addresses.
    `FileNotFoundError` unless `binary_path` is an executable file; `ValueError` for counts.
    The binary should exit on SIGTERM; it is started with PR_SET_PDEATHSIG (SIGKILL, Linux)
    armed, so it dies with the launcher even if it does not watch its parent.
    """

    def __init__(
        self,
        binary_path: str,
        sock: Any,
        args: Any,
        input_address: str,
        output_address: str,
        engine_start_index: int,
        engine_count: int,
        data_parallel_size: int,
        stats_update_address: str | None = None,
    ) -> None:
        super().__init__()
        if not (os.path.isfile(binary_path) and os.access(binary_path, os.X_OK)):
            raise FileNotFoundError(
                f"native frontend binary not found or not executable: "
                f"{binary_path!r} (SHOAL_RUST_FRONTEND_PATH)"
            )
        _check_non_negative("engine_start_index", engine_start_index)
        _check_non_negative("engine_count", engine_count, minimum=1)
        _check_non_negative("data_parallel_size", data_parallel_size, minimum=1)
        self.sock = sock
        self.args = args
        self.unlink_at_shutdown([input_address, output_address])
        fd = sock.fileno()
        cmd = frontend_command(
            binary_path,
            fd,
            args,
            input_address,
            output_address,
            engine_start_index,
            engine_count,
            data_parallel_size,
            stats_update_address,
        )
        logger.info("starting native frontend: %s", " ".join(_redacted(cmd)))
        # The binary should watch its parent, but the launcher does not rely on it: the
        # kernel kills it when the launcher dies (armed between fork and exec).
        preexec = popen_guard()
        with self.rollback_on_error():
            popen = run_on_stable_thread(
                lambda: subprocess.Popen(cmd, pass_fds=(fd,), process_group=0, preexec_fn=preexec)
            )
            self.processes.append(_SubprocessWrapper(popen, FRONTEND_PROCESS_NAME))


def frontend_command(
    binary_path: str,
    listen_fd: int,
    args: Any,
    input_address: str,
    output_address: str,
    engine_start_index: int,
    engine_count: int,
    data_parallel_size: int,
    stats_update_address: str | None = None,
) -> list[str]:
    """The frontend's argv (see `RustFrontendProcessManager`)."""
    cmd = [
        binary_path,
        "frontend",
        "--listen-fd",
        str(listen_fd),
        "--input-address",
        input_address,
        "--output-address",
        output_address,
        "--engine-start-index",
        str(engine_start_index),
        "--engine-count",
        str(engine_count),
        "--data-parallel-size",
        str(data_parallel_size),
    ]
    if stats_update_address is not None:
        cmd += ["--coordinator-address", stats_update_address]
    return cmd + ["--args-json", frontend_args_json(args)]


def frontend_args_json(args: Any) -> str:
    """`args` as the frontend's shared-runtime JSON object (sorted keys).

    Every JSON-serialisable field of `args` (an argparse Namespace, a mapping or a
    dataclass) except `EXCLUDED_ARGS`, None values and private names; `model_tag` defaults
    to `model`; plus `engine_ready_timeout_secs` and `http_timeout_keep_alive` from SHOAL_
    environment variables (the frontend cannot read shoal's environment defaults itself).
    """
    fields = _fields(args)
    payload: dict[str, Any] = {}
    for key, value in fields.items():
        if key in EXCLUDED_ARGS or key.startswith("_") or value is None:
            continue
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            continue
        payload[key] = value
    if "model_tag" not in payload and "model" in payload:
        payload["model_tag"] = payload["model"]
    payload.setdefault("engine_ready_timeout_secs", envs.ENVS.engine_ready_timeout_s)
    payload.setdefault("http_timeout_keep_alive", envs.ENVS.http_timeout_keep_alive_s)
    return json.dumps(payload, sort_keys=True)


def find_frontend_binary() -> str:
    """The native frontend binary's path: $SHOAL_RUST_FRONTEND_PATH, else the workspace's
    release build (frontend-rs/target/release/shoal-frontend), else `shoal-frontend` on
    PATH. `FileNotFoundError` naming what to build when none is an executable file (or when
    the variable names a path that is not one)."""
    configured = envs.ENVS.rust_frontend_path
    if configured:
        if _is_executable(configured):
            return os.path.abspath(configured)
        raise FileNotFoundError(
            f"--frontend rust: SHOAL_RUST_FRONTEND_PATH={configured!r} is not an executable "
            f"file; build it with `{BUILD_COMMAND}` (or scripts/bootstrap.sh)"
        )
    if _is_executable(WORKSPACE_BINARY):
        return WORKSPACE_BINARY
    on_path = shutil.which(BINARY_NAME)
    if on_path:
        return on_path
    raise FileNotFoundError(
        f"--frontend rust: the native frontend is not built (no {WORKSPACE_BINARY}, no "
        f"{BINARY_NAME} on PATH, SHOAL_RUST_FRONTEND_PATH unset); build it with "
        f"`{BUILD_COMMAND}` (or scripts/bootstrap.sh)"
    )


def native_frontend_args(server: Any) -> dict[str, Any]:
    """The launcher's `args` for the binary: every field of `server` (a `ServerConfig`) plus
    what the binary cannot work out itself (docs/native-frontend.md, "--args-json"): the
    resolved model and tokenizer paths, the served model name as the engines compute it,
    the READY deadline in effect, the log level and shoal's version. `FileNotFoundError`
    when the model (or --tokenizer) does not resolve."""
    import shoal
    from shoal.model_source import resolve_model

    model = resolve_model(server.model)
    tokenizer = resolve_model(server.tokenizer) if server.tokenizer else model
    return {
        **_fields(server),
        "model_path": model.path,
        "model_format": model.format,
        "tokenizer_path": tokenizer.path,
        "served_model_name": server.served_model_name or model.name,
        # The seed namespace's name of shutdown_timeout_s, which the binary may read.
        "shutdown_timeout": server.shutdown_timeout_s,
        "engine_ready_timeout_secs": server.ready_timeout_s,
        "logging_level": envs.ENVS.logging_level,
        "version": shoal.__version__,
    }


def _is_executable(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def _fields(args: Any) -> dict[str, Any]:
    if args is None:
        return {}
    if isinstance(args, Mapping):
        return dict(args)
    if dataclasses.is_dataclass(args) and not isinstance(args, type):
        return dataclasses.asdict(args)
    if hasattr(args, "__dict__"):
        return dict(vars(args))
    raise ValueError(f"args: expected a Namespace, mapping or dataclass, got {type(args).__name__}")


def _redacted(cmd: list[str]) -> list[str]:
    shown = list(cmd)
    if "--args-json" in shown:
        i = shown.index("--args-json") + 1
        payload = json.loads(shown[i])
        for key in SECRET_ARGS & payload.keys():
            payload[key] = "***"
        shown[i] = json.dumps(payload, sort_keys=True)
    return shown


def _check_non_negative(field: str, value: int, minimum: int = 0) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{field}: must be an integer >= {minimum}, got {value!r}")
