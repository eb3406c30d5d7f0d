"""Scale-out pieces on plain objects: the headless wire messages round-trip, the flags map to
`ScaleOutConfig` and refuse bad values naming the flag, the seed facade resolves
`CoreEngineActorManager`, and `LinkWatch` names an engine whose link drops."""

from __future__ import annotations

import time

import msgspec
import pytest

import shoal.utils
from shoal.config import ScaleOutConfig
from shoal.engine.liveness import LinkWatch, join_link
from shoal.entrypoints.serve_args import make_serve_parser, server_config_from_args
from shoal.protocol import (
    EngineReady,
    HeadlessHello,
    HeadlessNotice,
    HeadlessWelcome,
    decoder,
    encode,
)


@pytest.mark.parametrize(
    "message",
    [
        HeadlessHello(2, 2, 4, "host-b"),
        HeadlessWelcome(["tcp://10.0.0.1:4000"], ["tcp://10.0.0.1:4001"], "tcp://10.0.0.1:4002"),
        HeadlessWelcome([], [], error="refused"),
        HeadlessNotice("ready", engines=[EngineReady(3, 256, 64, 16, "m", 100, 64)]),
        HeadlessNotice("dead", "EngineCore_3 died"),
        HeadlessNotice("stop"),
    ],
)
def test_headless_messages_round_trip(message: msgspec.Struct) -> None:
    assert decoder(type(message)).decode(encode(message)) == message


def test_flags_build_the_scale_out_config() -> None:
    args = make_serve_parser().parse_args(
        [
            "--data-parallel-size", "4", "--data-parallel-backend", "ray",
            "--ray-address", "10.0.0.1:6379", "--ray-placement-strategy", "SPREAD",
            "--ray-cpus-per-engine", "2", "--ray-gpus-per-engine", "1",
        ]
    )  # fmt: skip
    scale_out = server_config_from_args(args).scale_out
    assert scale_out == ScaleOutConfig(
        data_parallel_backend="ray",
        ray_address="10.0.0.1:6379",
        ray_placement_strategy="SPREAD",
        ray_cpus_per_engine=2.0,
        ray_gpus_per_engine=1.0,
    )
    assert scale_out.local_engines(4) == 0  # every engine is an actor


@pytest.mark.parametrize(
    ("flags", "flag"),
    [
        (["--data-parallel-size-local", "-1"], "--data-parallel-size-local"),
        (
            ["--data-parallel-size", "2", "--data-parallel-size-local", "3"],
            "--data-parallel-start-rank",
        ),
        (["--headless", "--data-parallel-start-rank", "1"], "--data-parallel-start-rank"),
        (
            ["--data-parallel-start-rank", "1", "--data-parallel-size", "2"],
            "--data-parallel-start-rank",
        ),
        (["--data-parallel-rpc-port", "0"], "--data-parallel-rpc-port"),
        (["--ray-cpus-per-engine", "0"], "--ray-cpus-per-engine"),
        (["--headless", "--data-parallel-backend", "ray"], "--headless"),
    ],
)
def test_bad_scale_out_flags_name_the_flag(flags: list[str], flag: str) -> None:
    args = make_serve_parser().parse_args(flags)
    with pytest.raises(ValueError, match=f"^{flag}: "):
        server_config_from_args(args)


def test_the_facade_resolves_the_actor_manager() -> None:
    from shoal.engine.ray_engines import CoreEngineActorManager

    assert shoal.utils.CoreEngineActorManager is CoreEngineActorManager


def test_link_watch_names_an_engine_whose_link_drops() -> None:
    watch = LinkWatch("127.0.0.1")
    try:
        links = {k: join_link(watch.address, k) for k in (0, 1)}
        time.sleep(0.5)  # both said hello
        assert watch.take_dead() == {}
        ctx, sock = links.pop(1)
        sock.close(linger=0)
        ctx.term()
        deadline = time.monotonic() + 5
        dead: dict[int, str] = {}
        while not dead and time.monotonic() < deadline:
            dead = watch.take_dead()
            time.sleep(0.05)
        assert list(dead) == [1] and "link to the launcher dropped" in dead[1]
    finally:
        for ctx, sock in links.values():
            sock.close(linger=0)
            ctx.term()
        watch.close()


def _pair_with_secret(monkeypatch: pytest.MonkeyPatch, server: str | None, client: str | None):  # type: ignore[no-untyped-def]
    """A ROUTER bound on tcp under `server`'s secret, a DEALER connected under `client`'s; the
    DEALER sends one frame. Returns what the ROUTER got within 1.5 s (None: nothing)."""
    import zmq

    from shoal import envs
    from shoal.runtime.addresses import bind_zmq_socket, connect_zmq_socket

    ctx = zmq.Context()
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    try:
        monkeypatch.setenv("SHOAL_ENGINE_SECRET", server or "")
        envs.refresh()
        address = bind_zmq_socket(router, "tcp://127.0.0.1:0")
        monkeypatch.setenv("SHOAL_ENGINE_SECRET", client or "")
        envs.refresh()
        connect_zmq_socket(dealer, address)
        dealer.send(b"ADD")
        if router.poll(1500):
            return router.recv_multipart()[-1]
        return None
    finally:
        for sock in (router, dealer):
            sock.close(linger=0)
        ctx.term()
        monkeypatch.delenv("SHOAL_ENGINE_SECRET")
        envs.refresh()


def test_engine_secret_lets_only_holders_talk(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _pair_with_secret(monkeypatch, "s3cret", "s3cret") == b"ADD"
    assert _pair_with_secret(monkeypatch, "s3cret", "guess") is None
    assert _pair_with_secret(monkeypatch, "s3cret", None) is None  # a plain client
    assert _pair_with_secret(monkeypatch, None, None) == b"ADD"  # no secret: as before


def test_coordinator_over_tcp_with_the_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    """The DP coordinator of engines elsewhere binds tcp://host:0 (ports reported back) and,
    with the secret, takes loads and publishes DPStats over CURVE only."""
    import zmq

    from shoal import envs
    from shoal.engine.coordinator import DPCoordinator
    from shoal.protocol import DPStats, EngineLoad
    from shoal.runtime.addresses import connect_zmq_socket

    monkeypatch.setenv("SHOAL_ENGINE_SECRET", "coordinator-secret")
    envs.refresh()
    coordinator = DPCoordinator(2, "127.0.0.1", local_only=False)
    ctx = zmq.Context()
    push, sub = ctx.socket(zmq.PUSH), ctx.socket(zmq.SUB)
    try:
        assert coordinator.load_address.startswith("tcp://127.0.0.1:")
        assert not coordinator.load_address.endswith(":0")
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        connect_zmq_socket(sub, coordinator.stats_update_address)
        connect_zmq_socket(push, coordinator.load_address)
        time.sleep(0.5)  # the SUB joined
        push.send(encode(EngineLoad(1, 3, 2)))
        deadline = time.monotonic() + 10
        loads: list[tuple[int, int]] = []
        while loads != [(0, 0), (3, 2)] and time.monotonic() < deadline:
            if sub.poll(500):
                loads = [tuple(x) for x in decoder(DPStats).decode(sub.recv()).loads]
        assert loads == [(0, 0), (3, 2)]
    finally:
        push.close(linger=0)
        sub.close(linger=0)
        ctx.term()
        coordinator.shutdown()
        monkeypatch.delenv("SHOAL_ENGINE_SECRET")
        envs.refresh()
