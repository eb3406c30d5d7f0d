"""A minimal stand-in for N API servers (ROUTER + PULL each) to drive real engine processes."""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
import uuid
from collections.abc import Iterator
from typing import Any

import zmq

from shoal.config import CacheConfig, ModelConfig, SchedulerConfig, ShoalConfig
from shoal.engine.manager import CoreEngineProcManager
from shoal.protocol import (
    ENGINE_CORE_DEAD,
    AbortRequest,
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
    EngineDead,
    EngineReady,
    RequestType,
    UtilityRequest,
    decode_engine_dead,
    decoder,
    encode,
    engine_identity,
)
from shoal.runtime.addresses import bind_zmq_socket, get_engine_client_zmq_addr, unlink_ipc_address
from shoal.sampling_params import SamplingParams

TIMEOUT_S = 60.0


def tiny_config(model_dir: str, **cache: Any) -> ShoalConfig:
    return ShoalConfig(
        model=ModelConfig(model=model_dir, load_format="dummy", max_model_len=256),
        cache=CacheConfig(block_size=16, num_blocks=cache.pop("num_blocks", 64), **cache),
        scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=256),
    )


def make_request(
    request_id: str, max_tokens: int = 5, client_index: int = 0, num_prompt_tokens: int = 8
) -> EngineCoreRequest:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    prompt = [(17 * i + 5) % 1000 + 10 for i in range(num_prompt_tokens)]
    return EngineCoreRequest(request_id, prompt, params, 2, time.time(), client_index)


class FakeApiServers:
    """`num_clients` ROUTER/PULL pairs bound on IPC addresses, like N API servers.

    `ipc_dir`: where the socket files go (default: this run's IPC directory). Fixtures that
    outlive one test pass their own, since the suite's leak check flags any socket file left
    in the run's directory after a test."""

    def __init__(self, num_clients: int = 1, ipc_dir: str | None = None) -> None:
        self.ctx = zmq.Context()
        self.routers: list[zmq.Socket] = []
        self.pulls: list[zmq.Socket] = []
        self.input_addresses: list[str] = []
        self.output_addresses: list[str] = []
        for _ in range(num_clients):
            router, pull = self.ctx.socket(zmq.ROUTER), self.ctx.socket(zmq.PULL)
            router.setsockopt(zmq.ROUTER_MANDATORY, 1)
            self.input_addresses.append(bind_zmq_socket(router, _address(ipc_dir)))
            self.output_addresses.append(bind_zmq_socket(pull, _address(ipc_dir)))
            self.routers.append(router)
            self.pulls.append(pull)
        self._outputs = decoder(EngineCoreOutputs)
        # Per client: engine identity -> the EngineReady it sent.
        self.ready_messages: list[dict[bytes, EngineReady]] = [{} for _ in range(num_clients)]

    def start_engines(
        self, config: ShoalConfig, num_engines: int = 1, **kw: Any
    ) -> CoreEngineProcManager:
        return CoreEngineProcManager(
            config, num_engines, self.input_addresses, self.output_addresses, **kw
        )

    def wait_ready(self, manager: CoreEngineProcManager, timeout_s: float = 120) -> None:
        """The launcher's handshake, then every engine's EngineReady on every ROUTER (only
        then can the ROUTER route to the engines: their connections are up)."""
        manager.wait_for_ready(timeout_s)
        for client in range(len(self.routers)):
            for _ in manager.processes:
                identity, message = self.recv_ready(client, timeout_s)
                self.ready_messages[client][identity] = message

    def recv_ready(self, client: int, timeout_s: float = TIMEOUT_S) -> tuple[bytes, EngineReady]:
        assert self.routers[client].poll(int(timeout_s * 1000)), "no EngineReady"
        identity, payload = self.routers[client].recv_multipart()
        return identity, decoder(EngineReady).decode(payload)

    def send_raw(self, engine: int, *frames: bytes, client: int = 0) -> None:
        self.routers[client].send_multipart([engine_identity(engine), *frames])

    def add(self, engine: int, request: EngineCoreRequest) -> None:
        self.send_raw(engine, RequestType.ADD.value, encode(request), client=request.client_index)

    def abort(self, engine: int, request_ids: list[str], client: int = 0) -> None:
        self.send_raw(
            engine, RequestType.ABORT.value, encode(AbortRequest(request_ids)), client=client
        )

    def utility(self, engine: int, call_id: int, method: str, client: int = 0) -> None:
        request = UtilityRequest(call_id, method, client)
        self.send_raw(engine, RequestType.UTILITY.value, encode(request), client=client)

    def recv(
        self, client: int, timeout_s: float = TIMEOUT_S
    ) -> EngineCoreOutputs | EngineDead | bytes:
        """The next message on `client`'s PULL: EngineCoreOutputs, or a dead notice
        (`EngineDead`; the bare ENGINE_CORE_DEAD of the old form as bytes)."""
        assert self.pulls[client].poll(int(timeout_s * 1000)), "no output from the engine"
        frame = self.pulls[client].recv()
        if frame.startswith(ENGINE_CORE_DEAD):
            return decode_engine_dead(frame) or frame
        return self._outputs.decode(frame)

    def collect(
        self, client: int, request_ids: set[str], first_only: bool = False
    ) -> dict[str, list[EngineCoreOutput]]:
        """Outputs per request until each of `request_ids` finished (or, with `first_only`,
        produced its first output)."""
        got: dict[str, list[EngineCoreOutput]] = {rid: [] for rid in request_ids}
        pending = set(request_ids)
        while pending:
            message = self.recv(client)
            assert isinstance(message, EngineCoreOutputs), message
            for output in message.outputs:
                got.setdefault(output.request_id, []).append(output)
                if output.finished or first_only:
                    pending.discard(output.request_id)
        return got

    def close(self) -> None:
        for sock in self.routers + self.pulls:
            sock.close(linger=0)
        self.ctx.term()
        for address in self.input_addresses + self.output_addresses:
            unlink_ipc_address(address)


def _address(ipc_dir: str | None) -> str:
    if ipc_dir is None:
        return get_engine_client_zmq_addr(True, "")
    return f"ipc://{os.path.join(ipc_dir, uuid.uuid4().hex[:12])}"


def tokens(outputs: list[EngineCoreOutput]) -> list[int]:
    return [t for o in outputs for t in o.new_token_ids]


@contextlib.contextmanager
def serving_engine(
    model_dir: str, num_clients: int
) -> Iterator[tuple[FakeApiServers, CoreEngineProcManager]]:
    """One real engine on the tiny model serving `num_clients` stand-in API servers over IPC
    sockets in a private directory; on exit it must have stopped with code 0 and left no
    socket file."""
    ipc_dir = tempfile.mkdtemp(prefix="shoal-engine-test-")
    servers = FakeApiServers(num_clients=num_clients, ipc_dir=ipc_dir)
    manager = servers.start_engines(tiny_config(model_dir))
    try:
        servers.wait_ready(manager)
        yield servers, manager
    finally:
        manager.shutdown(10)
        servers.close()
        leftovers = os.listdir(ipc_dir)
        os.rmdir(ipc_dir)
    assert manager.processes[0].exitcode == 0
    assert leftovers == []
