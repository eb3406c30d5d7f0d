"""`EngineIO`: an engine process's two ZMQ I/O threads and the queues between them and the loop.

    input thread   DEALER x N (one per API server, identity engine_identity(k)): decode
                   ADD / ABORT / UTILITY with typed decoders -> `input_queue`; malformed ->
                   logged, dropped. A socket monitor counts the API servers still connected.
    output thread  `send()` queue -> encode -> PUSH[client_index]; the dead notice
                   (`engine_dead_frame(k)`) to all

Each socket is used by exactly one thread. No pickle: frames are msgspec msgpack.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

import msgspec
import zmq
from zmq.utils.monitor import parse_monitor_message

from shoal.logger import init_logger
from shoal.protocol import (
    AbortRequest,
    EngineAddresses,
    EngineCoreOutputs,
    EngineCoreRequest,
    RequestType,
    UtilityRequest,
    decoder,
    encode,
    engine_dead_frame,
    engine_identity,
)
from shoal.runtime.addresses import connect_zmq_socket

logger = init_logger(__name__)

_POLL_MS = 100
# On close, unsent frames (final outputs) may take this long to get out; the dead notice longer.
_LINGER_MS = 1000
_DEAD_LINGER_MS = 4000
_THREAD_JOIN_S = 5.0
_MONITOR_EVENTS = zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED


class _Dead:
    """Output-queue marker: send the dead notice (with `reason`) on every output socket."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


_DEAD = _Dead("fatal error")
InputMessage = EngineCoreRequest | AbortRequest | UtilityRequest
_OutputItem = tuple[int, EngineCoreOutputs] | _Dead | None


