"""`--data-parallel-backend ray` with no cluster named: the launcher starts a private local Ray
instance and stops it on exit, leaving no Ray process (the suite's leak check) and no temp
dir."""

from __future__ import annotations

import contextlib
import glob
import os
import signal
import time

import httpx
import psutil

from shoal.runtime.sweeper import MARKER_ENV
from tests.serving.conftest import TINY_FLAGS, start_serve


def test_a_local_ray_instance_is_started_and_stopped(tiny_model_dir: str) -> None:
    before = set(glob.glob("/tmp/shoal-ray-*"))
    server = start_serve(
        [
            tiny_model_dir,
            *TINY_FLAGS,
            "--data-parallel-backend",
            "ray",
            "--data-parallel-size",
            "2",
        ],
        env={"RAY_ADDRESS": "", "RAY_USAGE_STATS_ENABLED": "0"},
    )
    try:
        assert "starting a local Ray instance" in server.log
        model = httpx.get(f"{server.url}/v1/models", timeout=30).json()["data"][0]["id"]
        body = {"model": model, "prompt": "hi", "max_tokens": 3}
        reply = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
        assert reply.status_code == 200, reply.text
        assert server.stop(signal.SIGTERM, 60) == 0
        assert server.leftovers() == []
    finally:
        server.kill_everything()
    assert set(glob.glob("/tmp/shoal-ray-*")) <= before


def test_a_sigkilled_launcher_leaves_no_ray_process(tiny_model_dir: str) -> None:
    """Ray's local instance starts agents that PR_SET_PDEATHSIG does not reach; the launcher's
    sweeper (shoal.runtime.sweeper) kills them when the launcher dies, SIGKILL included."""
    server = start_serve(
        [tiny_model_dir, *TINY_FLAGS, "--data-parallel-backend", "ray"],
        env={"RAY_ADDRESS": "", "RAY_USAGE_STATS_ENABLED": "0"},
    )
    try:
        marker = _launcher_marker(server.proc.pid)
        marked = _processes_with(marker)
        # The API server and Ray's own processes (GCS, raylet, agents, the engine actor's
        # worker); the launcher and its sweeper show the environment they started with.
        assert len(marked) >= 5, marked
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait(10)
        deadline = time.monotonic() + 15
        while _processes_with(marker) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _processes_with(marker) == []
    finally:
        server.kill_everything()


def _launcher_marker(pid: int) -> str:
    """The marker the launcher passed its children (its own /proc environ is the one it was
    started with, before it set the marker)."""
    for child in psutil.Process(pid).children():
        with contextlib.suppress(psutil.Error):
            value = child.environ().get(MARKER_ENV)
            if value:
                return f"{MARKER_ENV}={value}"
    raise AssertionError(f"no child of the launcher has {MARKER_ENV} in its environment")


def _processes_with(marker: str) -> list[str]:
    found = []
    for proc in psutil.process_iter(["pid", "status"]):
        if proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        with contextlib.suppress(psutil.Error):
            if marker.partition("=")[2] == proc.environ().get(MARKER_ENV):
                found.append(f"{proc.pid} {' '.join(proc.cmdline())[:80]}")
    return found
