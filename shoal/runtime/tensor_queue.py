"""`TensorQueue`: tensors from the API servers to the engines through shared memory.

The seed's `tensor_queue` (`APIServerProcessManager(..., tensor_queue=...)`): request data
too big for the ZMQ frames (today `prompt_embeds`) travels beside them.

    ApiServer_i                                   EngineCore_k
      put(k, request_id, tensor)
        bytes -> /dev/shm/<prefix><uuid>  ----.
        TensorHandle -> queues[k]  -------.   |   (a small msgspec frame)
      then [ADD, EngineCoreRequest]       |   |
        (has_prompt_embeds=True) -> ZMQ   '---+-> TensorReceiver.take(request_id)
                                              |     reads the handle, copies the bytes
                                              '---- and unlinks the segment at once

One `multiprocessing` queue per engine (any data-parallel size; any number of API servers
write to each); the launcher creates the `TensorQueue` before spawning anybody, since such
queues cross process boundaries only at spawn. Segments are plain files in the shared-memory
directory, named with the run's prefix: `close()` (the launcher, at shutdown) unlinks any
that a dead process left behind. Torch is imported only by the functions that handle
tensors, so the API server imports it only when a request carries one.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import queue
import secrets
import tempfile
import time
import uuid
from typing import TYPE_CHECKING, Any

import msgspec

from shoal.logger import init_logger
from shoal.protocol import TensorHandle, decoder, encode
from shoal.runtime.procs import SPAWN_CTX

if TYPE_CHECKING:
    import torch

logger = init_logger(__name__)

# tmpfs on Linux; elsewhere the temporary directory (the same code, only not in memory).
SHM_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


class TensorQueue:
    """Shared-memory tensors for `num_engines` engines. Picklable across a spawn (it travels
    in the children's arguments); `put` in the API servers, `receiver(k)` in engine k."""

    def __init__(self, num_engines: int) -> None:
        if num_engines < 1:
            raise ValueError(f"num_engines: must be at least 1, got {num_engines}")
        self.prefix = f"shoal-tq-{os.getpid()}-{secrets.token_hex(4)}-"
        self.queues: list[Any] = [SPAWN_CTX.Queue() for _ in range(num_engines)]

    @property
    def num_engines(self) -> int:
        return len(self.queues)

    def put(self, engine_index: int, request_id: str, tensor: torch.Tensor) -> str:
        """Write `tensor` (CPU, any dtype) to a new segment and queue its handle for engine
        `engine_index`. Returns the segment's name: `release(name)` it if the request never
        reaches the engine."""
        import torch

        data = tensor.detach().to("cpu").contiguous()
        segment = f"{self.prefix}{uuid.uuid4().hex}"
        raw = data.reshape(-1).view(torch.uint8).numpy()
        fd = os.open(os.path.join(SHM_DIR, segment), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        try:
            with os.fdopen(fd, "wb", closefd=False) as f:
                f.write(raw.tobytes())
        except BaseException:
            os.close(fd)
            release(segment)
            raise
        os.close(fd)
        handle = TensorHandle(
            request_id, segment, str(data.dtype).removeprefix("torch."), list(data.shape)
        )
        try:
            self.queues[engine_index].put(encode(handle))
        except BaseException:
            release(segment)
            raise
        return segment

    def receiver(self, engine_index: int) -> TensorReceiver:
        """Engine `engine_index`'s reading end."""
        return TensorReceiver(self.queues[engine_index])

    def leftover_segments(self) -> list[str]:
        """This run's segments still in the shared-memory directory."""
        return sorted(glob.glob(os.path.join(SHM_DIR, glob.escape(self.prefix) + "*")))

    def close(self) -> None:
        """Unlink every segment of this run still present (a writer or reader died between
        writing and reading it) and close the queues. Idempotent."""
        for path in self.leftover_segments():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        for q in self.queues:
            q.close()
            q.cancel_join_thread()


def release(segment: str) -> None:
    """Unlink a segment (nothing if already gone)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(SHM_DIR, os.path.basename(segment)))


class ReceivedTensor(msgspec.Struct, gc=False):
    """A tensor copied out of shared memory, with a digest of its bytes (the prefix cache's
    salt: equal tensors share cached blocks, no other prompt does)."""

    tensor: Any  # torch.Tensor; None when it could not be read
    digest: bytes
    received_s: float  # monotonic
    error: str = ""


class TensorReceiver:
    """An engine's end of its queue: `take(request_id)` returns that request's tensor."""

    # Tensors whose request never came (its API server died in between) are dropped after
    # this long.
    STALE_S = 300.0

    def __init__(self, q: Any) -> None:
        self._queue = q
        self._decoder = decoder(TensorHandle)
        self._received: dict[str, ReceivedTensor] = {}

    def take(self, request_id: str, timeout_s: float = 10.0) -> ReceivedTensor:
        """The tensor sent for `request_id`, waiting up to `timeout_s` for its handle (the
        API server queues it before it sends the request, so it is at most a moment behind).
        `ValueError` if it does not come or cannot be read."""
        deadline = time.monotonic() + timeout_s
        while request_id not in self._received:
            remaining = deadline - time.monotonic()
            try:
                frame = self._queue.get(timeout=max(remaining, 0.0))
            except queue.Empty:
                raise ValueError(
                    f"prompt_embeds: no tensor arrived for request {request_id} within "
                    f"{timeout_s:.0f} s"
                ) from None
            self._receive(frame)
        received = self._received.pop(request_id)
        if received.tensor is None:
            raise ValueError(f"prompt_embeds: {received.error}")
        return received

    def _receive(self, frame: bytes) -> None:
        try:
            handle = self._decoder.decode(frame)
        except msgspec.DecodeError:
            logger.warning("dropped a malformed tensor handle")
            return
        try:
            received = _read_segment(handle)
        except (OSError, ValueError, TypeError, RuntimeError) as e:
            logger.warning("tensor of request %s unreadable: %s", handle.request_id, e)
            received = ReceivedTensor(None, b"", time.monotonic(), f"unreadable tensor ({e})")
        finally:
            release(handle.segment)
        now = received.received_s
        for rid in [r for r, t in self._received.items() if now - t.received_s > self.STALE_S]:
            del self._received[rid]
        self._received[handle.request_id] = received

    def drain(self) -> None:
        """Read (and unlink) whatever is queued now, without waiting."""
        with contextlib.suppress(queue.Empty):
            while True:
                self._receive(self._queue.get_nowait())


def _read_segment(handle: TensorHandle) -> ReceivedTensor:
    import torch

    dtype = getattr(torch, handle.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {handle.dtype!r}")
    with open(os.path.join(SHM_DIR, os.path.basename(handle.segment)), "rb") as f:
        data = bytearray(f.read())
    digest = hashlib.sha256(b"prompt_embeds\0" + repr(handle.shape).encode() + data).digest()
    tensor = torch.frombuffer(data, dtype=dtype).reshape(handle.shape).clone() if data else None
    if tensor is None:
        raise ValueError("empty tensor")
    return ReceivedTensor(tensor, digest, time.monotonic())
