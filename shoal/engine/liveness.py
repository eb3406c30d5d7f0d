"""`LinkWatch`: a TCP link from each engine the launcher cannot watch as a local process (Ray
actors) to the launcher, so that an engine whose process or node vanishes is named within
moments, whatever Ray's own failure detection takes (its node health checks: seconds).

    launcher  ROUTER tcp://host:0 (bound here), ROUTER_MANDATORY, ZMTP heartbeats
    engine k  DEALER, identity engine_identity(k): connects, sends b"hi"; never reads

A connection that closes (the process died: its kernel closes the socket) or goes silent past
the heartbeat timeout (the node is gone) raises a disconnect event; the thread then probes
every engine that joined: a send to one whose connection is gone fails at once
(EHOSTUNREACH), and that engine is reported dead.
"""

from __future__ import annotations

import errno
import threading
import time

import zmq
from zmq.utils.monitor import parse_monitor_message

from shoal.logger import init_logger
from shoal.protocol import engine_identity
from shoal.runtime.addresses import bind_zmq_socket, connect_zmq_socket, get_tcp_uri

logger = init_logger(__name__)

_HELLO = b"hi"
_PING = b"ping"
_POLL_MS = 100
_HEARTBEAT_IVL_MS = 1000
_HEARTBEAT_TIMEOUT_MS = 3000
# After a disconnect event, how long the engines are probed (the pipe may go a little later).
_PROBE_S = 2.0


def _heartbeats(sock: zmq.Socket) -> None:
    sock.setsockopt(zmq.HEARTBEAT_IVL, _HEARTBEAT_IVL_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, _HEARTBEAT_TIMEOUT_MS)
    sock.setsockopt(zmq.LINGER, 0)


class LinkWatch:
    """The launcher's end: binds on `host` (port chosen by the kernel: `address`); reports
    every joined engine whose link dropped (`take_dead`)."""

    def __init__(self, host: str) -> None:
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a replacement reuses the identity
        _heartbeats(self._sock)
        self._monitor = self._sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.address = bind_zmq_socket(self._sock, get_tcp_uri(host, 0))
        self._lock = threading.Lock()
        self._joined: dict[bytes, int] = {}  # identity -> engine index
        self._dead: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="EngineLinkWatch", daemon=True)
        self._thread.start()

    def take_dead(self) -> dict[int, str]:
        """Engine index -> why, for every link that dropped since the last call."""
        with self._lock:
            dead, self._dead = self._dead, {}
        return dead

    def forget(self, engine_index: int) -> None:
        """Engine `engine_index` is being replaced: drop its old link's state."""
        with self._lock:
            self._dead.pop(engine_index, None)
            self._joined.pop(engine_identity(engine_index), None)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        probe_until = 0.0
        try:
            while not self._stop.is_set():
                events = dict(poller.poll(_POLL_MS))
                if self._monitor in events:
                    parse_monitor_message(self._monitor.recv_multipart())
                    probe_until = time.monotonic() + _PROBE_S
                if self._sock in events:
                    self._receive()
                if time.monotonic() < probe_until:
                    self._probe()
        except zmq.ZMQError as e:
            logger.error("engine link watch failed: %s", e)
        finally:
            self._sock.disable_monitor()
            self._monitor.close(linger=0)
            self._sock.close(linger=0)
            self._ctx.term()

    def _receive(self) -> None:
        while True:
            try:
                identity, payload = self._sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except ValueError:
                continue  # not [identity, payload]: ignore
            if payload == _HELLO and len(identity) == 2:
                with self._lock:
                    self._joined[identity] = int.from_bytes(identity, "little")

    def _probe(self) -> None:
        with self._lock:
            joined = list(self._joined.items())
        for identity, k in joined:
            try:
                self._sock.send_multipart([identity, _PING], zmq.NOBLOCK)
            except zmq.ZMQError as e:
                if e.errno not in (errno.EHOSTUNREACH, zmq.EAGAIN):
                    raise
                if e.errno == errno.EHOSTUNREACH:
                    with self._lock:
                        self._joined.pop(identity, None)
                        self._dead[k] = (
                            "its TCP link to the launcher dropped (process or node gone)"
                        )


def join_link(address: str, engine_index: int) -> tuple[zmq.Context, zmq.Socket]:
    """The engine's end: a DEALER connected to `address` that said hello. Keep both objects
    for the engine's lifetime (closing them looks like a death)."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, engine_identity(engine_index))
    sock.setsockopt(zmq.RCVHWM, 16)  # the launcher's probes are never read
    _heartbeats(sock)
    connect_zmq_socket(sock, address)
    sock.send(_HELLO)
    return ctx, sock
