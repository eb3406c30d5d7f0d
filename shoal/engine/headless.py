"""Engines on other hosts over TCP (--headless), the front end's side: `HeadlessHosts` (binds
the handshake port, admits hosts, watches them). A host's side, `FrontEndLink` (joins,
reports, watches the front end), is in shoal.engine.headless_link.

    --headless host H (engines R..R+K-1)          front end (ROUTER on ADDRESS:RPC_PORT)
    DEALER connect  --- HELLO(R, K, M) -------->  checks M and the ranks
                    <-- WELCOME(addresses) ----   once its API servers have bound (TCP)
    start K engine processes, handshake them
                    --- NOTICE ready -------->    counts them in; serves all M
    an engine dies  --- NOTICE dead ---------->   RuntimeError naming H and its engines
                    <-- NOTICE stop -----------   front end shutting down: H stops too

The engines then talk to the API servers and the DP coordinator directly (their TCP
addresses). Both ends of this link use ZMTP heartbeats, so a host (or front end) that
vanishes without closing its connection is seen as disconnected within a few seconds.
"""

from __future__ import annotations

import errno
import queue
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import msgspec
import zmq
from zmq.utils.monitor import parse_monitor_message

from shoal.engine.core_proc import engine_proc_name
from shoal.engine.manager import READY_TIMEOUT_HINT, send_engine_dead
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
    engine_dead_frame,
)
from shoal.runtime.addresses import get_tcp_uri, secure_socket
from shoal.runtime.procs import ProcessLike

logger = init_logger(__name__)

_POLL_MS = 100
# ZMTP heartbeats on the link: a silent peer is dropped after HEARTBEAT_TIMEOUT_MS.
_HEARTBEAT_IVL_MS = 1000
_HEARTBEAT_TIMEOUT_MS = 5000
# After a disconnect event, how long the front end keeps probing which host it was.
_PROBE_S = 2.0
MONITOR_EVENTS = zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_ACCEPTED


def heartbeats(sock: zmq.Socket) -> None:
    """ZMTP heartbeats on a link socket: a silent peer is dropped after the timeout."""
    sock.setsockopt(zmq.HEARTBEAT_IVL, _HEARTBEAT_IVL_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, _HEARTBEAT_TIMEOUT_MS)
    sock.setsockopt(zmq.LINGER, 500)


def _ranks(start: int, count: int) -> str:
    return f"engine {start}" if count == 1 else f"engines {start}..{start + count - 1}"


@dataclass
class _Host:
    identity: bytes
    hello: HeadlessHello
    peer: str
    ready: list[EngineReady] = field(default_factory=list)
    welcomed: bool = False

    def describe(self) -> str:
        name = self.hello.hostname or "?"
        return (
            f"headless host {name} ({self.peer}, "
            f"{_ranks(self.hello.start_rank, self.hello.num_engines)})"
        )


