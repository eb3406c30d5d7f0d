"""2 MB-page allocations for the weights and the KV cache (shoal/worker/huge_pages.py)."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

from shoal.worker import huge_pages
from tests.worker.test_model_runner import PROMPTS, RunnerDriver, checkpoint, make_runner

__all__ = ["checkpoint"]  # the module fixture, shared with test_model_runner


def _thp_mode() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
    except OSError:
        return "never"
    return text.split("[", 1)[1].split("]", 1)[0]


def test_zeros_are_aligned_zeroed_and_outlive_their_mapping_handle() -> None:
    t = huge_pages.zeros_shaped((3, 1000, 700), torch.float16)
    assert t is not None and t.shape == (3, 1000, 700) and t.dtype == torch.float16
    assert t.data_ptr() % huge_pages.HUGE_PAGE == 0
    assert t.count_nonzero() == 0
    t[1, 2, 3] = 5.0
    view = t[1]
    del t
    gc.collect()  # the mapping must live as long as any view of it
    assert view[2, 3] == 5.0 and view.count_nonzero() == 1


@pytest.mark.skipif(_thp_mode() == "never", reason="transparent huge pages are off here")
def test_zeros_get_2mb_pages() -> None:
    def anon_huge_kb() -> int:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1])
        return 0

    before = anon_huge_kb()
    t = huge_pages.zeros(64 << 20)
    assert t is not None
    t.fill_(1)  # fault the pages in
    assert anon_huge_kb() - before >= 32 << 10  # at least half of the 64 MiB


def test_populate_faults_the_pages_in_at_allocation() -> None:
    """The KV cache is populated when allocated: touching it afterwards takes no page faults
    (left to first touch, 1 GiB took ~1.2 s of faults during the first requests)."""
    import resource

    def faults() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    t = huge_pages.zeros(32 << 20, populate=True)
    assert t is not None and t.count_nonzero() == 0
    before = faults()
    t[::4096].fill_(1)
    assert faults() - before < 8  # (a few for Python itself; 8192 pages untouched before)
    lazy = huge_pages.zeros(32 << 20)
    assert lazy is not None
    before = faults()
    lazy[::4096].fill_(1)
    assert faults() - before >= 16  # the control: without populate, touching faults


class _Holder(nn.Module):
    def __init__(self, shared: torch.Tensor) -> None:
        super().__init__()
        self.big = nn.Parameter(torch.randn(256, 256), requires_grad=False)  # 256 KiB
        self.small = nn.Parameter(torch.randn(8), requires_grad=False)
        self.register_buffer("table", torch.arange(40000, dtype=torch.int32))  # 156 KiB
        self.register_buffer("shared", shared)


def test_move_module_rebinds_large_tensors_into_one_arena() -> None:
    shared = torch.randn(200, 100)  # 78 KiB, held by both children
    model = nn.Sequential(_Holder(shared), _Holder(shared))
    before = {name: t.clone() for name, t in model.state_dict().items()}
    small_ptr = model[0].small.data_ptr()
    old_big = weakref.ref(model[0].big)
    moved = huge_pages.move_module(model)
    gc.collect()
    assert old_big() is None  # released once copied: memory peaks near one copy
    # big x2, table x2, shared once; each rounded up to 64 bytes.
    assert moved == 2 * 256 * 256 * 4 + 2 * 40000 * 4 + 200 * 100 * 4
    after = model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert model[0].small.data_ptr() == small_ptr  # below MIN_MOVED_BYTES: left alone
    assert isinstance(model[1].big, nn.Parameter) and not model[1].big.requires_grad
    assert model[0].shared is model[1].shared and model[0].shared.data_ptr() != shared.data_ptr()
    first = model[0].big.data_ptr()
    assert first % huge_pages.HUGE_PAGE == 0
    assert model[0].table.data_ptr() == first + 256 * 256 * 4  # in module order, packed


def test_runner_puts_weights_and_cache_in_huge_pages_with_the_same_tokens(
    checkpoint, monkeypatch
) -> None:
    _, path = checkpoint

    def tokens(enabled: str) -> tuple[dict, int]:
        monkeypatch.setenv("SHOAL_HUGE_PAGES", enabled)
        runner = make_runner(path)
        driver = RunnerDriver(runner, num_blocks=128, chunk=5)
        for req_id in "ab":
            driver.add(req_id, PROMPTS[req_id], temperature=0.0, max_tokens=6)
        done = driver.run()
        weights = [t.data_ptr() for t in (*runner.model.parameters(), *runner.model.buffers())]
        in_arena = any(p % huge_pages.HUGE_PAGE == 0 for p in weights)  # the first moved
        return {r: done[r].outputs for r in "ab"}, (runner.kv_cache.data_ptr(), in_arena)

    on, (kv_ptr, moved) = tokens("1")
    assert kv_ptr % huge_pages.HUGE_PAGE == 0 and moved
    off, _ = tokens("0")
    assert on == off


def test_move_module_peaks_near_one_copy() -> None:
    """Old tensors go as they are copied and the arena fills lazily: moving 256 MiB of
    weights raises the peak RSS by far less than a second copy (a fresh process, so the
    peak is this move's)."""
    import subprocess
    import sys

    script = """
import resource, torch
from torch import nn
from shoal.worker import huge_pages
m = nn.Sequential(*[nn.Linear(2048, 2048, bias=False) for _ in range(16)]).requires_grad_(False)
peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
assert huge_pages.move_module(m) == 16 * 2048 * 2048 * 4
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) // 1024)
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.split()[-1]) < 128  # MiB above the peak before; a second copy: 256
