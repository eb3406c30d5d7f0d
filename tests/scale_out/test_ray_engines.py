"""`shoal serve --data-parallel-backend ray` on a real two-node Ray cluster (both nodes on this
machine): one engine actor per node, served through the official `openai` client; a killed
actor is named (or replaced with --restart-dead-engines); SIGTERM leaves no actor and no
placement group in the cluster, and no process behind."""

from __future__ import annotations

import json
import re
import signal
import time
from collections.abc import Callable, Iterator

import httpx
import openai
import psutil
import pytest

from tests.scale_out.ray_cluster import RayCluster, free_port
from tests.serving.conftest import TINY_FLAGS, ServeProcess, start_serve

RAY_FLAGS = ["--data-parallel-backend", "ray", "--data-parallel-size", "2"]
SPREAD = ["--ray-placement-strategy", "SPREAD"]
ACTOR_RE = re.compile(r"(EngineCore_\d) \(Ray actor (\w+), pid (\d+)\) on node (\w+) \(")
# Actors and placement groups of the cluster as the GCS sees them (no dashboard needed).
_STATE = """
actors = [(a["ActorClassName"], a["State"], a["Address"]["NodeID"], a["Pid"])
          for a in ray._private.state.actors().values()]
groups = [g["state"] for g in ray.util.placement_group_table().values()]
print(json.dumps({"actors": actors, "groups": groups}))
"""


@pytest.fixture
def serve_on(ray_cluster: RayCluster, tiny_model_dir: str) -> Iterator[Callable[..., ServeProcess]]:
    started: list[ServeProcess] = []

    def _start(*flags: str, wait_ready: bool = True, secret: str = "") -> ServeProcess:
        """`secret`: SHOAL_ENGINE_SECRET of the launcher (the actors get it from it)."""
        argv = [tiny_model_dir, *TINY_FLAGS, *RAY_FLAGS, "--ray-address", ray_cluster.address]
        env = {**ray_cluster.env, "SHOAL_ENGINE_SECRET": secret}
        server = start_serve([*argv, *flags], wait_ready=wait_ready, env=env)
        started.append(server)
        return server

    yield _start
    for server in started:
        if server.proc.poll() is None:
            server.stop(signal.SIGTERM, 60)
        server.kill_everything()
    _wait_cluster_empty(ray_cluster)


def _cluster_state(cluster: RayCluster) -> dict[str, list]:
    return dict(json.loads(cluster.query(_STATE).strip().splitlines()[-1]))


def _live_engine_actors(cluster: RayCluster) -> list[list]:
    actors = _cluster_state(cluster)["actors"]
    return [a for a in actors if a[0] == "EngineCoreActor" and a[1] != "DEAD"]


def _wait_cluster_empty(cluster: RayCluster, timeout_s: float = 30.0) -> dict[str, list]:
    """Until no engine actor is alive and every placement group is removed."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = _cluster_state(cluster)
        live = [a for a in state["actors"] if a[0] == "EngineCoreActor" and a[1] != "DEAD"]
        groups = [g for g in state["groups"] if g != "REMOVED"]
        if (not live and not groups) or time.monotonic() > deadline:
            return {"actors": live, "groups": groups}
        time.sleep(0.5)


def _actors_in_log(server: ServeProcess) -> dict[str, tuple[str, int, str]]:
    """engine name -> (actor id prefix, pid, node id prefix), from the launcher's READY lines."""
    found = {}
    for line in server.lines:
        if " ready: " in line and (m := ACTOR_RE.search(line)):
            found[m.group(1)] = (m.group(2), int(m.group(3)), m.group(4))
    return found


