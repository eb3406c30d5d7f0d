"""shoal/native: the paged decode-attention kernel against the torch path it replaces, its
batch invariance, and what happens when the kernels are unavailable."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from shoal import native
from shoal.model import attention
from shoal.native import variants

NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM, HEADS = 48, 16, 3, 64, 9


def _case(
    lens: list[int],
    seed: int = 0,
    head_dim: int = HEAD_DIM,
    heads=HEADS,
    kv_heads=KV_HEADS,
    num_blocks=NUM_BLOCKS,
):
    g = torch.Generator().manual_seed(seed)
    cache = torch.randn(2, num_blocks, BLOCK_SIZE, kv_heads, head_dim, generator=g)
    max_blocks = -(-max(lens) // BLOCK_SIZE)
    # Each request's own blocks scattered over the cache, rows padded with block 0; the table
    # is a column slice of a wider buffer (row stride != width), as the model runner passes it.
    table = torch.zeros(len(lens), max_blocks + 3, dtype=torch.int64)
    free = torch.randperm(num_blocks - 1, generator=g) + 1
    for r, n in enumerate(lens):
        blocks, free = free[: -(-n // BLOCK_SIZE)], free[-(-n // BLOCK_SIZE) :]
        table[r, : blocks.numel()] = blocks
    # q as the model has it: a strided view of the rotated [q | k] heads.
    q = torch.randn(len(lens), heads + kv_heads, head_dim, generator=g)[:, :heads]
    return q, cache, table[:, :max_blocks], torch.tensor(lens)


def _meta(table, lens, window=None) -> attention.AttentionMetadata:
    return attention.AttentionMetadata(
        slot_mapping=torch.zeros(0, dtype=torch.int64),
        num_decodes=len(lens),
        decode_block_table=table,
        decode_seq_lens=lens,
        block_size=BLOCK_SIZE,
        sliding_window=window,
    )


def _torch_path(q, cache, table, lens, window=None) -> torch.Tensor:
    # What a bf16 or CUDA cache takes.
    return attention.torch_decode_attention(q, cache, _meta(table, lens, window))


@pytest.mark.parametrize("window", [None, 5, 40])
def test_decode_attention_matches_the_torch_path(kernels, window) -> None:
    # 1 key, a partial block, exactly one block, vector tails (not multiples of 8), long.
    lens = [1, 7, 16, 23, 57, 300]
    q, cache, table, seq_lens = _case(lens)
    got = kernels.paged_decode_attention(q, cache, table, seq_lens, HEAD_DIM**-0.5, window or 0)
    ref = _torch_path(q, cache, table, seq_lens, window)
    assert got.shape == (len(lens), HEADS, HEAD_DIM)
    assert (got - ref).abs().max() < 2e-6
    # Keys past each request's length (the rest of its last block, the padding) are not
    # read: garbage there changes nothing.
    poisoned = cache.clone()
    for r, n in enumerate(lens):
        last = table[r, (n - 1) // BLOCK_SIZE]
        poisoned[:, last, (n - 1) % BLOCK_SIZE + 1 :] = float("nan")
    poisoned[:, 0] = float("nan")  # the padding block
    again = kernels.paged_decode_attention(
        q, poisoned, table, seq_lens, HEAD_DIM**-0.5, window or 0
    )
    assert torch.equal(again, got)


@pytest.mark.parametrize("window", [None, 3, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_attention_over_many_keys(kernels, window, dtype) -> None:
    """Over ~1 MB of keys and values a call also prefetches rows far ahead into L2, and the
    start of each thread's next request (its sliding window's start): same results as the
    torch path, and bit for bit what each request gets alone (under 1 MB: no far prefetch)."""
    lens = [1, 300, 5, 17, 250, 64, 700, 2, 129]
    q, cache, table, seq_lens = _case(lens, seed=4, num_blocks=128)
    cache = cache.to(dtype)
    assert sum(lens) * KV_HEADS * HEAD_DIM * cache.element_size() * 2 > 2**20
    scale = HEAD_DIM**-0.5
    got = kernels.paged_decode_attention(q, cache, table, seq_lens, scale, window or 0)
    torch.testing.assert_close(
        got, _torch_path(q, cache, table, seq_lens, window), rtol=1e-5, atol=1e-5
    )
    for r in range(len(lens)):
        alone = kernels.paged_decode_attention(
            q[r : r + 1], cache, table[r : r + 1], seq_lens[r : r + 1], scale, window or 0
        )
        assert torch.equal(alone[0], got[r]), r


@pytest.mark.parametrize(
    ("head_dim", "heads", "kv_heads"),
    [(128, HEADS, KV_HEADS), (72, HEADS, KV_HEADS), (20, HEADS, KV_HEADS), (64, 8, 2), (64, 5, 5)],
)
def test_decode_attention_other_head_dims(kernels, head_dim, heads, kv_heads) -> None:
    """Four 32-wide value slices (128); 4-key scores but the scalar value loop (72, not a
    multiple of 32); scalar scores and values (20, not a multiple of 8); keys in groups of 4
    plus a tail. Groups of 4 query heads per KV head (taken 3 + 1) and no grouping (MHA)."""
    lens = [1, 8, 9, 31, 130]
    q, cache, table, seq_lens = _case(lens, 2, head_dim, heads, kv_heads)
    got = kernels.paged_decode_attention(q, cache, table, seq_lens, head_dim**-0.5, 0)
    ref = _torch_path(q, cache, table, seq_lens)
    assert got.shape == (len(lens), heads, head_dim)
    assert (got - ref).abs().max() < 2e-6


def test_decode_attention_is_batch_invariant(kernels) -> None:
    lens = [3, 200, 17, 64, 1, 99]
    q, cache, table, seq_lens = _case(lens, seed=1)
    full = kernels.paged_decode_attention(q, cache, table, seq_lens, 0.125, 0)
    for r in range(len(lens)):
        alone = kernels.paged_decode_attention(
            q[r : r + 1], cache, table[r : r + 1], seq_lens[r : r + 1], 0.125, 0
        )
        assert torch.equal(alone[0], full[r]), r
    torch.set_num_threads(1)
    try:
        assert torch.equal(
            kernels.paged_decode_attention(q, cache, table, seq_lens, 0.125, 0), full
        )
    finally:
        torch.set_num_threads(2)


@pytest.mark.parametrize("head_dim", [HEAD_DIM, 20])
def test_decode_attention_over_a_float16_cache(kernels, head_dim) -> None:
    """A float16 cache (`--kv-cache-dtype float16`) gives bit for bit what the float32 kernel
    gives over the same values widened, and the torch fallback agrees with it."""
    q, cache, table, lens = _case([1, 17, 40, 130], seed=3, head_dim=head_dim)
    half, scale = cache.half(), head_dim**-0.5
    got = kernels.paged_decode_attention(q, half, table, lens, scale, 0)
    assert torch.equal(got, kernels.paged_decode_attention(q, half.float(), table, lens, scale, 0))
    torch.testing.assert_close(got, _torch_path(q, half, table, lens), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="float32 or float16"):
        kernels.paged_decode_attention(q, cache.bfloat16(), table, lens, scale, 0)


def test_model_decode_uses_the_kernel_for_float32_cpu_only(kernels) -> None:
    """The process's ops table is the native one; its decode attention runs the kernel for
    float32 queries on CPU, and neither for bf16 nor with SHOAL_NATIVE_ATTENTION=0."""
    from shoal.model.ops import NativeOps, model_ops

    ops = model_ops()
    assert isinstance(ops, NativeOps) and ops.kernels is kernels
    calls: list[int] = []

    class Spy:  # the kernels, counting decode attention calls
        def __getattr__(self, name: str):
            return getattr(kernels, name)

        def paged_decode_attention(self, q, *args):
            calls.append(q.shape[0])
            return kernels.paged_decode_attention(q, *args)

    q, cache, table, seq_lens = _case([5, 9])
    got = NativeOps(Spy()).decode_attention(q, cache, _meta(table, seq_lens))
    assert calls == [2]
    assert torch.equal(got, kernels.paged_decode_attention(q, cache, table, seq_lens, 0.125, 0))
    NativeOps(Spy()).decode_attention(q.bfloat16(), cache.bfloat16(), _meta(table, seq_lens))
    NativeOps(Spy(), attention=False).decode_attention(q, cache, _meta(table, seq_lens))
    assert calls == [2]


def test_kernels_disabled_and_int8_says_why(tmp_path) -> None:
    """SHOAL_NATIVE=0: load() gives None with the reason, the model's ops table is the torch
    one, and --quantization int8 fails with a message naming the flag."""
    code = """
