"""CPU memory in 2 MB pages for what every decode step streams: the weights and the KV cache.

A decode step reads all the weights (135 MB for the default model with int8 linears) and
every running request's KV blocks, each time from memory. In 4 KB pages that is a TLB miss
per 4 KB; with transparent huge pages in `madvise` mode (this project's machines) nothing
gets 2 MB pages unless it asks. Asking (an anonymous private mapping with MADV_HUGEPAGE)
made the same kernels 1.06-1.10x faster on the int8 layer linears and 1.05-1.12x on decode
attention (docs/engine-runner.md, "2 MB pages").

Everything here falls back to ordinary torch allocations: off Linux, for CUDA, with
`SHOAL_HUGE_PAGES=0`, or when the mapping fails. The kernel may also decline to back a
range with huge pages (none free, THP `never`); the memory then works as 4 KB pages.
"""

from __future__ import annotations

import mmap

import torch
from torch import nn

from shoal.logger import init_logger

logger = init_logger(__name__)

HUGE_PAGE = 2 << 20
# Tensors smaller than this stay where they are (norm weights, scales, index lists).
MIN_MOVED_BYTES = 64 << 10


def enabled(device: torch.device) -> bool:
    from shoal import envs

    return (
        device.type == "cpu"
        and envs.refresh().huge_pages
        and hasattr(mmap, "MADV_HUGEPAGE")
        and hasattr(mmap, "MAP_PRIVATE")
    )


# madvise(MADV_POPULATE_WRITE) (Linux 5.14): fault a range in now, writable and zeroed.
# Python's mmap module names it from 3.12 on.
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)


def zeros(nbytes: int, populate: bool = False) -> torch.Tensor | None:
    """A zero-filled uint8 CPU tensor of `nbytes` starting on a 2 MB boundary, in a mapping
    advised to use 2 MB pages; None if the mapping cannot be made. The tensor keeps the
    mapping alive. Pages are faulted in (and zeroed by the kernel) at first touch, or all
    now with `populate`."""
    try:
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
        region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=flags)
        region.madvise(mmap.MADV_HUGEPAGE)
    except (OSError, ValueError) as e:
        logger.info("2 MB pages unavailable (%s): using ordinary allocations", e)
        return None
    whole = torch.frombuffer(region, dtype=torch.uint8)
    start = (-whole.data_ptr()) % HUGE_PAGE
    if populate:
        try:
            region.madvise(_MADV_POPULATE_WRITE)
        except OSError:  # an older kernel: one write per 4 KB page does the same
            whole[::4096].zero_()
    return whole[start : start + nbytes]


def zeros_shaped(
    shape: tuple[int, ...], dtype: torch.dtype, populate: bool = False
) -> torch.Tensor | None:
    """`torch.zeros(shape, dtype=dtype)` in 2 MB pages (see `zeros`), or None."""
    count = 1
    for size in shape:
        count *= size
    raw = zeros(count * dtype.itemsize, populate)
    return None if raw is None else raw.view(dtype).view(shape)


def move_module(module: nn.Module) -> int:
    """Move every CPU parameter and buffer of at least MIN_MOVED_BYTES into one 2 MB-page
    arena (copied, then rebound in every module that holds it), in module order so that what
    a step reads in sequence lies in sequence. Returns the bytes moved (0 if the arena could
    not be made). Each old tensor is released as soon as it is copied, and the arena's pages
    are only touched as it fills, so memory peaks near one copy of the weights as long as
    nothing else holds them: whatever caches these tensors (a fused parameter list) must be
    dropped before and rebuilt after."""
    # Each tensor once, with every (module, name, is_parameter) that holds it.
    tensors: dict[int, tuple[torch.Tensor, list[tuple[nn.Module, str, bool]]]] = {}
    for sub in module.modules():
        for is_param, table in ((True, sub._parameters), (False, sub._buffers)):
            for name, t in table.items():
                if t is None or t.device.type != "cpu" or not t.is_contiguous():
                    continue
                if t.nbytes >= MIN_MOVED_BYTES:
                    tensors.setdefault(id(t), (t, []))[1].append((sub, name, is_param))
    if not tensors:
        return 0
    sizes = [-(-t.nbytes // 64) * 64 for t, _ in tensors.values()]
    arena = zeros(sum(sizes))
    if arena is None:
        return 0
    offset = 0
    for key, size in zip(list(tensors), sizes, strict=True):
        t, holders = tensors.pop(key)
        new = arena[offset : offset + t.nbytes].view(t.dtype).view(t.shape)
        new.copy_(t)
        offset += size
        for sub, name, is_param in holders:
            if is_param:
                sub._parameters[name] = nn.Parameter(new, requires_grad=False)
            else:
                sub._buffers[name] = new
        del t, holders  # the old tensor goes now unless something else holds it
    return offset