class EngineIO:
    """The I/O threads of engine `engine_index` (see the module docstring)."""

    def __init__(self, engine_index: int) -> None:
        self.engine_index = engine_index
        self.input_queue: queue.Queue[InputMessage] = queue.Queue()
        self.num_clients = 0
        # Set by a thread that failed; the busy loop raises it (the engine is then dead).
        self.error: BaseException | None = None
        self._output_queue: queue.Queue[_OutputItem] = queue.Queue()
        self._connected: set[int] = set()
        self._stop = threading.Event()
        self._ctx = zmq.Context()
        self._threads: list[threading.Thread] = []
        self._output_addresses: list[str] = []
        self._linger_ms = _LINGER_MS

    @property
    def num_connected_clients(self) -> int:
        """API servers whose input connection is up now (0 once they have all exited)."""
        return len(self._connected)

    def start(self, addresses: EngineAddresses, ready: bytes) -> None:
        """Start both threads; return once every socket is connected (asynchronously, as
        ZMQ does) and `ready` is queued on every DEALER. `RuntimeError` if a thread fails."""
        if len(addresses.input_addresses) != len(addresses.output_addresses):
            raise ValueError("EngineAddresses: input and output address lists differ in length")
        self.num_clients = len(addresses.output_addresses)
        self._output_addresses = list(addresses.output_addresses)
        self._start_thread("EngineInput", self._input_loop, addresses.input_addresses, ready)
        self._start_thread("EngineOutput", self._output_loop, addresses.output_addresses)

    def _start_thread(self, name: str, target: Callable[..., None], *args: object) -> None:
        started = threading.Event()
        thread = threading.Thread(target=target, name=name, args=(*args, started), daemon=True)
        thread.start()
        self._threads.append(thread)
        while not started.wait(0.1):
            if not thread.is_alive():
                raise RuntimeError(f"{name} thread failed to start: {self.error!r}")

    def send(self, client_index: int, outputs: EngineCoreOutputs) -> None:
        """Queue `outputs` for API server `client_index`."""
        self._output_queue.put((client_index, outputs))

    def close(self, dead: bool = False) -> None:
        """Stop both threads once everything queued is sent (and, when `dead`,
        the dead notice on every output socket); bounded by the sockets' linger."""
        if dead:
            self._linger_ms = _DEAD_LINGER_MS
            if len(self._threads) == 2 and self._threads[1].is_alive():
                self._output_queue.put(_DEAD)
            else:
                self._send_dead_directly()
        self._output_queue.put(None)
        self._stop.set()
        for thread in self._threads:
            thread.join(_THREAD_JOIN_S + self._linger_ms / 1000)
        self._ctx.term()

    def announce_dead(self, reason: str) -> None:
        """Queue the dead notice for every API server (any thread; the engine is about to
        exit without `close`)."""
        self._output_queue.put(_Dead(reason))

    def socket(self, socket_type: int) -> zmq.Socket:
        """A socket of this process's context (for the main thread's own sockets)."""
        return self._ctx.socket(socket_type)

    # -- threads ------------------------------------------------------------------------------

    def _input_loop(self, addresses: list[str], ready: bytes, started: threading.Event) -> None:
        sockets: list[zmq.Socket] = []
        monitors: dict[zmq.Socket, int] = {}
        try:
            poller = zmq.Poller()
            for client_index, address in enumerate(addresses):
                sock = self._ctx.socket(zmq.DEALER)
                sock.setsockopt(zmq.IDENTITY, engine_identity(self.engine_index))
                sock.setsockopt(zmq.LINGER, 0)
                monitor = sock.get_monitor_socket(_MONITOR_EVENTS)
                connect_zmq_socket(sock, address)
                sock.send(ready)
                poller.register(sock, zmq.POLLIN)
                poller.register(monitor, zmq.POLLIN)
                sockets.append(sock)
                monitors[monitor] = client_index
            started.set()
            decoders = (
                decoder(EngineCoreRequest),
                decoder(AbortRequest),
                decoder(UtilityRequest),
            )
            while not self._stop.is_set():
                for sock, _ in poller.poll(_POLL_MS):
                    if sock in monitors:
                        self._on_monitor_event(sock, monitors[sock])
                        continue
                    while (frames := _recv_nowait(sock)) is not None:
                        self._decode_input(frames, *decoders)
        except BaseException as e:
            self.error = e
            logger.exception("input thread failed")
        finally:
            for sock in sockets:
                sock.disable_monitor()
                sock.close()
            for monitor in monitors:
                monitor.close(linger=0)

    def _on_monitor_event(self, monitor: zmq.Socket, client_index: int) -> None:
        event = parse_monitor_message(monitor.recv_multipart())
        if event["event"] == zmq.EVENT_CONNECTED:
            self._connected.add(client_index)
        elif event["event"] == zmq.EVENT_DISCONNECTED:
            self._connected.discard(client_index)

    def _decode_input(
        self,
        frames: list[bytes],
        add_decoder: msgspec.msgpack.Decoder,
        abort_decoder: msgspec.msgpack.Decoder,
        utility_decoder: msgspec.msgpack.Decoder | None = None,
    ) -> None:
        """Queue one ADD / ABORT / UTILITY (the last only with `utility_decoder`); a malformed
        message is logged and dropped."""
        try:
            if len(frames) != 2:
                raise ValueError(f"expected 2 frames (type, payload), got {len(frames)}")
            request_type = RequestType(frames[0])
            if request_type == RequestType.ADD:
                self.input_queue.put(add_decoder.decode(frames[1]))
            elif request_type == RequestType.ABORT:
                self.input_queue.put(abort_decoder.decode(frames[1]))
            elif request_type == RequestType.UTILITY and utility_decoder is not None:
                self.input_queue.put(utility_decoder.decode(frames[1]))
            else:
                raise ValueError(f"request type {request_type.name} is not served here")
        except (msgspec.DecodeError, ValueError, TypeError) as e:
            logger.warning("dropped a malformed input message (%d frames): %s", len(frames), e)

    def _output_loop(self, addresses: list[str], started: threading.Event) -> None:
        sockets: list[zmq.Socket] = []
        try:
            for address in addresses:
                sock = self._ctx.socket(zmq.PUSH)
                sock.setsockopt(zmq.SNDHWM, 0)  # never drop or block on a busy API server
                connect_zmq_socket(sock, address)
                sockets.append(sock)
            started.set()
            while (item := self._output_queue.get()) is not None:
                if isinstance(item, _Dead):
                    for sock in sockets:
                        sock.send(engine_dead_frame(self.engine_index, item.reason))
                else:
                    client_index, outputs = item
                    sockets[client_index].send(encode(outputs))
        except BaseException as e:
            self.error = e
            logger.exception("output thread failed")
        finally:
            for sock in sockets:
                sock.close(linger=self._linger_ms)

    def _send_dead_directly(self) -> None:
        # The output thread is gone: tell the API servers over fresh sockets.
        for address in self._output_addresses:
            sock = self._ctx.socket(zmq.PUSH)
            connect_zmq_socket(sock, address)
            sock.send(engine_dead_frame(self.engine_index, "fatal error"), zmq.NOBLOCK)
            sock.close(linger=_DEAD_LINGER_MS)


def _recv_nowait(sock: zmq.Socket) -> list[bytes] | None:
    try:
        return sock.recv_multipart(zmq.NOBLOCK)
    except zmq.Again:
        return None
