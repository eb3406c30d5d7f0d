"""`EngineCoreActor`: engine k as a Ray actor, the engine's side of `CoreEngineActorManager`
(shoal.engine.ray_engines). It runs the same `EngineCoreProc` busy loop as a local engine
process; Ray's worker process is its process, Ray's log forwarding its log."""

from __future__ import annotations

import os
from typing import Any

import ray

from shoal import envs
from shoal.config import ShoalConfig
from shoal.engine.core_proc import engine_proc_name
from shoal.engine.liveness import join_link
from shoal.logger import init_logger
from shoal.protocol import EngineAddresses, decoder, encode

logger = init_logger(__name__)


class EngineCoreActor:
    """Engine `engine_index` in a Ray worker. Construction loads the model (or builds the
    runner), exactly as `run_engine_core` does before its handshake; then `connect`, `run`
    (returns after a drained shutdown, raises on a fatal error) and `shutdown`."""

    def __init__(
        self,
        engine_index: int,
        config: ShoalConfig,
        coordinator_address: str | None,
        drain_timeout_s: float,
        stall_exit_s: float | None,
        engine_secret: str | None = None,
    ) -> None:
        """`engine_secret`: the launcher's SHOAL_ENGINE_SECRET (the node's environment may
        not have it), set here before any socket is made."""
        from shoal.engine.core_proc import EngineCoreProc
        from shoal.logger import set_process_role

        set_process_role(engine_proc_name(engine_index))
        if engine_secret:
            os.environ["SHOAL_ENGINE_SECRET"] = engine_secret
            envs.refresh()
        self.proc = EngineCoreProc(
            config, engine_index, coordinator_address, drain_timeout_s, stall_exit_s
        )
        self.link: tuple[Any, Any] | None = None  # held open for the actor's lifetime

    def connect(self, addresses: bytes, link_address: str) -> tuple[bytes, str, str, int]:
        """Connect to the API servers (`EngineAddresses`, msgpack) and send them EngineReady;
        join the launcher's `LinkWatch` at `link_address`. Returns (EngineReady, msgpack;
        node id; node IP; pid)."""
        self.proc.connect(decoder(EngineAddresses).decode(addresses))
        self.link = join_link(link_address, self.proc.engine_index)
        context = ray.get_runtime_context()
        logger.info(
            "ready on node %s, serving %d API server(s)",
            context.get_node_id()[:12],
            self.proc.num_clients,
        )
        node_ip = ray.util.get_node_ip_address()
        return encode(self.proc.ready_message()), context.get_node_id(), node_ip, os.getpid()

    def run(self) -> None:
        """The engine-core busy loop until a drained shutdown; a fatal error sends the dead
        notice to every API server and fails this call (and the actor)."""
        try:
            self.proc.run_busy_loop()
        except BaseException:
            logger.exception("fatal error; telling the API servers this engine is dead")
            self.proc.close(dead=True)
            raise
        self.proc.close()
        logger.info("shut down")

    def shutdown(self) -> None:
        """Ask the busy loop to drain and return (the actor's SIGTERM)."""
        self.proc.shutdown_requested = True
