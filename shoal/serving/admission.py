"""Admission control shared by every API server of a run (`--max-num-queued-requests`).

A request counts from the moment an API server admits it until its response has been sent
(or the client went away): it is queued somewhere in the system, in an API server, in an
engine's waiting queue or running. Over the limit a new request is refused with 503 and
`Retry-After` instead of joining an unbounded queue.

Why a file: the N API servers are separate processes and the limit is global. Each server
owns two int64 slots in one small mmap'd file in the run's private IPC directory
(`admission.counters`): `[in_flight_i, rejected_i]`. A server writes only its own slots; the
global count is the sum over all servers. `try_acquire` holds an exclusive `flock` on the
file while it reads the sum and bumps its slot, so two servers never both take the last
place. A server killed by SIGKILL releases the lock with its file descriptor (the launcher
then stops the whole run, so its stale slot does not outlive it).
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
from collections.abc import Iterator

from shoal.logger import init_logger

logger = init_logger(__name__)

FILE_NAME = "admission.counters"
_SLOTS_PER_SERVER = 2  # in flight, rejected
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
        self._base = client_index * _SLOTS_PER_SERVER
        size = client_count * _SLOTS_PER_SERVER * 8
        self._fd = -1
        self._mmap: mmap.mmap | None = None
        if directory is None:
            if client_count > 1 and limit is not None:
                logger.warning("no shared IPC directory: --max-num-queued-requests is per server")
            self._slots = memoryview(bytearray(size)).cast("q")
            return
        path = os.path.join(directory, FILE_NAME)
        # No O_TRUNC: another server may already count in it. ftruncate to the same size is
        # idempotent and new bytes read as zero.
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        with self._locked():
            if os.fstat(self._fd).st_size < size:
                os.ftruncate(self._fd, size)
        self._mmap = mmap.mmap(self._fd, size)
        self._slots = memoryview(self._mmap).cast("q")
        self._slots[self._base] = 0  # a fresh process has nothing in flight

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        if self._fd < 0:
            yield
            return
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def in_flight(self) -> int:
        """Requests admitted and not yet finished, over every API server of the run."""
        return sum(self._slots[i] for i in range(0, len(self._slots), _SLOTS_PER_SERVER))

    def rejected(self) -> int:
        """Requests refused over the limit, over every API server of the run."""
        return sum(self._slots[i] for i in range(1, len(self._slots), _SLOTS_PER_SERVER))

    def try_acquire(self) -> bool:
        """Admit one request (True; pair it with `release`) or refuse it (False)."""
        with self._locked():
            if self.limit is not None and self.in_flight() >= self.limit:
                self._slots[self._base + 1] += 1
                return False
            self._slots[self._base] += 1
            return True

    def release(self) -> None:
        """The admitted request is done (response sent, failed, or the client left)."""
        with self._locked():
            self._slots[self._base] = max(self._slots[self._base] - 1, 0)

    def refusal_message(self) -> str:
        return (
            f"the server is at its limit of {self.limit} queued requests "
            f"(--max-num-queued-requests); retry after {RETRY_AFTER_S} s"
        )

    def close(self) -> None:
        self._slots.release()
        if self._mmap is not None:
            self._mmap.close()
            self._mmap = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