import torch
from shoal import native
from shoal.model.int8 import Int8Linear
from shoal.model.ops import ModelOps, model_ops
assert native.load() is None and native.unavailable_reason() == "disabled by SHOAL_NATIVE=0"
assert type(model_ops()) is ModelOps
try:
    Int8Linear(torch.zeros(4, 32), None)
except ValueError as e:
    print(e)
"""
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**__import__("os").environ, "SHOAL_NATIVE": "0"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "--quantization int8 needs shoal's native CPU kernels" in out.stdout
    assert "SHOAL_NATIVE=0" in out.stdout


@pytest.mark.parametrize("name", [*variants.SOURCES, *variants.HEADERS])
def test_a_module_built_from_other_sources_is_refused(tmp_path, monkeypatch, kernels, name) -> None:
    """Every source and header is part of the hash compiled into the module: after an edit
    that was not rebuilt, load_variant refuses the stale module and says how to rebuild."""
    for f in (*variants.SOURCES, *variants.HEADERS):
        (tmp_path / f).write_bytes((variants.HERE / f).read_bytes())
    (tmp_path / name).write_bytes((variants.HERE / name).read_bytes() + b"\n// edited\n")
    level = native.loaded_variant()
    assert level is not None
    variant = variants.BY_NAME[level]
    assert variants.source_hash(variant, torch.__version__) == kernels.source_hash
    assert variants.source_hash(variant, torch.__version__, tmp_path) != kernels.source_hash
    monkeypatch.setattr(native, "source_hash", lambda v, t: variants.source_hash(v, t, tmp_path))
    with pytest.raises(ImportError, match="built from other sources or another torch") as e:
        native.load_variant(level)
    assert "python -m shoal.native build" in str(e.value)


def _load_in_child(env: dict[str, str]) -> tuple[str | None, str | None]:
    code = "from shoal import native; native.load(); print(native.loaded_variant()); print(native.unavailable_reason())"
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    level, reason = out.stdout.splitlines()[-2:]
    return (None if level == "None" else level), (None if reason == "None" else reason)


def test_shoal_native_isa_picks_a_level_or_says_why_not() -> None:
    assert _load_in_child({"SHOAL_NATIVE_ISA": "avx2"}) == ("avx2", None)
    assert _load_in_child({"SHOAL_NATIVE_MARCH": "x86-64-v3"}) == ("avx2", None)
    level, reason = _load_in_child({"SHOAL_NATIVE_ISA": "sse9"})
    assert level is None and reason is not None
    assert "SHOAL_NATIVE_ISA='sse9' is not one of auto, avx512bf16, avx512, avx2" in reason
    lacking = [v for v in variants.VARIANTS if not v.runs_on(native.cpu_flags())]
    if lacking:
        level, reason = _load_in_child({"SHOAL_NATIVE_ISA": lacking[0].name})
        assert level is None and "this CPU lacks" in (reason or "")


def _binding_types(doc: str) -> str:
    """A pybind11 signature line in the Protocol's spelling."""
    for long, short in (
        ("typing.SupportsInt | typing.SupportsIndex", "int"),
        ("typing.SupportsFloat | typing.SupportsIndex", "float"),
        ("collections.abc.", ""),
        ("torch.Tensor", "Tensor"),
    ):
        doc = doc.replace(long, short)
    return doc


