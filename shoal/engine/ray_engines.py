"""Engines as Ray actors, the launcher's side: `CoreEngineActorManager` (placement group,
actors, handshake, liveness, restarts, shutdown). The engine's side, `EngineCoreActor`, is in
shoal.engine.ray_actor (the same `EngineCoreProc` busy loop as a local engine process, in a
Ray worker on some node); the Ray connection in shoal.engine.ray_connection.

    launcher (Ray driver)                         EngineCoreActor k (bundle k of the group)
    placement group, M bundles {CPU, GPU}
    create actor k  --------------------------->  __init__: load the model (slow)
    connect.remote(EngineAddresses, link)  ---->  DEALERs + PUSHes over TCP, EngineReady to
                    <-------- EngineReady, node   every API server; joins the LinkWatch
    run.remote()  ------------------------------> the busy loop; its ref and the link are
                                                  the liveness
    shutdown.remote() / ray.kill  -------------->  drain, then gone

Importing this module imports Ray: `shoal.utils.CoreEngineActorManager` is missing without it.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any

import ray
from ray.util.placement_group import (
    PlacementGroup,
    placement_group,
    placement_group_table,
    remove_placement_group,
)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from shoal.config import ScaleOutConfig, ShoalConfig
from shoal.engine.core_proc import engine_proc_name
from shoal.engine.liveness import LinkWatch
from shoal.engine.manager import READY_TIMEOUT_HINT, send_engine_dead
from shoal.engine.ray_actor import EngineCoreActor
from shoal.engine.ray_connection import RayConnection, connect_ray, short_error
from shoal.envs import ENVS
from shoal.logger import init_logger
from shoal.protocol import EngineAddresses, EngineReady, decoder, encode, engine_dead_frame
from shoal.runtime.procs import SPAWN_CTX, ProcessLike

logger = init_logger(__name__)

# How often the liveness watch and the handshake look at the actors' refs.
_POLL_S = 0.1
# The actor's methods: run (the busy loop) and shutdown must be able to run at once.
_ACTOR_CONCURRENCY = 3


class _Engine:
    """The launcher's record of one actor."""

    def __init__(self, index: int, actor: Any) -> None:
        self.index = index
        self.name = engine_proc_name(index)
        self.actor = actor
        self.connect_ref: Any = None
        self.run_ref: Any = None
        self.node_id = ""
        self.node_ip = ""
        self.pid: int | None = None

    def where(self) -> str:
        node = f"node {self.node_id[:12]} ({self.node_ip})" if self.node_id else "its node"
        pid = f", pid {self.pid}" if self.pid else ""
        return f"{self.name} (Ray actor {self.actor._actor_id.hex()[:12]}{pid}) on {node}"