def _client(server: ServeProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def _model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def _engine_metric(url: str, name: str) -> dict[int, float]:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    pattern = re.compile(rf'^shoal:{name}{{[^}}]*engine="(\d+)"[^}}]*}} (\S+)$', re.M)
    totals: dict[int, float] = {}
    for k, v in pattern.findall(text):
        totals[int(k)] = totals.get(int(k), 0.0) + float(v)
    return totals


def test_one_engine_actor_per_node_serves_streams_aborts_and_leaves_nothing(
    ray_cluster: RayCluster, serve_on: Callable[..., ServeProcess]
) -> None:
    started = time.monotonic()
    server = serve_on(*SPREAD, secret="ray-test-secret")  # every engine socket on CURVE
    print(f"ready with 2 actors in {time.monotonic() - started:.1f} s")
    assert server.url is not None
    # One engine per node, as Ray placed them.
    actors = _live_engine_actors(ray_cluster)
    assert len(actors) == 2 and all(a[1] == "ALIVE" for a in actors), actors
    assert len({a[2] for a in actors}) == 2, actors
    in_log = _actors_in_log(server)
    assert sorted(in_log) == ["EngineCore_0", "EngineCore_1"]
    assert {pid for _, pid, _ in in_log.values()} == {a[3] for a in actors}

    client = _client(server)
    model = _model(client)
    for i in range(8):
        reply = client.completions.create(model=model, prompt=f"hello {i}", max_tokens=4)
        assert reply.choices[0].finish_reason == "length"
    chunks = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=8,
        stream=True,
    )
    pieces = [c.choices[0].delta.content for c in chunks if c.choices]
    assert len(pieces) >= 2
    finished = _engine_metric(server.url, "request_success_total")
    assert set(finished) == {0, 1} and min(finished.values()) >= 1, finished
    print(f"requests per engine: {finished}")

    # A client that goes away mid-stream: its request is aborted in its engine.
    body = {"model": model, "prompt": "long", "max_tokens": 200, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break
    deadline = time.monotonic() + 30
    while sum(_engine_metric(server.url, "num_requests_running").values()) > 0:
        assert time.monotonic() < deadline, "the aborted request is still running"
        time.sleep(0.2)
    reasons = httpx.get(f"{server.url}/metrics", timeout=30).text
    assert re.search(
        r'^shoal:request_success_total{[^}]*finished_reason="abort"[^}]*} [1-9]', reasons, re.M
    )

    assert server.stop(signal.SIGTERM, 60) == 0
    assert server.leftovers() == []
    assert _wait_cluster_empty(ray_cluster) == {"actors": [], "groups": []}


def test_a_killed_engine_actor_is_named_with_its_node(
    ray_cluster: RayCluster, serve_on: Callable[..., ServeProcess]
) -> None:
    server = serve_on()
    assert server.url is not None
    _, pid, node = _actors_in_log(server)["EngineCore_1"]
    model = _model(_client(server))
    streams = [threading_stream(server.url, model, i) for i in range(4)]
    time.sleep(0.5)
    killed = time.monotonic()
    psutil.Process(pid).kill()  # the actor's worker process, under load
    match = server.wait_for_log(r"ERROR .*Engine core EngineCore_1 \(Ray actor .*\) died", 30)
    print(f"killed actor named after {time.monotonic() - killed:.2f} s")
    assert f"pid {pid}) on node {node}" in match.group(0)
    assert server.wait(60) == 1
    for t in streams:
        t.join(60)
    assert server.leftovers() == []
    assert _wait_cluster_empty(ray_cluster) == {"actors": [], "groups": []}


def test_restart_dead_engines_replaces_a_killed_actor(
    ray_cluster: RayCluster, serve_on: Callable[..., ServeProcess]
) -> None:
    server = serve_on("--restart-dead-engines")
    assert server.url is not None
    _, pid, _ = _actors_in_log(server)["EngineCore_0"]
    psutil.Process(pid).kill()
    server.wait_for_log(r"EngineCore_0 .* died: .*; restarting it", 30)
    server.wait_for_log(r"EngineCore_0 .* is ready again after its restart", 120)
    client = _client(server)
    model = _model(client)
    deadline = time.monotonic() + 60
    served: dict[int, float] = {}
    while set(served) != {0, 1}:  # both engines answer again
        assert time.monotonic() < deadline, served
        client.completions.create(model=model, prompt="again", max_tokens=2)
        served = {k: v for k, v in _engine_metric(server.url, "request_success_total").items() if v}
    assert len(_live_engine_actors(ray_cluster)) == 2
    assert server.stop(signal.SIGTERM, 60) == 0
    assert server.leftovers() == []
    assert _wait_cluster_empty(ray_cluster) == {"actors": [], "groups": []}


def test_a_ray_address_with_no_cluster_is_one_clear_error(tiny_model_dir: str) -> None:
    address = f"127.0.0.1:{free_port()}"
    server = start_serve(
        [tiny_model_dir, *TINY_FLAGS, *RAY_FLAGS, "--ray-address", address], wait_ready=False
    )
    assert server.wait(60) == 1
    errors = [line for line in server.lines if " ERROR " in line]
    assert any(f"no Ray cluster at {address}" in line for line in errors), server.log
    assert "shoal is ready" not in server.log
    assert server.leftovers() == []


def test_without_ray_the_backend_fails_with_what_to_install(
    tiny_model_dir: str, tmp_path: pytest.TempPathFactory
) -> None:
    fake = tmp_path / "no_ray"  # type: ignore[operator]
    (fake / "ray").mkdir(parents=True)
    (fake / "ray" / "__init__.py").write_text("raise ImportError(\"No module named 'ray'\")\n")
    server = start_serve(
        [tiny_model_dir, *TINY_FLAGS, *RAY_FLAGS],
        wait_ready=False,
        env={"PYTHONPATH": str(fake)},
    )
    assert server.wait(60) == 1
    errors = [line for line in server.lines if " ERROR " in line]
    assert len(errors) == 1, server.log
    assert "pip install 'shoal[ray]'" in errors[0]
    assert server.leftovers() == []


def threading_stream(url: str, model: str, i: int):  # type: ignore[no-untyped-def]
    import threading

    def run() -> None:
        body = {
            "model": model,
            "prompt": f"s{i}",
            "max_tokens": 200,
            "ignore_eos": True,
            "stream": True,
        }
        try:
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
                for _ in r.iter_lines():
                    pass
        except httpx.HTTPError:
            pass

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_a_node_that_leaves_is_named(
    ray_cluster: RayCluster, serve_on: Callable[..., ServeProcess]
) -> None:
    """Last in the module: it kills the cluster's second node."""
    server = serve_on(*SPREAD)
    on_node2 = [
        (name, node)
        for name, (_, _, node) in _actors_in_log(server).items()
        if ray_cluster.node_id(1).startswith(node)
    ]
    assert len(on_node2) == 1, _actors_in_log(server)
    name, node = on_node2[0]
    killed = time.monotonic()
    ray_cluster.kill_node(1)
    match = server.wait_for_log(rf"ERROR .*Engine core {name} \(Ray actor .*\) died", 60)
    print(f"node death named after {time.monotonic() - killed:.2f} s")
    assert f"on node {node}" in match.group(0)
    assert server.wait(60) == 1
    assert server.leftovers() == []
