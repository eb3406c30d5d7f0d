"""This process's connection to Ray for the engine actors: `connect_ray` (a cluster, or a private
local instance) and `RayConnection`, which disconnects and stops what it started."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import tempfile
from typing import Any

import psutil
import ray

from shoal.logger import init_logger

logger = init_logger(__name__)

# Local Ray instances' temp dirs: /tmp/shoal-ray-<launcher pid>-<random>.
_TEMP_PREFIX = "shoal-ray-"


class RayConnection:
    """This process's connection to Ray (`connect_ray`): the driver's node IP, and the
    private local instance it started, if any (stopped by `close`)."""

    def __init__(self, node_ip: str, temp_dir: str | None) -> None:
        self.node_ip = node_ip
        self.temp_dir = temp_dir

    def close(self) -> None:
        """Disconnect (and stop a local instance started by `connect_ray`). Idempotent."""
        with contextlib.suppress(Exception):
            ray.shutdown()
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            self.temp_dir = None


def connect_ray(address: str | None, timeout_s: float) -> RayConnection:
    """`ray.init` on the cluster at `address` (None: $RAY_ADDRESS, else a private local
    instance in a short temp dir, stopped by `RayConnection.close`). `RuntimeError` naming
    the address when no cluster answers."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict[str, Any] = {"namespace": "shoal", "logging_level": "WARNING"}
    temp_dir = None
    if address is None:
        # Ray's unix sockets live under its temp dir: keep the path short. The pid in the
        # name lets a later run remove the directory of a launcher that was killed.
        _sweep_stale_temp_dirs()
        temp_dir = tempfile.mkdtemp(prefix=f"{_TEMP_PREFIX}{os.getpid()}-", dir="/tmp")
        kwargs |= {"address": "local", "_temp_dir": temp_dir, "include_dashboard": False}
        logger.info("starting a local Ray instance (no --ray-address / RAY_ADDRESS)")
    else:
        _check_reachable(address, timeout_s)
        kwargs["address"] = address
    # ray.init installs its own SIGTERM handler (exit at once); the launcher's drains.
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        ray.init(**kwargs)
    except Exception as e:
        if temp_dir is not None:
            shutil.rmtree(temp_dir, ignore_errors=True)
        raise RuntimeError(
            f"cannot connect to the Ray cluster at {address}: {short_error(e)}"
        ) from e
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    connection = RayConnection(ray.util.get_node_ip_address(), temp_dir)
    logger.info("connected to Ray at %s", ray.get_runtime_context().gcs_address)
    return connection


def _sweep_stale_temp_dirs() -> None:
    """Remove the local-instance temp dirs of launchers that no longer run."""
    for entry in glob.glob(f"/tmp/{_TEMP_PREFIX}*-*"):
        pid = os.path.basename(entry)[len(_TEMP_PREFIX) :].split("-", 1)[0]
        if (
            pid.isdigit()
            and not psutil.pid_exists(int(pid))
            and os.stat(entry).st_uid == os.getuid()
        ):
            shutil.rmtree(entry, ignore_errors=True)


def short_error(error: BaseException) -> str:
    """Ray's error, first line (its messages carry long tracebacks)."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _check_reachable(address: str, timeout_s: float) -> None:
    """Fail fast (`RuntimeError`) when nothing listens at a `host:port` Ray address."""
    if address in ("auto", "local") or address.startswith("ray://"):
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), min(timeout_s, 10.0)).close()
    except OSError as e:
        raise RuntimeError(
            f"no Ray cluster at {address} (--ray-address / RAY_ADDRESS): {e.strerror or e}"
        ) from e
