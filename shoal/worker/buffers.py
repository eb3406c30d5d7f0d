"""Host/device tensor pairs for the runner's persistent inputs, and tensor-to-bytes helpers."""

from __future__ import annotations

import torch


def is_pin_memory_available() -> bool:
    """Pinned host memory only helps (and only works) with a CUDA device present."""
    return torch.cuda.is_available()


# The default of `CpuGpuBuffer(pin_memory=...)`: false on a CPU-only machine.
PIN_MEMORY: bool = is_pin_memory_available()


class CpuGpuBuffer:
    """A host tensor `.cpu` and a same-shaped device tensor `.gpu`, plus `.np` (a numpy view
    sharing `.cpu`'s memory) when `with_numpy`.

    The runner fills `.np` / `.cpu` each step and copies the used prefix to the device with
    `copy_to_gpu(n)`. With `device="cpu"` the `.gpu` tensor is a second CPU tensor, so the same
    code runs on a CPU-only machine. Slicing is along dim 0; `n` beyond the size clamps.
    """

    def __init__(
        self,
        *size: int,
        dtype: torch.dtype,
        device: torch.device | str,
        pin_memory: bool = PIN_MEMORY,
        with_numpy: bool = True,
    ) -> None:
        if with_numpy and dtype == torch.bfloat16:
            raise ValueError(
                "Bfloat16 torch tensors cannot be directly cast to a numpy array, so call "
                "CpuGpuBuffer with with_numpy=False"
            )
        # Built outside inference mode so the tensors stay ordinary (writable in later steps).
        with torch.inference_mode(False):
            self.cpu = torch.zeros(*size, dtype=dtype, device="cpu", pin_memory=pin_memory)
            self.gpu = torch.zeros_like(self.cpu, device=device)
        if with_numpy:
            self.np = self.cpu.numpy()

    def copy_to_gpu(self, n: int | None = None) -> torch.Tensor:
        """Copy `cpu[:n]` (all when None) to `gpu[:n]` without blocking; return that slice."""
        if n is None:
            return self.gpu.copy_(self.cpu, non_blocking=True)
        return self.gpu[:n].copy_(self.cpu[:n], non_blocking=True)

    def copy_to_cpu(self, n: int | None = None) -> torch.Tensor:
        """Copy `gpu[:n]` back to `cpu[:n]` without blocking; synchronize before reading it."""
        if n is None:
            return self.cpu.copy_(self.gpu, non_blocking=True)
        return self.cpu[:n].copy_(self.gpu[:n], non_blocking=True)


def copy_slice(from_tensor: torch.Tensor, to_tensor: torch.Tensor, length: int) -> torch.Tensor:
    """Copy the first `length` elements (along dim 0) without blocking; return the target view.

    Mismatched slice shapes raise torch's `RuntimeError`."""
    return to_tensor[:length].copy_(from_tensor[:length], non_blocking=True)


def tensor_data(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes as a flat uint8 `memoryview` (format "B"), for hashing and
    serialising. Zero-copy for a contiguous CPU tensor; works for bfloat16."""
    return tensor.flatten().cpu().contiguous().view(torch.uint8).numpy().data
