"""--headless engines on another host, the hosts being two network namespaces joined by a veth
pair that the test makes (and removes): the front end in one, the headless engines in the
other; requests are served by both; a killed headless engine is named on the front end."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import psutil
import pytest

from tests.serving.conftest import TINY_FLAGS, ServeProcess

PORT = 29551


@dataclass
class Hosts:
    front: str  # namespace names
    engines: str
    front_ip: str
    engines_ip: str


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def hosts() -> Iterator[Hosts]:
    """Two namespaces "front" and "engines" (loopback up) with a veth pair between them,
    10.x.y.1 and 10.x.y.2/24; all removed at the end."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    tag = f"{os.getpid() % 100000}{random.randrange(100)}"
    front, engines = f"shoalfe{tag}", f"shoalhl{tag}"
    subnet = f"10.{random.randrange(100, 250)}.{random.randrange(1, 250)}"
    made: list[str] = []
    try:
        for ns in (front, engines):
            _ip("netns", "add", ns)
            made.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        veth_a, veth_b = f"sva{tag}"[:15], f"svb{tag}"[:15]
        _ip("link", "add", veth_a, "netns", front, "type", "veth", "peer", veth_b, "netns", engines)
        _ip("-n", front, "addr", "add", f"{subnet}.1/24", "dev", veth_a)
        _ip("-n", engines, "addr", "add", f"{subnet}.2/24", "dev", veth_b)
        _ip("-n", front, "link", "set", veth_a, "up")
        _ip("-n", engines, "link", "set", veth_b, "up")
        yield Hosts(front, engines, f"{subnet}.1", f"{subnet}.2")
    finally:
        for ns in made:  # deleting a namespace deletes its end of the veth pair, and the pair
            with contextlib.suppress(subprocess.CalledProcessError):
                _ip("netns", "del", ns)


class NsServe(ServeProcess):
    """`shoal serve` run inside network namespace `ns`."""

    def __init__(self, ns: str, argv: list[str], secret: str = "") -> None:  # noqa: D107
        self.argv = argv
        env = {**os.environ, "SHOAL_ENGINE_SECRET": secret}
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "shoal.entrypoints.cli", "serve",
             *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            env=env,
        )  # fmt: skip
        self.lines: list[str] = []
        self.url: str | None = None
        self._changed = threading.Condition()
        self._eof = False
        self.seen_pids: set[int] = {self.proc.pid}
        threading.Thread(target=self._read, name="serve-log", daemon=True).start()


def _in_ns(ns: str, code: str) -> str:
    """Run Python `code` inside namespace `ns` (the test's client lives on the front host)."""
    out = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


_CLIENT = """
import json, re, httpx, openai
url = {url!r}
client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
model = client.models.list().data[0].id
for i in range(8):
    assert client.completions.create(model=model, prompt=f"hi {{i}}", max_tokens=3).choices
pieces = [c.choices[0].text for c in client.completions.create(
    model=model, prompt="stream", max_tokens=6, stream=True) if c.choices]
text = httpx.get(url + "/metrics").text
done = {{}}
for k, v in re.findall(r'^shoal:request_success_total{{[^}}]*engine="(\\d+)"[^}}]*}} (\\S+)$',
                       text, re.M):
    done[k] = done.get(k, 0) + float(v)
print(json.dumps({{"pieces": len(pieces), "per_engine": done}}))
"""


def _front_flags(hosts: Hosts, local: int) -> list[str]:
    return [
        "--data-parallel-size", "2", "--data-parallel-size-local", str(local),
        "--data-parallel-address", hosts.front_ip, "--data-parallel-rpc-port", str(PORT),
        "--port", "0",
    ]  # fmt: skip


def _headless_flags(hosts: Hosts, local: int, start: int) -> list[str]:
    return [
        "--headless", "--data-parallel-size", "2", "--data-parallel-size-local", str(local),
        "--data-parallel-start-rank", str(start), "--data-parallel-address", hosts.front_ip,
        "--data-parallel-rpc-port", str(PORT),
    ]  # fmt: skip


@contextlib.contextmanager
def _pair(
    hosts: Hosts, model: str, front_local: int, start: int, secret: str = ""
) -> Iterator[tuple[NsServe, NsServe]]:
    """The front end and a headless host; `secret`: both hosts' SHOAL_ENGINE_SECRET."""
    front = NsServe(hosts.front, [model, *TINY_FLAGS, *_front_flags(hosts, front_local)], secret)
    engines = NsServe(
        hosts.engines,
        [model, *TINY_FLAGS, *_headless_flags(hosts, 2 - front_local, start)],
        secret,
    )
    try:
        yield front, engines
    finally:
        for server in (front, engines):
            if server.proc.poll() is None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    server.stop(signal.SIGTERM, 30)
            server.kill_everything()


def test_front_end_and_headless_host_serve_together_and_stop_together(
    hosts: Hosts, tiny_model_dir: str
) -> None:
    # Every socket between the hosts speaks CURVE under the shared secret.
    with _pair(hosts, tiny_model_dir, 1, 1, secret="netns-secret") as (front, engines):
        url = front.wait_ready()
        engines.wait_for_log("headless engines are ready", 60)
        engines.seen_pids |= {p.pid for p in engines.descendants()}
        joined = front.wait_for_log(r"headless host \S+ \((\S+), engine 1\) joined", 10)
        assert joined.group(1) == hosts.engines_ip  # it came over the veth pair
        result = json.loads(_in_ns(hosts.front, _CLIENT.format(url=url)).strip().splitlines()[-1])
        assert result["pieces"] >= 2
        per_engine = result["per_engine"]
        print(f"requests per engine: {per_engine}")
        assert set(per_engine) == {"0", "1"} and min(per_engine.values()) >= 1, per_engine
        assert front.stop(signal.SIGTERM, 60) == 0
        # The front end tells the headless host to stop.
        assert engines.wait(60) == 0, engines.log
        assert "the front end asked this host to stop" in engines.log
        assert front.leftovers() == [] and engines.leftovers() == []


def test_killed_headless_engines_are_named_on_the_front_end(
    hosts: Hosts, tiny_model_dir: str
) -> None:
    # The front end runs no engine itself: both come from the headless host.
    with _pair(hosts, tiny_model_dir, front_local=0, start=0) as (front, engines):
        front.wait_ready()
        engines.wait_for_log("headless engines are ready", 60)
        engines.seen_pids |= {p.pid for p in engines.descendants()}
        victim = engines.child_named("EngineCore_1")
        victim.kill()
        match = front.wait_for_log(r"ERROR .*headless host .*failed: .*EngineCore_1.*", 30)
        assert hosts.engines_ip in match.group(0) and "engines 0..1" in match.group(0)
        assert front.wait(60) == 1
        assert engines.wait(60) == 1
        assert front.leftovers() == [] and engines.leftovers() == []
        assert not psutil.pid_exists(victim.pid) or victim.status() == psutil.STATUS_ZOMBIE


def test_a_headless_host_that_dies_is_named_on_the_front_end(
    hosts: Hosts, tiny_model_dir: str
) -> None:
    with _pair(hosts, tiny_model_dir, front_local=1, start=1) as (front, engines):
        front.wait_ready()
        engines.wait_for_log("headless engines are ready", 60)
        engines.seen_pids |= {p.pid for p in engines.descendants()}
        engines.proc.kill()  # the whole host goes: its engines die with their launcher
        match = front.wait_for_log(r"ERROR .*headless host .* disconnected", 30)
        assert f"({hosts.engines_ip}, engine 1)" in match.group(0)
        assert front.wait(60) == 1
        assert front.leftovers() == [] and engines.leftovers() == []