def test_the_typed_protocol_is_every_built_level_s_bindings(kernels) -> None:
    """`shoal.native.api.NativeKernels`, which mypy checks every kernel call against, lists
    exactly the functions of each level built for this CPU, with their argument and return
    types, and their attributes."""
    import inspect

    from shoal.native.api import NativeKernels

    protocol = {
        name: inspect.signature(fn)
        for name, fn in vars(NativeKernels).items()
        if callable(fn) and not name.startswith("_")
    }
    for variant in variants.VARIANTS:
        if not variant.runs_on(native.cpu_flags()):
            continue
        module = native.load_variant(variant.name)
        public = {name: getattr(module, name) for name in dir(module) if not name.startswith("_")}
        assert {name for name, v in public.items() if callable(v)} == set(protocol)
        assert {name for name, v in public.items() if not callable(v)} == {
            "bf16", "vnni", "source_hash",
        }  # fmt: skip
        assert isinstance(module.bf16, bool) and isinstance(module.vnni, bool)
        for name, sig in protocol.items():
            params = list(sig.parameters.values())[1:]  # past self
            assert all(p.kind is p.POSITIONAL_ONLY for p in params), name
            args = ", ".join(f"arg{i}: {p.annotation}" for i, p in enumerate(params))
            expected = f"{name}({args}) -> {sig.return_annotation}"
            assert _binding_types(public[name].__doc__.splitlines()[0]) == expected


