"""A real two-node Ray cluster on this machine, started and stopped by the tests.

Each node is `ray start --block` in its own session (process group) with its own short temp
dir, free ports and a small object store; `stop()` kills those process groups (never `ray
stop`, which would also stop other users' Ray) and waits until every process is gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import psutil

RAY = os.path.join(os.path.dirname(sys.executable), "ray")
# Ray's config for the tests (read by `ray start` from RAY_*). Its node health checks keep
# their defaults (a dead node is declared after ~15 s): a node death must be named sooner
# through shoal's own link to each engine.
_FAST_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    # No idle workers kept around after a driver (the launcher) leaves: the suite's leak
    # check would count them.
    "RAY_prestart_worker_first_driver": "0",
    "RAY_num_workers_soft_limit": "0",
    "RAY_idle_worker_killing_time_threshold_ms": "200",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RayCluster:
    """Head (1 CPU) + a second node (1 CPU, custom resource {"node2": 1})."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self._node_ids: dict[int, str] = {}
        self.temp_dirs: list[str] = []
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = {**os.environ, **_FAST_ENV}
        try:
            self._start_node(["--head", "--port", str(self.port), "--include-dashboard=false"])
            self._wait_nodes(1)
            self._start_node(["--address", self.address, "--resources", json.dumps({"node2": 1})])
            self._wait_nodes(2)
        except BaseException:
            self.stop()
            raise

    def _start_node(self, flags: list[str]) -> None:
        temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")
        self.temp_dirs.append(temp_dir)
        argv = [
            RAY, "start", "--block", *flags,
            "--node-ip-address", "127.0.0.1",
            "--temp-dir", temp_dir,
            "--num-cpus", "1",
            "--object-store-memory", str(80 * 1024 * 1024),
            "--ray-client-server-port", str(free_port()),
            "--dashboard-agent-listen-port", str(free_port()),
            "--dashboard-agent-grpc-port", str(free_port()),
            "--runtime-env-agent-port", str(free_port()),
            "--metrics-export-port", str(free_port()),
            "--min-worker-port", "0", "--max-worker-port", "0",
            "--disable-usage-stats",
        ]  # fmt: skip
        self.procs.append(
            subprocess.Popen(
                argv,
                env=self.env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        )

    def _wait_nodes(self, count: int, timeout_s: float = 90.0) -> None:
        script = (
            f"import ray; ray.init(address={self.address!r}, logging_level='ERROR');"
            "print(sum(n['Alive'] for n in ray.nodes()))"
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.procs):
                raise RuntimeError("a `ray start` exited early")
            out = subprocess.run(
                [sys.executable, "-c", script], env=self.env, capture_output=True, text=True,
                timeout=60,
            )  # fmt: skip
            if out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == [str(count)]:
                return
            time.sleep(1.0)
        raise RuntimeError(f"the Ray cluster did not reach {count} node(s)")

    def query(self, code: str) -> str:
        """Run `code` in a short-lived driver on the cluster (`ray` imported, connected);
        returns its stdout."""
        script = f"import ray, json\nray.init(address={self.address!r}, logging_level='ERROR')\n"
        out = subprocess.run(
            [sys.executable, "-c", script + code],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        return out.stdout

    def node_id(self, index: int) -> str:
        """The Ray node id of node `index` (0: the head), read from its raylet's log."""
        if index not in self._node_ids:
            code = (
                "print([n['NodeID'] for n in ray.nodes() if n['Alive'] and "
                "('node2' in n['Resources']) == %r][0])" % (index == 1)
            )
            self._node_ids[index] = self.query(code).strip().splitlines()[-1]
        return self._node_ids[index]

    def kill_node(self, index: int) -> None:
        """SIGKILL node `index`'s process group (its raylet and agents): the node leaves."""
        os.killpg(self.procs[index].pid, signal.SIGKILL)
        self.procs[index].wait(10)

    def pids(self) -> set[int]:
        """Every live process of the cluster (the nodes' process groups and descendants)."""
        found: set[int] = set()
        for proc in self.procs:
            with contextlib.suppress(psutil.Error):
                found |= {c.pid for c in psutil.Process(proc.pid).children(recursive=True)}
            found.add(proc.pid)
        for p in psutil.process_iter(["pid"]):
            with contextlib.suppress(psutil.Error, OSError):
                if os.getpgid(p.pid) in {q.pid for q in self.procs}:
                    found.add(p.pid)
        return found

    def stop(self) -> None:
        """Kill both nodes' process groups and everything they started; remove temp dirs."""
        victims = [psutil.Process(pid) for pid in self.pids() if psutil.pid_exists(pid)]
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        for victim in victims:
            with contextlib.suppress(psutil.Error):
                victim.kill()
        psutil.wait_procs(victims, timeout=15)
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        for temp_dir in self.temp_dirs:
            shutil.rmtree(temp_dir, ignore_errors=True)
