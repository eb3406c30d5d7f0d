"""The DP coordinator process: gathers every engine's queue lengths, publishes them (DPStats).

Engines PUSH `EngineLoad` to `load_address` (a PULL bound here); the coordinator PUBlishes one
`DPStats` frame on `stats_update_address` whenever the picture changes, and again every
`REPUBLISH_INTERVAL_S` while any engine has work, so an API server that subscribed late (a
PUB drops messages sent before a subscriber joins) converges within that interval. Used when
`--data-parallel-size` > 1.
"""

from __future__ import annotations

import signal
import time
from multiprocessing.connection import Connection
from types import FrameType

import msgspec
import zmq

from shoal.logger import init_logger
from shoal.protocol import DPStats, EngineLoad, decoder, encode
from shoal.runtime.addresses import bind_zmq_socket, get_engine_client_zmq_addr, unlink_ipc_address
from shoal.runtime.child import init_child_process
from shoal.runtime.managers import ProcessManager
from shoal.runtime.procs import SPAWN_CTX

logger = init_logger(__name__)

PROCESS_NAME = "DPCoordinator"
REPUBLISH_INTERVAL_S = 0.1
_POLL_MS = 50
# TCP mode: how long the constructor waits for the process to report its bound ports.
_ADDRESS_TIMEOUT_S = 60.0


class DPCoordinator(ProcessManager):
    """Starts the `DPCoordinator` process for `num_engines` engines (IPC addresses).

    `load_address`: where engines PUSH `EngineLoad`; `stats_update_address`: where API
    servers SUBscribe to `DPStats`. Both are bound by the child, so connecting before it is
    up is fine (ZMQ retries). `proc` is the process; `shutdown(timeout)` (from
    `ProcessManager`) stops it and removes the socket files.
    """

    def __init__(self, num_engines: int, host: str = "127.0.0.1", local_only: bool = True) -> None:
        """`local_only=False` (engines on other hosts): both sockets bind `tcp://host:0` and
        the constructor waits (`RuntimeError` after `_ADDRESS_TIMEOUT_S`) for the ports."""
        if num_engines < 1:
            raise ValueError(f"--data-parallel-size: must be at least 1, got {num_engines}")
        super().__init__()
        self.load_address = get_engine_client_zmq_addr(local_only, host)
        self.stats_update_address = get_engine_client_zmq_addr(local_only, host)
        self.unlink_at_shutdown([self.load_address, self.stats_update_address])
        recv_end, send_end = (None, None) if local_only else SPAWN_CTX.Pipe(duplex=False)
        with self.rollback_on_error():
            self.proc = self.spawn(
                run_dp_coordinator,
                PROCESS_NAME,
                (num_engines, self.load_address, self.stats_update_address, send_end),
                daemon=True,
            )
            if recv_end is not None and send_end is not None:
                send_end.close()
                self._read_bound_addresses(recv_end)

    def _read_bound_addresses(self, pipe: Connection) -> None:
        try:
            if not pipe.poll(_ADDRESS_TIMEOUT_S):
                raise RuntimeError(f"{PROCESS_NAME} did not bind its TCP ports in time")
            self.load_address, self.stats_update_address = pipe.recv_bytes().decode().split()
        except (EOFError, OSError) as e:
            raise RuntimeError(f"{PROCESS_NAME} exited before binding its TCP ports") from e
        finally:
            pipe.close()


class _LoadTable:
    """The latest `(waiting, running)` of every engine and when they were last published."""

    def __init__(self, num_engines: int) -> None:
        self.loads: list[tuple[int, int]] = [(0, 0)] * num_engines
        self._published: list[tuple[int, int]] | None = None
        self._published_at = 0.0

    def update(self, load: EngineLoad) -> None:
        if not 0 <= load.engine_index < len(self.loads):
            raise ValueError(f"engine_index {load.engine_index} out of range")
        self.loads[load.engine_index] = (load.num_waiting_reqs, load.num_running_reqs)

    def should_publish(self, now: float) -> bool:
        if self.loads != self._published:
            return True
        busy = any(w or r for w, r in self.loads)
        return busy and now - self._published_at >= REPUBLISH_INTERVAL_S

    def mark_published(self, now: float) -> None:
        self._published = list(self.loads)
        self._published_at = now


def run_dp_coordinator(
    num_engines: int,
    load_address: str,
    stats_update_address: str,
    address_pipe: Connection | None = None,
) -> None:
    """Entry point of the `DPCoordinator` process; returns (exit 0) on SIGTERM / SIGINT.
    `address_pipe`: where the bound endpoints go (`tcp://host:0` placeholders resolved)."""
    init_child_process(PROCESS_NAME)
    stop_requested = False

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)

    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pub = ctx.socket(zmq.PUB)
    try:
        load_address = bind_zmq_socket(pull, load_address)
        stats_update_address = bind_zmq_socket(pub, stats_update_address)
        if address_pipe is not None:
            address_pipe.send_bytes(f"{load_address} {stats_update_address}".encode())
            address_pipe.close()
        logger.info("DP coordinator up for %d engines", num_engines)
        table = _LoadTable(num_engines)
        load_decoder = decoder(EngineLoad)
        while not stop_requested:
            if pull.poll(_POLL_MS):
                _drain_loads(pull, load_decoder, table)
            now = time.monotonic()
            if table.should_publish(now):
                pub.send(encode(DPStats(loads=list(table.loads), timestamp=time.time())))
                table.mark_published(now)
    finally:
        pull.close(linger=0)
        pub.close(linger=0)
        ctx.term()
        for address in (load_address, stats_update_address):
            unlink_ipc_address(address)
        logger.info("DP coordinator stopped")


def _drain_loads(
    pull: zmq.Socket, load_decoder: msgspec.msgpack.Decoder, table: _LoadTable
) -> None:
    while True:
        try:
            frame = pull.recv(zmq.NOBLOCK)
        except zmq.Again:
            return
        try:
            table.update(load_decoder.decode(frame))
        except (msgspec.DecodeError, ValueError) as e:
            logger.warning("dropped a malformed EngineLoad frame (%d bytes): %s", len(frame), e)
