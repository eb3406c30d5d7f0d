"""Admission control shared by every API server of a run (`--max-num-queued-requests`).

A request counts from the moment an API server admits it until its response has been sent
(or the client went away): it is queued somewhere in the system, in an API server, in an
engine's waiting queue or running. Over the limit a new request is refused with 503 and
`Retry-After` instead of joining an unbounded queue.

Why files: the N API servers are separate processes and the limit is global. Each server
owns one small mmap'd file in the run's private IPC directory, `admission_<i>.counters`, of
two int64 slots `[in_flight, rejected]`, and writes only its own; the global count is the sum
over every server's file. `try_acquire` holds an exclusive `flock` on the directory while it
reads the sum and bumps its slot, so two servers never both take the last place. A server
killed by SIGKILL releases the lock with its file descriptor (the launcher then stops the
whole run, so its stale count does not outlive it). Each server removes its own file on
close, like the metrics files. After `close` the object counts nothing: a request task that
outlives its server's shutdown (one uvicorn cancelled at the end of the drain) may still call
`release`, which is then a no-op, and `try_acquire` refuses.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
from collections.abc import Iterator

from shoal.logger import init_logger

logger = init_logger(__name__)

_SLOTS = 2  # in flight, rejected
# Seconds a refused client is told to wait (Retry-After): one engine step is milliseconds,
# a typical request a few seconds; 1 s spreads retries without idling a free server long.
RETRY_AFTER_S = 1


class AdmissionControl:
    """This API server's view of the global request count.

    `limit` None: every request is admitted (the count is still kept, for /metrics).
    `directory` None: the count covers this process only (no shared IPC directory)."""

    def __init__(
        self,
        limit: int | None,
        directory: str | None,
        client_index: int = 0,
        client_count: int = 1,
    ) -> None:
        if limit is not None and limit < 1:
            raise ValueError(f"--max-num-queued-requests: must be at least 1, got {limit}")
        if not 0 <= client_index < client_count:
            raise ValueError(f"client_index: {client_index} not in [0, {client_count})")
        self.limit = limit
        self.directory = directory
        self.client_index = client_index
        self.client_count = client_count
        self.path: str | None = None
        self._dir_fd = -1
        self._maps: dict[int, tuple[mmap.mmap, memoryview]] = {}
        self._closed = False
        if directory is None:
            if client_count > 1 and limit is not None:
                logger.warning("no shared IPC directory: --max-num-queued-requests is per server")
            self._own = memoryview(bytearray(_SLOTS * 8)).cast("q")
            return
        self._dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        self.path = _file(directory, client_index)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, _SLOTS * 8)
            own = mmap.mmap(fd, _SLOTS * 8)
        finally:
            os.close(fd)
        self._own = memoryview(own).cast("q")
        self._maps[client_index] = (own, self._own)

    def _peers(self) -> list[memoryview]:
        """Every server's slots that exist so far (a peer still starting has none yet);
        none once closed (mapping the files again would leak the maps)."""
        if self._closed:
            return []
        if self.directory is None:
            return [self._own]
        for j in range(self.client_count):
            if j in self._maps:
                continue
            try:
                fd = os.open(_file(self.directory, j), os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                if os.fstat(fd).st_size < _SLOTS * 8:
                    continue
                peer = mmap.mmap(fd, _SLOTS * 8, prot=mmap.PROT_READ)
            finally:
                os.close(fd)
            self._maps[j] = (peer, memoryview(peer).cast("q"))
        return [view for _, view in self._maps.values()]

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        if self._dir_fd < 0:
            yield
            return
        fcntl.flock(self._dir_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._dir_fd, fcntl.LOCK_UN)

    def in_flight(self) -> int:
        """Requests admitted and not yet finished, over every API server of the run."""
        return sum(view[0] for view in self._peers())

    def in_flight_by_server(self) -> dict[int, int]:
        """`in_flight()` per API server (client index -> requests), for the dashboard."""
        if self.directory is None:
            return {} if self._closed else {self.client_index: int(self._own[0])}
        self._peers()
        return {j: int(view[0]) for j, (_, view) in sorted(self._maps.items())}

    def rejected(self) -> int:
        """Requests refused over the limit, over every API server of the run."""
        return sum(view[1] for view in self._peers())

    def try_acquire(self) -> bool:
        """Admit one request (True; pair it with `release`) or refuse it (False; always once
        closed: the server is shutting down)."""
        if self._closed:
            return False
        with self._locked():
            if self.limit is not None and self.in_flight() >= self.limit:
                self._own[1] += 1
                return False
            self._own[0] += 1
            return True

    def release(self) -> None:
        """The admitted request is done (response sent, failed, or the client left). A no-op
        once closed: the count it would lower was removed with this server's file."""
        if self._closed:
            return
        with self._locked():
            self._own[0] = max(self._own[0] - 1, 0)

    def refusal_message(self) -> str:
        if self._closed:
            return f"the server is shutting down; retry after {RETRY_AFTER_S} s"
        return (
            f"the server is at its limit of {self.limit} queued requests "
            f"(--max-num-queued-requests); retry after {RETRY_AFTER_S} s"
        )

    def close(self) -> None:
        """Unmap everything and remove this server's file; idempotent."""
        self._closed = True
        for map_, view in self._maps.values():
            view.release()
            map_.close()
        self._maps.clear()
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            self.path = None
        if self._dir_fd >= 0:
            os.close(self._dir_fd)
            self._dir_fd = -1


def _file(directory: str, client_index: int) -> str:
    return os.path.join(directory, f"admission_{client_index}.counters")