@pytest.mark.parametrize(
    "quantization, overrides",
    [
        (None, {}),
        ("int8", {}),
        (None, {"architectures": ["Qwen2ForCausalLM"]}),  # q/k/v bias
        ("int8", {"attention_bias": True}),  # q/k/v and o biases
        (None, {"architectures": ["MistralForCausalLM"], "sliding_window": 6}),
        (None, {"hidden_size": 40}),  # head_dim 10: the scalar tails of RoPE and attention
        (None, {"kv_dtype": torch.float16}),
        ("int8", {"kv_dtype": torch.float16, "hidden_size": 40}),
    ],
)
def test_fused_decode_layers_are_bit_identical_to_the_python_layers(
    kernels, tmp_path, quantization, overrides
) -> None:
    """`decode_layers` (every layer of a decode-only step in one native call) gives exactly
    what `DecoderLayer.forward` gives, for float32 and int8 linears, biases, a window and a
    float16 KV cache."""
    from tests.model.paged import assert_fused_decode_matches_python, tiny_model

    overrides = dict(overrides)
    kv_dtype = overrides.pop("kv_dtype", None)
    model, arch = tiny_model(tmp_path, quantization, **overrides)
    assert_fused_decode_matches_python(model, arch, kernels, kv_dtype)


# -- elementwise steps ---------------------------------------------------------------------------


@pytest.mark.parametrize("width", [576, 13, 8, 1])
def test_rms_norm_and_silu_mul_match_torch_and_are_batch_invariant(kernels, width) -> None:
    g = torch.Generator().manual_seed(width)
    x = torch.randn(37, width, generator=g) * 3
    w = torch.randn(width, generator=g)
    torch.testing.assert_close(
        kernels.rms_norm(x, w, 1e-5), torch.nn.functional.rms_norm(x, (width,), w, 1e-5),
        rtol=1e-5, atol=1e-5,
    )  # fmt: skip
    gu = torch.randn(37, 2 * width, generator=g) * 8  # gates far into both tails
    gu[0, :width] = torch.tensor([-200.0, 200.0, 0.0, -0.0, 1e-30, -1e-30, 88.0, -88.0])[
        torch.arange(width) % 8
    ]
    gate, up = gu.chunk(2, dim=-1)
    got = kernels.silu_mul(gu)
    assert got.shape == (37, width) and torch.isfinite(got).all()
    torch.testing.assert_close(got, torch.nn.functional.silu(gate) * up, rtol=2e-6, atol=1e-6)
    saved = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            norm, act = kernels.rms_norm(x, w, 1e-5), kernels.silu_mul(gu)
            for r in (0, 17, 36):  # a row alone gets the batch's bits
                assert torch.equal(kernels.rms_norm(x[r : r + 1], w, 1e-5), norm[r : r + 1])
                assert torch.equal(kernels.silu_mul(gu[r : r + 1]), act[r : r + 1])
    finally:
        torch.set_num_threads(saved)
    with pytest.raises(RuntimeError, match="weight size"):
        kernels.rms_norm(x, w[:-1] if width > 1 else torch.ones(2), 1e-5)


