"""CpuGpuBuffer, copy_slice and tensor_data per the seed's contracts (§2.2, §2.10, §2.12)."""

from __future__ import annotations

import hashlib

import pytest
import torch

from shoal.worker.buffers import CpuGpuBuffer, copy_slice, tensor_data


def test_buffer_pairs_and_numpy_view() -> None:
    buf = CpuGpuBuffer(4, 3, dtype=torch.int32, device="cpu")
    assert buf.cpu.shape == buf.gpu.shape == (4, 3)
    assert buf.cpu.dtype == buf.gpu.dtype == torch.int32
    assert torch.count_nonzero(buf.cpu) == 0 and torch.count_nonzero(buf.gpu) == 0
    assert buf.gpu.data_ptr() != buf.cpu.data_ptr()
    buf.np[1, 2] = 7  # .np shares .cpu's memory
    assert buf.cpu[1, 2] == 7
    assert not buf.cpu.is_inference()


def test_copy_to_gpu_prefix_and_clamp() -> None:
    buf = CpuGpuBuffer(5, dtype=torch.int64, device="cpu")
    buf.np[:] = [1, 2, 3, 4, 5]
    out = buf.copy_to_gpu(2)
    assert out.tolist() == [1, 2] and buf.gpu.tolist() == [1, 2, 0, 0, 0]
    assert out.data_ptr() == buf.gpu.data_ptr()  # a view of .gpu
    assert buf.copy_to_gpu(99).tolist() == [1, 2, 3, 4, 5]  # beyond the size clamps
    buf.gpu.fill_(9)
    assert buf.copy_to_cpu(3).tolist() == [9, 9, 9] and buf.cpu.tolist() == [9, 9, 9, 4, 5]
    assert buf.copy_to_cpu().tolist() == [9] * 5


def test_buffers_made_in_inference_mode_stay_writable() -> None:
    with torch.inference_mode():
        buf = CpuGpuBuffer(3, dtype=torch.float32, device="cpu")
    buf.cpu.add_(1)  # would raise for an inference tensor outside inference mode
    assert buf.copy_to_gpu().tolist() == [1.0, 1.0, 1.0]


def test_bfloat16_needs_with_numpy_false() -> None:
    with pytest.raises(ValueError, match="with_numpy=False"):
        CpuGpuBuffer(2, dtype=torch.bfloat16, device="cpu")
    buf = CpuGpuBuffer(2, dtype=torch.bfloat16, device="cpu", with_numpy=False)
    with pytest.raises(AttributeError):
        _ = buf.np


def test_copy_slice() -> None:
    src, dst = torch.arange(6), torch.zeros(8, dtype=torch.int64)
    view = copy_slice(src, dst, 4)
    assert view.tolist() == [0, 1, 2, 3] and dst.tolist() == [0, 1, 2, 3, 0, 0, 0, 0]
    view.fill_(5)  # a view of the target
    assert dst[:4].tolist() == [5] * 4
    with pytest.raises(RuntimeError):
        copy_slice(torch.zeros(4, 2), torch.zeros(4, 3), 2)


def test_tensor_data_bytes() -> None:
    t = torch.arange(6, dtype=torch.float32).view(2, 3)
    mv = tensor_data(t)
    assert mv.format == "B" and mv.nbytes == t.numel() * t.element_size()
    assert bytes(mv) == t.numpy().tobytes()
    t[0, 0] = 42.0  # zero-copy for a contiguous CPU tensor
    assert bytes(mv) == t.numpy().tobytes()
    bf16 = torch.ones(4, dtype=torch.bfloat16)
    assert tensor_data(bf16).nbytes == 8
    assert hashlib.sha256(tensor_data(t.t())).digest()  # non-contiguous input works
    assert bytes(tensor_data(t.t())) == t.t().contiguous().numpy().tobytes()
