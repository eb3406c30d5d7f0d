"""`FrontEndLink`: a --headless host's link to the front end (the protocol: shoal.engine.headless)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable

import zmq
from zmq.utils.monitor import parse_monitor_message

from shoal.engine.headless import MONITOR_EVENTS, heartbeats
from shoal.engine.manager import READY_TIMEOUT_HINT
from shoal.logger import init_logger
from shoal.protocol import (
    HEADLESS_HELLO,
    HEADLESS_NOTICE,
    HEADLESS_WELCOME,
    EngineReady,
    HeadlessHello,
    HeadlessNotice,
    HeadlessWelcome,
    decoder,
    encode,
)
from shoal.runtime.addresses import connect_zmq_socket

logger = init_logger(__name__)

_POLL_MS = 100
# After the front end's connection drops: how long a "stop" it sent just before may take to
# reach this socket (a stopping front end sends it, then closes its port).
_STOP_GRACE_MS = 500
# A CURVE handshake that fails: the two sides' SHOAL_ENGINE_SECRET differ.
_HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)


class FrontEndLink:
    """A --headless host's link to the front end at `endpoint`: `join` (HELLO, wait for the
    WELCOME), `report_ready`, `report_dead`; `monitor_engine_liveness` returns when the front
    end says stop (`stop_requested`) or goes away (`failure_reason`)."""

    def __init__(self, endpoint: str, on_stop: Callable[[], None] | None = None) -> None:
        """`on_stop`: called (on the watch thread) when the front end says stop."""
        self.endpoint = endpoint
        self._on_stop = on_stop
        self.failed_proc_name: str | None = None
        self.failure_reason: str | None = None
        self.stop_requested = threading.Event()
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        heartbeats(self._sock)
        self._monitor = self._sock.get_monitor_socket(MONITOR_EVENTS | _HANDSHAKE_FAILED)
        self._lock = threading.Lock()  # the socket: joined() hands it to the watch thread
        connect_zmq_socket(self._sock, endpoint)
        self._connected = False
        self._handshake_failed = False

    def join(self, hello: HeadlessHello, timeout_s: float) -> HeadlessWelcome:
        """Send HELLO and wait for the WELCOME. `RuntimeError` when no front end answers
        within `timeout_s` (naming the address and the flags) or it refuses this host."""
        self._sock.send_multipart([HEADLESS_HELLO, encode(hello)])
        deadline = time.monotonic() + timeout_s
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        while (remaining := deadline - time.monotonic()) > 0:
            events = dict(poller.poll(int(min(remaining, 0.5) * 1000) + 1))
            if self._monitor in events:
                self._on_monitor_event()
            if self._sock in events:
                kind, payload = self._sock.recv_multipart()
                if kind == HEADLESS_WELCOME:
                    welcome = decoder(HeadlessWelcome).decode(payload)
                    if welcome.error:
                        raise RuntimeError(
                            f"the front end at {self.endpoint} refused this host: {welcome.error}"
                        )
                    return welcome
        state = "connected but did not answer" if self._connected else "unreachable"
        if self._handshake_failed:
            state = (
                "the connection's handshake failed: SHOAL_ENGINE_SECRET must be the same on "
                "both hosts, or unset on both"
            )
        raise RuntimeError(
            f"no shoal front end answered at {self.endpoint} within {timeout_s:.1f}s ({state}); "
            "check --data-parallel-address / --data-parallel-rpc-port, that the front end "
            f"runs, or {READY_TIMEOUT_HINT}"
        )

    def _on_monitor_event(self) -> None:
        event = parse_monitor_message(self._monitor.recv_multipart())
        if event["event"] == zmq.EVENT_CONNECTED:
            self._connected = True
        elif event["event"] == zmq.EVENT_DISCONNECTED:
            self._connected = False
        elif event["event"] & _HANDSHAKE_FAILED:
            self._handshake_failed = True

    def report_ready(self, engines: list[EngineReady]) -> None:
        with self._lock:
            self._sock.send_multipart(
                [HEADLESS_NOTICE, encode(HeadlessNotice("ready", engines=engines))]
            )

    def report_dead(self, reason: str) -> None:
        with self._lock, contextlib.suppress(zmq.ZMQError):
            self._sock.send_multipart([HEADLESS_NOTICE, encode(HeadlessNotice("dead", reason))])

    def monitor_engine_liveness(self) -> None:
        """Block until the front end sends stop (`stop_requested` set, no failure) or its
        connection drops (`failure_reason`)."""
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        while not self.stop_requested.is_set():
            with self._lock:  # report_dead may send from the main thread
                if self._watch_once(poller):
                    return
            time.sleep(0.01)

    def _watch_once(self, poller: zmq.Poller) -> bool:
        """One poll of the link; True once the watch is over (stop or front end gone)."""
        events = dict(poller.poll(_POLL_MS))
        # Messages first: a front end that stops sends "stop", then closes its port, so the
        # notice and the disconnect can arrive in the same poll.
        if self._sock in events and self._read_notices():
            return True
        if self._monitor in events:
            self._on_monitor_event()
            if not self._connected:
                # The stop notice may still be on its way through ZMQ's I/O thread.
                if self._sock.poll(_STOP_GRACE_MS, zmq.POLLIN) and self._read_notices():
                    return True
                self.failed_proc_name = "the front end"
                self.failure_reason = (
                    f"the front end at {self.endpoint} went away; stopping this host's engines"
                )
                return True
        return False

    def _read_notices(self) -> bool:
        """Read every message waiting on the link; True if one is the front end's stop."""
        while self._sock.poll(0, zmq.POLLIN):
            kind, payload = self._sock.recv_multipart()
            if kind == HEADLESS_NOTICE and decoder(HeadlessNotice).decode(payload).kind == "stop":
                logger.info("the front end asked this host to stop")
                self.stop_requested.set()
                if self._on_stop is not None:
                    self._on_stop()
                return True
        return False

    def close(self) -> None:
        with self._lock:
            self._sock.disable_monitor()
            self._monitor.close(linger=0)
            self._sock.close(linger=500)
            self._ctx.term()
