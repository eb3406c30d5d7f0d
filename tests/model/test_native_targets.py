"""shoal/native's instruction-set levels give the same bits: each AVX-512 level this CPU runs
(`avx512`: VNNI integer products; `avx512bf16`: and the bf16-filtered LM head) against the
AVX2 level (`-march=x86-64-v3`, what a machine without AVX-512 runs). setup.py compiles every
level at install (shoal/native/variants.py), so this loads them side by side.

The kernels promise results that depend on the row alone, never on the batch, the thread split
or the machine: the integer sums are exact whichever instructions form them (vpdpbusd or
vpmaddubsw + vpmaddwd), and every float is produced by a fixed sequence of operations. The
compiler can break the last part behind the source's back (it once split a scalar `s += a * b`
into a vector multiply and scalar adds under AVX-512 only, and float16 and float32 KV caches
stopped agreeing), so every kernel is compared on the same inputs.

A level this CPU cannot run is skipped (on an AVX2-only CPU, all of them).
"""

from __future__ import annotations

import pytest
import torch
from gguf.constants import GGMLQuantizationType
from gguf.quants import quantize

from shoal import native
from shoal.model.gguf_quant import Q4Linear
from shoal.model.int8 import Int8Linear
from shoal.native.variants import BY_NAME
from tests.model.test_native import _case


@pytest.fixture(scope="module", params=["avx512", "avx512bf16"])
def builds(request):
    """(an AVX-512 level's module, the AVX2 level's module)."""
    if not BY_NAME[request.param].runs_on(native.cpu_flags()):
        pytest.skip(f"this CPU does not run the {request.param} level")
    return native.load_variant(request.param), native.load_variant("avx2")


def test_each_level_uses_its_instructions(builds) -> None:
    here, avx2 = builds
    assert (avx2.vnni, avx2.bf16) == (False, False)
    assert here.vnni is True
    assert here.bf16 == here.__name__.endswith("avx512bf16")


def test_auto_picks_the_best_level_this_cpu_runs() -> None:
    variant, reason = native.choose_variant()
    assert reason is None and variant is not None
    flags = native.cpu_flags()
    expected = (
        "avx512bf16" if "avx512_bf16" in flags else "avx512" if "avx512_vnni" in flags else "avx2"
    )
    assert variant.name == expected


def _threads(fn, *args):
    """fn(*args) under 1 and 2 torch threads (the work split changes; the bits must not)."""
    saved = torch.get_num_threads()
    try:
        out = []
        for t in (1, 2):
            torch.set_num_threads(t)
            out.append(fn(*args))
        return out
    finally:
        torch.set_num_threads(saved)


ROWS = [1, 2, 3, 4, 5, 6, 7, 11, 16, 37, 41, 64, 130]


@pytest.mark.parametrize(
    ("n", "k", "outliers"),
    [(1003, 96, [7]), (576, 576, [1, 5, 100]), (960, 576, []), (576, 1536, [9, 10]), (50, 44, [])],
)
def test_int8_linear_and_its_argmax_agree_across_targets(builds, n, k, outliers) -> None:
    here, avx2 = builds
    g = torch.Generator().manual_seed(n + k)
    w, b = torch.randn(n, k, generator=g) * 0.05, torch.randn(n, generator=g)
    for bias in (None, b):
        lin = Int8Linear(w, bias, torch.tensor(outliers) if outliers else None)
        bufs = (lin.qweight, lin.w_scale, lin.w_colsum, lin.main_idx, lin.outlier_idx,
                lin.outlier_w, lin.bias)  # fmt: skip
        for m in ROWS:
            x = torch.randn(m, k, generator=g)
            ya = _threads(here.int8_linear, x, *bufs)
            yb = _threads(avx2.int8_linear, x, *bufs)
            assert all(torch.equal(y, yb[0]) for y in ya + yb), (m, bias is None)
            ia, ib = here.int8_linear_argmax(x, *bufs), avx2.int8_linear_argmax(x, *bufs)
            assert torch.equal(ia[0], ib[0]) and torch.equal(ia[1], ib[1]), m
            assert torch.equal(ia[0], ya[0].argmax(-1)), m


@pytest.mark.parametrize(("n", "k"), [(1003, 96), (576, 576), (960, 576), (576, 1536), (50, 64)])
def test_q4_linear_agrees_across_targets(builds, n, k) -> None:
    here, avx2 = builds
    g = torch.Generator().manual_seed(n * k)
    w = torch.randn(n, k, generator=g) * 0.05
    raw = torch.from_numpy(quantize(w.numpy(), GGMLQuantizationType.Q4_1))
    for bias in (None, torch.randn(n, generator=g)):
        lin = Q4Linear(raw, GGMLQuantizationType.Q4_1, k, bias)
        for m in ROWS:
            x = torch.randn(m, k, generator=g)
            ya = _threads(here.q4_linear, x, lin.packed, n, lin.bias)
            yb = _threads(avx2.q4_linear, x, lin.packed, n, lin.bias)
            assert all(torch.equal(y, yb[0]) for y in ya + yb), (m, bias is None)


@pytest.mark.parametrize("head_dim", [64, 72, 20])
@pytest.mark.parametrize("window", [0, 50])
def test_decode_attention_agrees_across_targets(builds, head_dim, window) -> None:
    """float32 and float16 caches; head dims taking the 32-wide, 8-wide and scalar paths."""
    here, avx2 = builds
    q, cache, table, lens = _case([1, 17, 40, 130, 300], seed=5, head_dim=head_dim, num_blocks=64)
    scale = head_dim**-0.5
    for c in (cache, cache.half()):
        got = [m.paged_decode_attention(q, c, table, lens, scale, window) for m in builds]
        assert torch.equal(got[0], got[1]), c.dtype


def test_elementwise_kernels_and_the_float_lm_head_agree_across_targets(builds) -> None:
    here, avx2 = builds
    g = torch.Generator().manual_seed(11)
    for width in (576, 100, 7):
        x, w = torch.randn(33, width, generator=g) * 3, torch.randn(width, generator=g)
        assert torch.equal(here.rms_norm(x, w, 1e-5), avx2.rms_norm(x, w, 1e-5)), width
        gu = torch.randn(33, 2 * width, generator=g) * 4
        assert torch.equal(here.silu_mul(gu), avx2.silu_mul(gu)), width

    heads, kv_heads, head_dim, n = 6, 2, 64, 40
    qkv = torch.randn(n, (heads + 2 * kv_heads) * head_dim, generator=g) * 4
    angles = torch.rand(n, 1, head_dim // 2, generator=g) * 100
    cos, sin = angles.cos(), angles.sin()
    slots = torch.randperm(48, generator=g)[:n]
    outs = []
    for mod in builds:
        rotated, cache = qkv.clone(), torch.zeros(2, 12, 4, kv_heads, head_dim)
        mod.rope_and_cache(rotated, cos, sin, cache, slots, heads, kv_heads, head_dim)
        outs.append((rotated, cache))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])

    weight = torch.randn(1003, 96, generator=g)
    x = torch.randn(13, 96, generator=g)
    ids = [m.lm_head_argmax(x, m.pack_lm_head(weight), 1003) for m in builds]
    assert torch.equal(ids[0][0], ids[1][0]) and torch.equal(ids[0][1], ids[1][1])