class HeadlessHosts:
    """The front end's side: `remote_ranks` (the engines it does not run) must join from
    --headless hosts. Construction binds `tcp://address:port` (`RuntimeError` naming
    --data-parallel-rpc-port / --data-parallel-address when it cannot); `set_addresses`
    welcomes hosts; `wait_for_ready`; `monitor_engine_liveness` (then `failure_reason`);
    `announce_failed_engines`; `shutdown`."""

    def __init__(
        self, address: str, port: int, data_parallel_size: int, remote_ranks: Sequence[int]
    ) -> None:
        self.data_parallel_size = data_parallel_size
        self.remote_ranks = set(remote_ranks)
        self.endpoint = get_tcp_uri(address, port)
        self.failed_proc_name: str | None = None
        self.failure_reason: str | None = None
        self._failed_ranks: list[int] = []
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        heartbeats(self._sock)
        self._monitor = self._sock.get_monitor_socket(MONITOR_EVENTS)
        try:
            secure_socket(self._sock, self.endpoint, is_server=True)
            self._sock.bind(self.endpoint)
        except zmq.ZMQError as e:
            self._close_sockets()
            raise RuntimeError(_bind_error(e, address, port)) from e
        self._hosts: dict[bytes, _Host] = {}
        self._welcome: HeadlessWelcome | None = None
        self._commands: queue.Queue[tuple[str, object]] = queue.Queue()
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="HeadlessHosts", daemon=True)
        self._thread.start()
        logger.info(
            "waiting for --headless hosts to join at %s (%s)",
            self.endpoint,
            _ranks(min(self.remote_ranks), len(self.remote_ranks)) if self.remote_ranks else "",
        )

    def set_addresses(
        self, inputs: list[str], outputs: list[str], coordinator_address: str | None
    ) -> None:
        """Where the API servers and the coordinator listen (TCP): sent to every host."""
        self._commands.put(("welcome", HeadlessWelcome(inputs, outputs, coordinator_address)))

    def wait_for_ready(
        self, timeout: float, watched: Sequence[ProcessLike] = ()
    ) -> list[EngineReady]:
        """Wait until every remote engine reported READY through its host. `RuntimeError`
        naming the missing engines and the address they should join, or a failed host, or a
        `watched` process that exited."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                if self.failure_reason:
                    raise RuntimeError(self.failure_reason)
                missing = self.remote_ranks - {r.engine_index for r in self._all_ready()}
                if not missing:
                    return sorted(self._all_ready(), key=lambda r: r.engine_index)
                exited = [p for p in watched if p.exitcode is not None]
                if exited:
                    p = exited[0]
                    raise RuntimeError(
                        f"{p.name} (pid {p.pid}) exited with code {p.exitcode} during start-up"
                    )
                if time.monotonic() >= deadline:
                    raise RuntimeError(
                        f"Timed out after {timeout:.1f}s waiting for {_list(missing)} to join "
                        f"from a --headless host at {self.endpoint} and report READY; "
                        f"{READY_TIMEOUT_HINT}"
                    )
                self._changed.wait(0.2)

    def _all_ready(self) -> list[EngineReady]:
        return [r for host in self._hosts.values() for r in host.ready]

    def monitor_engine_liveness(self) -> None:
        """Block until a host fails (its engine died, it disconnected) or `shutdown()`."""
        with self._changed:
            while not self.failure_reason and not self._stop.is_set():
                self._changed.wait(0.5)

    def announce_failed_engines(self) -> list[str]:
        """Dead notices for the engines of the failed host (it may not have sent them)."""
        if not self._failed_ranks or self._welcome is None:
            return []
        for k in self._failed_ranks:
            reason = self.failure_reason or f"{engine_proc_name(k)} died"
            send_engine_dead(self._welcome.output_addresses, engine_dead_frame(k, reason))
        return [engine_proc_name(k) for k in self._failed_ranks]

    def shutdown(self, timeout: float | None = None) -> None:
        """Tell every host to stop, then close the port (idempotent)."""
        if self._stop.is_set():
            return
        self._commands.put(("stop", None))
        self._thread.join(timeout=5.0)
        self._stop.set()
        with self._changed:
            self._changed.notify_all()

    # -- the thread that owns the socket ------------------------------------------------------

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        probe_until = 0.0
        try:
            while True:
                if not self._do_commands():
                    return
                events = dict(poller.poll(_POLL_MS))
                if self._monitor in events:
                    event = parse_monitor_message(self._monitor.recv_multipart())
                    if event["event"] == zmq.EVENT_DISCONNECTED:
                        probe_until = time.monotonic() + _PROBE_S
                if self._sock in events:
                    while (frames := _recv_nowait(self._sock)) is not None:
                        self._on_message(frames)
                if time.monotonic() < probe_until:
                    self._probe_hosts()
        except Exception as e:  # never silently: the launcher must learn the link broke
            logger.exception("headless link failed")
            self._fail(f"the --headless link at {self.endpoint} failed: {e!r}", [])
        finally:
            self._close_sockets()

    def _do_commands(self) -> bool:
        while True:
            try:
                command, arg = self._commands.get_nowait()
            except queue.Empty:
                return True
            if command == "stop":
                for identity in list(self._hosts):
                    self._send(identity, HEADLESS_NOTICE, HeadlessNotice("stop", "shutdown"))
                return False
            assert isinstance(arg, HeadlessWelcome)
            self._welcome = arg
            for host in self._hosts.values():
                self._welcome_host(host)

    def _on_message(self, frames: list[zmq.Frame]) -> None:
        identity, kind, payload = (
            (bytes(f.buffer) for f in frames[:3]) if len(frames) == 3 else (b"", b"", b"")
        )
        try:
            if kind == HEADLESS_HELLO:
                hello = decoder(HeadlessHello).decode(payload)
                self._on_hello(identity, hello, str(frames[0].get("Peer-Address") or "?"))
            elif kind == HEADLESS_NOTICE and identity in self._hosts:
                self._on_notice(self._hosts[identity], decoder(HeadlessNotice).decode(payload))
            else:
                raise ValueError(f"unexpected message {kind[:16]!r}")
        except (msgspec.DecodeError, ValueError) as e:
            logger.warning("dropped a malformed message on %s: %s", self.endpoint, e)

    def _on_hello(self, identity: bytes, hello: HeadlessHello, peer: str) -> None:
        host = _Host(identity, hello, peer)
        error = self._refusal(host)
        if error:
            logger.error("refused %s: %s", host.describe(), error)
            self._send(identity, HEADLESS_WELCOME, HeadlessWelcome([], [], error=error))
            return
        with self._changed:  # wait_for_ready reads the hosts from the launcher's thread
            self._hosts[identity] = host
        logger.info("%s joined", host.describe())
        if self._welcome is not None:
            self._welcome_host(host)

    def _refusal(self, host: _Host) -> str:
        hello = host.hello
        if hello.data_parallel_size != self.data_parallel_size:
            return (
                f"its --data-parallel-size {hello.data_parallel_size} differs from the front "
                f"end's {self.data_parallel_size}"
            )
        ranks = set(range(hello.start_rank, hello.start_rank + hello.num_engines))
        taken = {
            r
            for h in self._hosts.values()
            for r in range(h.hello.start_rank, h.hello.start_rank + h.hello.num_engines)
        }
        if not ranks <= self.remote_ranks or ranks & taken:
            return (
                f"its {_ranks(hello.start_rank, hello.num_engines)} (--data-parallel-start-rank "
                f"{hello.start_rank}) are not among the engines the front end waits for "
                f"({_list(free) if (free := self.remote_ranks - taken) else 'none'})"
            )
        return ""

    def _welcome_host(self, host: _Host) -> None:
        if not host.welcomed and self._welcome is not None:
            host.welcomed = True
            self._send(host.identity, HEADLESS_WELCOME, self._welcome)

    def _on_notice(self, host: _Host, notice: HeadlessNotice) -> None:
        if notice.kind == "ready":
            logger.info("%s is ready", host.describe())
            with self._changed:
                host.ready = list(notice.engines)
                self._changed.notify_all()
        elif notice.kind == "dead":
            self._fail(f"{host.describe()} failed: {notice.reason}", host)

    def _probe_hosts(self) -> None:
        """Which host's connection closed? A send to it fails at once (ROUTER_MANDATORY)."""
        for identity, host in list(self._hosts.items()):
            if not self._send(identity, HEADLESS_NOTICE, HeadlessNotice("ping")):
                self._fail(f"{host.describe()} disconnected (its engines are gone)", host)

    def _send(self, identity: bytes, kind: bytes, message: msgspec.Struct) -> bool:
        try:
            self._sock.send_multipart([identity, kind, encode(message)], zmq.NOBLOCK)
        except zmq.ZMQError as e:
            if e.errno in (errno.EHOSTUNREACH, zmq.EAGAIN):
                return False
            raise
        return True

    def _fail(self, reason: str, host: _Host | list[int]) -> None:
        with self._changed:
            if self.failure_reason:
                return
            if isinstance(host, _Host):
                self._hosts.pop(host.identity, None)
                start, count = host.hello.start_rank, host.hello.num_engines
                self._failed_ranks = list(range(start, start + count))
                self.failed_proc_name = host.describe()
            self.failure_reason = reason
            self._changed.notify_all()

    def _close_sockets(self) -> None:
        self._sock.disable_monitor()
        self._monitor.close(linger=0)
        self._sock.close()
        self._ctx.term()


def _recv_nowait(sock: zmq.Socket) -> list[zmq.Frame] | None:
    try:
        return sock.recv_multipart(zmq.NOBLOCK, copy=False)
    except zmq.Again:
        return None


def _list(ranks: set[int]) -> str:
    return "engine(s) " + ", ".join(str(r) for r in sorted(ranks))


def _bind_error(error: zmq.ZMQError, address: str, port: int) -> str:
    where = f"{address}:{port}"
    if error.errno == errno.EADDRINUSE:
        return f"--data-parallel-rpc-port {port}: {where} is already in use; choose another port"
    if error.errno == errno.EADDRNOTAVAIL or error.errno == errno.ENODEV:
        return (
            f"--data-parallel-address {address}: not an address of this host "
            f"({socket.gethostname()}); give one of its interfaces' addresses"
        )
    return f"cannot listen for --headless hosts on {where}: {error}"