@pytest.mark.parametrize("head_dim", [64, 10])
def test_rope_and_cache_is_bit_identical_to_apply_rope_and_write_kv(kernels, head_dim) -> None:
    """The decode layers' fused RoPE + cache write: the same rotation bits as the Python
    layers' `apply_rope` (two products and a difference, no FMA) and the same cache rows."""
    from shoal.model.rotary import apply_rope

    heads, kv_heads, n = 6, 2, 40  # > 8 rows: the threaded path of parallel_for too
    g = torch.Generator().manual_seed(head_dim)
    qkv = torch.randn(n, (heads + 2 * kv_heads) * head_dim, generator=g) * 4
    angles = torch.rand(n, 1, head_dim // 2, generator=g) * 100
    cos, sin = angles.cos(), angles.sin()
    cache = torch.zeros(2, 12, 4, kv_heads, head_dim)
    slots = torch.randperm(48, generator=g)[:n]
    expected_cache = cache.clone()
    qk = apply_rope(qkv[:, : (heads + kv_heads) * head_dim].view(n, -1, head_dim), cos, sin)
    v = qkv[:, (heads + kv_heads) * head_dim :].view(n, kv_heads, head_dim)
    attention.write_kv(expected_cache, qk[:, heads:], v, slots)

    saved = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            rotated, cache[:] = qkv.clone(), 0
            kernels.rope_and_cache(rotated, cos, sin, cache, slots, heads, kv_heads, head_dim)
            q = rotated[:, : heads * head_dim].view(n, heads, head_dim)
            assert torch.equal(q, qk[:, :heads])
            assert torch.equal(cache, expected_cache)
            half = cache.half().zero_()  # a float16 cache gets the same rows, rounded
            kernels.rope_and_cache(qkv.clone(), cos, sin, half, slots, heads, kv_heads, head_dim)
            assert torch.equal(half, expected_cache.half())
    finally:
        torch.set_num_threads(saved)
    with pytest.raises(RuntimeError, match="slot out of range"):
        kernels.rope_and_cache(qkv.clone(), cos, sin, cache, slots + 60, heads, kv_heads, head_dim)


# -- greedy LM head ----------------------------------------------------------------------------


def _argmax_case(vocab: int, hidden: int, rows: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(vocab, hidden, generator=g), torch.randn(rows, hidden, generator=g)


@pytest.mark.parametrize(("vocab", "hidden"), [(1000, 64), (37, 13), (100, 7), (4099, 576)])
def test_lm_head_argmax_matches_logits_argmax(kernels, vocab, hidden) -> None:
    w, x = _argmax_case(vocab, hidden, rows=13)
    ids, vals = kernels.lm_head_argmax(x, kernels.pack_lm_head(w), vocab)
    logits = torch.nn.functional.linear(x, w)
    top2 = logits.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-3  # rows whose winner no rounding can change
    assert clear.sum() >= 10
    assert torch.equal(ids[clear], logits.argmax(-1)[clear])
    torch.testing.assert_close(vals, top2[:, 0], rtol=1e-5, atol=1e-4)
    picked = logits.gather(1, ids.unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(picked, top2[:, 0], rtol=1e-5, atol=1e-4)


def test_lm_head_argmax_ties_padding_and_threads(kernels) -> None:
    vocab, hidden = 4099, 32  # 4099 = 256 panels of 16 + 3: a zero-padded last panel
    w, x = _argmax_case(vocab, hidden, rows=7, seed=1)
    # Every logit negative: the padded lanes (logit 0) must never win.
    w, x = -w.abs(), x.abs()
    ids, vals = kernels.lm_head_argmax(x, kernels.pack_lm_head(w), vocab)
    assert (vals < 0).all() and (ids < vocab).all()
    assert torch.equal(ids, torch.nn.functional.linear(x, w).argmax(-1))
    # Exact ties (identical rows) in the same panel, another panel and the last thread's
    # chunk: the lowest id wins, as torch.argmax's first index.
    w[[5, 9, 2000, 4098]] = x[0] * 10
    packed = kernels.pack_lm_head(w)
    saved = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            ids, vals = kernels.lm_head_argmax(x, packed, vocab)
            assert ids[0].item() == 5
            # Batch invariance: each row alone gives the batch's id and the same bits.
            for r in range(len(x)):
                alone_id, alone_val = kernels.lm_head_argmax(x[r : r + 1], packed, vocab)
                assert alone_id.item() == ids[r].item()
                assert torch.equal(alone_val, vals[r : r + 1])
    finally:
        torch.set_num_threads(saved)
    with pytest.raises(RuntimeError, match="hidden size"):
        kernels.lm_head_argmax(x[:, :16], packed, vocab)


def _bf16_head(w: torch.Tensor):
    from shoal.model.ops import pack_lm_head_bf16

    return pack_lm_head_bf16(w)


@pytest.mark.parametrize(
    ("vocab", "hidden", "rows"), [(49152, 64, 64), (4099, 576, 37), (37, 13, 5), (1000, 63, 16)]
)
def test_lm_head_argmax_bf16_is_lm_head_argmax(kernels, vocab, hidden, rows) -> None:
    """The bf16 filter's ids and max logits are the exact kernel's, bit for bit: every row, a
    partial last panel, an odd hidden size (a zero-padded pair), 1-3 threads. Where this
    build has no AVX512_BF16 the call is the exact kernel."""
    w, x = _argmax_case(vocab, hidden, rows=rows, seed=vocab)
    x[1] *= 1e4  # a large row and a tiny one: the bound scales with |x|
    x[2] *= 1e-6
    packed, bf16 = kernels.pack_lm_head(w), _bf16_head(w)
    expected = kernels.lm_head_argmax(x, packed, vocab)
    saved = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            ids, vals = kernels.lm_head_argmax_bf16(x, *bf16, packed, vocab)
            assert torch.equal(ids, expected[0]), threads
            assert torch.equal(vals, expected[1]), threads
    finally:
        torch.set_num_threads(saved)


def test_lm_head_argmax_bf16_near_ties_exact_ties_and_bad_rows(kernels) -> None:
    """Logits closer than bf16 can tell apart go to the exact recheck (the winner is the
    float32 one, not the bf16 one); exact ties go to the lowest id; a row with inf or NaN
    gives what the exact kernel gives."""
    vocab, hidden = 4099, 96
    w, x = _argmax_case(vocab, hidden, rows=6, seed=7)
    # Rows 100 and 3000 point along x[0] and are equal in bf16 (bf16 values, one of them
    # nudged by 2^-12 of itself, under half a bf16 step), but 3000's float32 logit is larger.
    # 700 and 701 are exact copies along x[1].
    base = (x[0] * 3).to(torch.bfloat16).float()
    w[100], w[3000] = base, base
    w[3000, 5] += base[5].abs() * 2**-12 * torch.sign(x[0, 5])
    assert torch.equal(w[3000].to(torch.bfloat16), w[100].to(torch.bfloat16))
    w[[700, 701]] = x[1] * 3
    x[4, 3] = float("inf")
    x[5, 7] = float("nan")
    packed, bf16 = kernels.pack_lm_head(w), _bf16_head(w)
    ids, vals = kernels.lm_head_argmax_bf16(x, *bf16, packed, vocab)
    expected = kernels.lm_head_argmax(x, packed, vocab)
    assert torch.equal(ids, expected[0])
    torch.testing.assert_close(vals, expected[1], rtol=0, atol=0, equal_nan=True)
    assert ids[0].item() == 3000 and ids[1].item() == 700


def test_kernels_release_the_gil(kernels) -> None:
    """A Python thread woken just before a kernel call runs while the kernel computes (the
    engine's ZMQ threads must not wait out a step). Holding the GIL, the kernel would keep
    the woken thread out until it returned."""
    import sys
    import threading
    import time

    w, x = _argmax_case(49152, 576, rows=64)
    packed = kernels.pack_lm_head(w)
    go, ran_at = threading.Event(), []
    thread = threading.Thread(target=lambda: (go.wait(), ran_at.append(time.perf_counter())))
    thread.start()
    interval = sys.getswitchinterval()
    sys.setswitchinterval(10.0)  # no forced hand-over before the call starts
    try:
        go.set()
        kernels.lm_head_argmax(x, packed, 49152)  # ~50-100 ms
        returned_at = time.perf_counter()
    finally:
        sys.setswitchinterval(interval)
        thread.join()
    assert ran_at[0] < returned_at


def test_float16_cache_prefill_attends_to_rounded_keys(tmp_path) -> None:
    """With a float16 cache a prompt's own chunk attends to its keys rounded as the cache
    holds them, so splitting its prefill changes the logits only at float32 rounding level
    (measured: not at all here), not at float16's (unrounded keys of the own chunk but rounded
    ones of earlier chunks: 9e-5 of the largest logit here)."""
    from tests.model.paged import PagedDriver, tiny_model

    model, arch = tiny_model(tmp_path, None)
    prompt = list(range(3, 43))

    def last_logits(chunks: list[int]) -> torch.Tensor:
        driver = PagedDriver(model, arch, 32, 4, torch.float16)
        driver.add("a", prompt)
        return [driver.step({"a": c})["a"][-1] for c in chunks][-1]

    whole, split = last_logits([40]), last_logits([25, 15])
    assert (whole - split).abs().max() <= 1e-5 * whole.abs().max()
