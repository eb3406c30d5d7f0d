"""`TensorQueue`: tensors through shared memory, segments unlinked by the reader, by `release`
and, for whatever a dead process left, by `close`."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

from shoal.runtime.tensor_queue import TensorQueue, release


@pytest.fixture
def tq() -> Iterator[TensorQueue]:
    q = TensorQueue(2)
    yield q
    q.close()
    assert q.leftover_segments() == []


def test_a_tensor_reaches_its_engine_and_its_segment_is_unlinked(tq: TensorQueue) -> None:
    tensor = torch.randn(5, 8)
    segment = tq.put(1, "req-1", tensor)
    assert [os.path.basename(p) for p in tq.leftover_segments()] == [segment]
    received = tq.receiver(1).take("req-1")
    assert torch.equal(received.tensor, tensor)
    assert tq.leftover_segments() == []


def test_equal_tensors_have_equal_digests_and_others_differ(tq: TensorQueue) -> None:
    receiver = tq.receiver(0)
    tensor = torch.randn(3, 4)
    tq.put(0, "a", tensor)
    tq.put(0, "b", tensor.clone())
    tq.put(0, "c", tensor + 1)
    tq.put(0, "d", tensor.reshape(4, 3))
    # Taken out of order: the receiver keeps what it read on the way.
    d, a, c, b = (receiver.take(r) for r in "dacb")
    assert a.digest == b.digest
    assert len({a.digest, c.digest, d.digest}) == 3


def test_a_released_segment_fails_its_request_at_once(tq: TensorQueue) -> None:
    release(tq.put(0, "gone", torch.zeros(2, 2)))
    with pytest.raises(ValueError, match="prompt_embeds: unreadable"):
        tq.receiver(0).take("gone", timeout_s=30)


def test_a_tensor_that_never_comes_times_out(tq: TensorQueue) -> None:
    with pytest.raises(ValueError, match="no tensor arrived"):
        tq.receiver(0).take("never", timeout_s=0.2)


def test_close_unlinks_what_nobody_read(tq: TensorQueue) -> None:
    tq.put(0, "x", torch.ones(4, 4, dtype=torch.bfloat16))
    tq.put(1, "y", torch.ones(4, 4))
    assert len(tq.leftover_segments()) == 2
    tq.close()
    assert tq.leftover_segments() == []