class CoreEngineActorManager:
    """Runs `num_engines` engines `EngineCore_<k>` as Ray actors, one placement-group bundle
    each (`ScaleOutConfig`: cluster, strategy, CPUs and GPUs per engine).

    The same interface as `CoreEngineProcManager` where the launcher needs it:
    `send_addresses`, `wait_for_ready`, `announce_dead`, `announce_failed_engines`,
    `restart(k)` / `recv_restart_ready(k)` and `shutdown(timeout)`; `processes` is empty,
    so `wait_for_completion_or_failure` watches the actors' run refs through
    `monitor_engine_liveness()` (then `failed_proc_name`, `failed_engine_index` and
    `failure_reason` name the engine and its node). `RuntimeError` when Ray cannot be
    reached or the bundles cannot be placed before the ready deadline.
    """

    def __init__(
        self,
        config: ShoalConfig,
        num_engines: int,
        scale_out: ScaleOutConfig,
        coordinator_address: str | None = None,
        *,
        drain_timeout_s: float = 0.0,
        ready_timeout_s: float | None = None,
        stall_exit_s: float | None = None,
        ray_connection: RayConnection | None = None,
        link_host: str | None = None,
    ) -> None:
        """`link_host`: where this launcher's `LinkWatch` binds, reachable from every node
        (default: this node's IP as Ray sees it)."""
        self.processes: list[ProcessLike] = []
        self.failed_proc_name: str | None = None
        self.failed_engine_index: int | None = None
        self.failure_reason: str | None = None
        self.engines_ready: list[EngineReady] = []
        self.ready_timeout_s = ready_timeout_s or ENVS.engine_ready_timeout_s
        self._deadline = time.monotonic() + self.ready_timeout_s
        self._config = config
        self._engine_args = (coordinator_address, drain_timeout_s, stall_exit_s)
        self._addresses = b""
        self._output_addresses: list[str] = []
        self._engines: list[_Engine] = []
        self._restart_pipes: dict[int, Connection] = {}
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._pg: PlacementGroup | None = None
        self._is_shut_down = False
        self.ray_connection = ray_connection
        self._link: LinkWatch | None = None
        try:
            if self.ray_connection is None:
                self.ray_connection = connect_ray(scale_out.ray_address, self.ready_timeout_s)
            self._link = LinkWatch(link_host or self.ray_connection.node_ip)
            self._pg = self._place(num_engines, scale_out, config.model.device)
            self._engines = [_Engine(k, self._create_actor(k)) for k in range(num_engines)]
        except BaseException:
            self.shutdown()
            raise
        logger.info("started %d engine actor(s)", num_engines)

    # -- start --------------------------------------------------------------------------------

    def _place(self, num_engines: int, scale_out: ScaleOutConfig, device: str) -> PlacementGroup:
        gpus = scale_out.ray_gpus_per_engine
        if gpus is None:
            gpus = 1.0 if device == "cuda" else 0.0
        bundle: dict[str, float] = {"CPU": scale_out.ray_cpus_per_engine}
        if gpus:
            bundle["GPU"] = gpus
        pg = placement_group(
            [dict(bundle) for _ in range(num_engines)],
            strategy=scale_out.ray_placement_strategy,
            name=f"shoal-engines-{os.getpid()}",
        )
        ready = pg.ready()
        done, _ = ray.wait([ready], timeout=max(self._deadline - time.monotonic(), 0.1))
        if not done:
            remove_placement_group(pg)
            raise RuntimeError(
                f"Ray could not place {num_engines} bundle(s) of {bundle} "
                f"({scale_out.ray_placement_strategy}) within {self.ready_timeout_s:.0f}s; "
                f"the cluster has {ray.available_resources()} free; lower "
                "--ray-cpus-per-engine / --ray-gpus-per-engine, add nodes, or "
                f"{READY_TIMEOUT_HINT}"
            )
        return pg

    def _create_actor(self, engine_index: int) -> Any:
        assert self._pg is not None
        bundle = self._pg.bundle_specs[engine_index]
        actor_class = ray.remote(EngineCoreActor).options(
            name=f"{engine_proc_name(engine_index)}-{os.getpid()}-{time.monotonic_ns()}",
            num_cpus=bundle.get("CPU", 0),
            num_gpus=bundle.get("GPU", 0),
            max_concurrency=_ACTOR_CONCURRENCY,
            max_restarts=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=self._pg, placement_group_bundle_index=engine_index
            ),
        )
        # The secret travels as an argument, over Ray's own (token-authenticated) channel.
        secret = ENVS.engine_secret
        return actor_class.remote(engine_index, self._config, *self._engine_args, secret)

    def send_addresses(self, input_addresses: list[str], output_addresses: list[str]) -> None:
        """Tell every actor where the API servers are; each connects once it has loaded."""
        if len(input_addresses) != len(output_addresses):
            raise ValueError("input and output address lists differ in length")
        self._output_addresses = list(output_addresses)
        self._addresses = encode(EngineAddresses(list(input_addresses), list(output_addresses)))
        for engine in self._engines:
            engine.connect_ref = self._connect(engine)

    def _connect(self, engine: _Engine) -> Any:
        assert self._link is not None
        return engine.actor.connect.remote(self._addresses, self._link.address)

    def wait_for_ready(
        self, timeout: float | None = None, watched: Sequence[ProcessLike] = ()
    ) -> list[EngineReady]:
        """Wait for every actor's EngineReady (deadline: `timeout`, default what is left of
        the ready timeout since construction), then start their busy loops. `RuntimeError`
        naming the engine and its node when an actor dies or is late, or a `watched`
        process (API server, coordinator) exits meanwhile."""
        deadline = self._deadline if timeout is None else time.monotonic() + timeout
        pending = {e.connect_ref: e for e in self._engines}
        readies: dict[int, EngineReady] = {}
        while pending:
            if time.monotonic() >= deadline:
                names = ", ".join(e.where() for e in pending.values())
                raise RuntimeError(
                    f"Timed out waiting for {names} to load the model and report READY; "
                    f"{READY_TIMEOUT_HINT}"
                )
            done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=_POLL_S)
            for ref in done:
                engine = pending.pop(ref)
                readies[engine.index] = self._receive_ready(engine, ref)
            exited = [p for p in watched if p.exitcode is not None]
            if exited:
                p = exited[0]
                raise RuntimeError(
                    f"{p.name} (pid {p.pid}) exited with code {p.exitcode} during start-up, "
                    "before every engine reported READY; see its log above"
                )
        for engine in self._engines:
            engine.run_ref = engine.actor.run.remote()
        self.engines_ready = [readies[k] for k in sorted(readies)]
        return self.engines_ready

    def _receive_ready(self, engine: _Engine, ref: Any) -> EngineReady:
        self._fill_node(engine)
        try:
            ready_bytes, engine.node_id, engine.node_ip, engine.pid = ray.get(ref)
        except ray.exceptions.RayError as e:
            raise RuntimeError(
                f"{engine.where()} failed during start-up: {short_error(e)}; see its log above"
            ) from e
        message: EngineReady = decoder(EngineReady).decode(ready_bytes)
        logger.info(
            "%s ready: %d KV blocks of %d tokens, max_model_len %d",
            engine.where(),
            message.num_blocks,
            message.block_size,
            message.max_model_len,
        )
        return message

    def _fill_node(self, engine: _Engine) -> None:
        """The node of the engine's bundle (for messages about an actor that never replied)."""
        if engine.node_id or self._pg is None:
            return
        with contextlib.suppress(Exception):
            node_id = placement_group_table(self._pg)["bundles_to_node_id"][engine.index]
            engine.node_id = node_id
            for node in ray.nodes():
                if node["NodeID"] == node_id:
                    engine.node_ip = node["NodeManagerAddress"]

    @property
    def actor_nodes(self) -> list[tuple[str, str, int | None]]:
        """(node id, node IP, pid) of every engine, by engine index."""
        return [(e.node_id, e.node_ip, e.pid) for e in self._engines]

    # -- liveness -----------------------------------------------------------------------------

    def monitor_engine_liveness(self) -> None:
        """Block until an engine's busy loop ends (the actor died, its node left, or it
        failed) or `shutdown()` runs. A failure sets `failed_engine_index`,
        `failed_proc_name` and `failure_reason` (engine, actor, node and Ray's reason)."""
        while not self._stopped.is_set():
            with self._lock:
                refs = {e.run_ref: e for e in self._engines if e.run_ref is not None}
            if not refs:
                self._stopped.wait(_POLL_S)
                continue
            done, _ = ray.wait(list(refs), num_returns=1, timeout=_POLL_S)
            if self._stopped.is_set():
                return
            if done:
                engine = refs[done[0]]
                try:
                    ray.get(done[0])
                    why = "its busy loop returned without a shutdown request"
                except ray.exceptions.RayError as e:
                    why = short_error(e)
            elif (dropped := self._dropped_link(refs)) is not None:
                engine, why = dropped
            else:
                continue
            with self._lock:
                engine.run_ref = None
                self.failed_engine_index = engine.index
                self.failed_proc_name = engine.where()
                self.failure_reason = f"Engine core {engine.where()} died: {why}"
            return

    def _dropped_link(self, refs: dict[Any, _Engine]) -> tuple[_Engine, str] | None:
        """A serving engine whose link to the launcher dropped (sooner than Ray says)."""
        dead = self._link.take_dead() if self._link is not None else {}
        serving = {e.index: e for e in refs.values()}
        for k, why in dead.items():
            if k in serving:
                return serving[k], why
        return None

    def clear_failure(self) -> None:
        """Forget the last failure (before watching again after a restart)."""
        with self._lock:
            self.failed_engine_index = self.failed_proc_name = self.failure_reason = None

    def announce_dead(self, engine_index: int, reason: str) -> None:
        """Send engine `engine_index`'s dead notice to every API server."""
        if self._output_addresses:
            send_engine_dead(self._output_addresses, engine_dead_frame(engine_index, reason))

    def announce_failed_engines(self) -> list[str]:
        """The dead notice of the engine the liveness watch found dead (a killed actor says
        nothing itself); returns its name."""
        k = self.failed_engine_index
        if k is None:
            return []
        self.announce_dead(k, self.failure_reason or f"{engine_proc_name(k)} died")
        return [engine_proc_name(k)]

    # -- restarts (--restart-dead-engines) ----------------------------------------------------

    def restart(self, engine_index: int) -> Connection:
        """Replace engine `engine_index` with a new actor in the same bundle; returns a pipe
        that turns readable once it reported READY (`recv_restart_ready`) or failed."""
        old = self._engines[engine_index]
        with contextlib.suppress(Exception):
            ray.kill(old.actor, no_restart=True)
        if self._link is not None:
            self._link.forget(engine_index)
        engine = _Engine(engine_index, self._create_actor(engine_index))
        engine.connect_ref = self._connect(engine)
        with self._lock:
            self._engines[engine_index] = engine
        recv_end, send_end = SPAWN_CTX.Pipe(duplex=False)
        self._restart_pipes[engine_index] = recv_end
        threading.Thread(
            target=_forward_ready, args=(engine.connect_ref, send_end), daemon=True
        ).start()
        logger.info("restarted %s as a new Ray actor", engine.name)
        return recv_end

    def recv_restart_ready(self, engine_index: int) -> EngineReady:
        """The READY of restarted engine `engine_index` (its pipe is readable); starts its
        busy loop. `RuntimeError` naming the engine and node when it failed instead."""
        pipe = self._restart_pipes.pop(engine_index)
        engine = self._engines[engine_index]
        try:
            pipe.recv_bytes()
        except (EOFError, OSError):
            pass
        finally:
            pipe.close()
        message = self._receive_ready(engine, engine.connect_ref)
        with self._lock:
            engine.run_ref = engine.actor.run.remote()
        logger.info("%s is ready again after its restart", engine.where())
        return message

    def engine_name(self, engine_index: int) -> str:
        return self._engines[engine_index].where()

    # -- shutdown -----------------------------------------------------------------------------

    def shutdown(self, timeout: float | None = None) -> None:
        """Let the busy loops drain (until `timeout`, default 5 s), kill every actor, remove
        the placement group, disconnect from Ray (stopping the local instance if this
        manager started one). Idempotent."""
        if self._is_shut_down:
            return
        self._is_shut_down = True
        self._stopped.set()
        deadline = time.monotonic() + (5.0 if timeout is None else timeout)
        try:
            if ray.is_initialized():
                self._stop_actors(deadline)
        finally:
            if self._link is not None:
                self._link.close()
            for pipe in self._restart_pipes.values():
                pipe.close()
            self._restart_pipes.clear()
            if self.ray_connection is not None:
                self.ray_connection.close()
            logger.info("engine actors stopped")

    def _stop_actors(self, deadline: float) -> None:
        running = [e.run_ref for e in self._engines if e.run_ref is not None]
        for engine in self._engines:
            with contextlib.suppress(Exception):
                engine.actor.shutdown.remote()
        if running:
            with contextlib.suppress(Exception):
                ray.wait(
                    running,
                    num_returns=len(running),
                    timeout=max(deadline - time.monotonic(), 0.0),
                )
        for engine in self._engines:
            with contextlib.suppress(Exception):
                ray.kill(engine.actor, no_restart=True)
        if self._pg is not None:
            with contextlib.suppress(Exception):
                remove_placement_group(self._pg)


def _forward_ready(ref: Any, send_end: Connection) -> None:
    """Wait for a restarted actor's connect ref, then close `send_end` (readable either way)."""
    with contextlib.suppress(Exception):
        ray.wait([ref], timeout=None)
    send_end.close()


__all__ = ["CoreEngineActorManager", "EngineCoreActor", "RayConnection", "connect_ray"]
