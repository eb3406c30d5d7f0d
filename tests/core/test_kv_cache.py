"""Block pool and KV cache manager: ref counts, LRU eviction, hash chains, prefix-cache hits."""

from __future__ import annotations

import pytest
from core_fakes import FakeRunner, make_request, make_scheduler, run_all, step, tokens_of

from shoal.core.block_pool import BlockPool, hash_block_tokens
from shoal.core.kv_cache import KVCacheManager

BS = 4


def test_hash_chain_depends_on_the_whole_prefix() -> None:
    a = hash_block_tokens(None, [1, 2, 3, 4])
    assert a == hash_block_tokens(None, [1, 2, 3, 4])
    assert hash_block_tokens(a, [5, 6, 7, 8]) != hash_block_tokens(None, [5, 6, 7, 8])
    b = hash_block_tokens(None, [1, 2, 3, 5])
    assert hash_block_tokens(a, [5, 6, 7, 8]) != hash_block_tokens(b, [5, 6, 7, 8])
    assert len(a) == 32


def test_pool_allocate_free_and_ref_counts() -> None:
    pool = BlockPool(4)
    got = pool.allocate(3)
    assert got == [0, 1, 2] and pool.num_free_blocks == 1
    pool.check_integrity([got])
    pool.touch([1])  # a second table shares block 1
    pool.check_integrity([got, [1]])
    pool.free(reversed(got))
    pool.check_integrity([[1]])
    assert pool.num_free_blocks == 3
    pool.free([1])
    pool.check_integrity([])
    assert pool.usage() == 0.0


def test_pool_prefers_uncached_blocks_then_evicts_least_recently_freed() -> None:
    pool = BlockPool(4)
    blocks = pool.allocate(4)
    for i, b in enumerate(blocks[:3]):
        assert pool.cache_block(b, bytes([i]) * 32)
    pool.free([blocks[2], blocks[0], blocks[3], blocks[1]])  # LRU order of cached: 2, 0, 1
    pool.check_integrity([])
    assert pool.allocate(1) == [blocks[3]]  # the uncached one first
    assert pool.get_cached_block(bytes([2]) * 32) == blocks[2]
    assert pool.allocate(1) == [blocks[2]]  # then the least recently freed cached one
    assert pool.get_cached_block(bytes([2]) * 32) is None and pool.num_evictions == 1
    pool.touch([blocks[0]])  # a hit revives block 0: 1 is now the only evictable one
    assert pool.allocate(1) == [blocks[1]]
    pool.check_integrity([[blocks[3]], [blocks[2]], [blocks[0]], [blocks[1]]])


def test_pool_keeps_one_block_per_hash() -> None:
    pool = BlockPool(2)
    a, b = pool.allocate(2)
    assert pool.cache_block(a, b"h" * 32)
    assert not pool.cache_block(b, b"h" * 32)
    pool.free([a, b])
    pool.check_integrity([])
    assert pool.num_cached_blocks == 1


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda p: setattr(p.blocks[0], "ref_cnt", 2),
        lambda p: p._free_uncached.append(0),
        lambda p: setattr(p.blocks[3], "block_hash", b"x" * 32),
        lambda p: p._cached.__setitem__(b"y" * 32, 3),
        lambda p: p._free_uncached.remove(3),
    ],
)
def test_check_integrity_catches_corruption(corrupt) -> None:
    pool = BlockPool(4)
    table = pool.allocate(2)
    pool.check_integrity([table])
    corrupt(pool)
    with pytest.raises(AssertionError):
        pool.check_integrity([table])


def test_allocate_slots_returns_none_and_changes_nothing_when_full() -> None:
    kv = KVCacheManager(num_blocks=3, block_size=BS)
    a = make_request("a", [1] * 9)
    assert kv.allocate_slots(a, 9) is not None  # 3 blocks
    b = make_request("b", [2] * 2)
    assert kv.allocate_slots(b, 2) is None
    assert "b" not in kv.block_tables
    kv.check_integrity()
    kv.free(a)
    assert kv.allocate_slots(b, 2) is not None
    kv.check_integrity()


def test_prefix_hits_never_cover_the_whole_prompt() -> None:
    sched, runner = make_scheduler(), FakeRunner(BS)
    prompt = list(range(16))  # exactly 4 full blocks
    sched.add_request(make_request("a", prompt, max_tokens=1))
    run_all(sched, runner)
    sched.add_request(make_request("b", prompt, max_tokens=1))
    so, outs = step(sched, runner)
    assert so.scheduled_new_reqs[0].num_computed_tokens == 12
    assert so.num_scheduled_tokens == {"b": 4}
    assert outs[0].num_cached_tokens == 12
    stats = sched.get_stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (16, 12)


def test_shared_prefix_hits_stop_at_the_first_different_block() -> None:
    sched, runner = make_scheduler(), FakeRunner(BS)
    base = list(range(20))
    sched.add_request(make_request("a", base, max_tokens=2))
    run_all(sched, runner)
    # Same blocks 0-1, a different block 2, then blocks equal to a's blocks 3-4: the chain
    # makes those later blocks misses.
    other = base[:8] + [99, 98, 97, 96] + base[12:] + [5]
    sched.add_request(make_request("b", other, max_tokens=2))
    so, _ = step(sched, runner)
    assert so.scheduled_new_reqs[0].num_computed_tokens == 8
    results = run_all(sched, runner)
    ref = make_scheduler()
    ref.add_request(make_request("b", other, max_tokens=2))
    assert tokens_of(results["b"]) == tokens_of(run_all(ref, FakeRunner(BS))["b"])[1:]


def test_blocks_filled_by_generated_tokens_are_cached() -> None:
    sched, runner = make_scheduler(), FakeRunner(BS)
    prompt = [1, 2, 3, 4, 5, 6]
    sched.add_request(make_request("a", prompt, max_tokens=10))
    generated = tokens_of(run_all(sched, runner)["a"])
    # a computed 6 + 9 tokens (its last sampled token never was): 3 full blocks cached.
    follow_up = prompt + generated + [7, 7]
    sched.add_request(make_request("b", follow_up, max_tokens=1))
    so, _ = step(sched, runner)
    assert so.scheduled_new_reqs[0].num_computed_tokens == 12


def test_same_prompt_requests_share_full_blocks_with_ref_counts() -> None:
    sched, runner = make_scheduler(max_num_batched_tokens=32), FakeRunner(BS)
    prompt = list(range(30, 43))  # 13 tokens: 3 full blocks + 1
    sched.add_request(make_request("a", prompt, max_tokens=6))
    step(sched, runner)  # a's prompt is computed and its full blocks registered
    sched.add_request(make_request("b", prompt, max_tokens=6))
    sched.add_request(make_request("c", prompt, max_tokens=6))
    step(sched, runner)
    tables = {rid: sched.kv.get_block_ids(rid) for rid in "abc"}
    assert tables["a"][:3] == tables["b"][:3] == tables["c"][:3]
    assert len({tables["a"][3], tables["b"][3], tables["c"][3]}) == 3
    for b in tables["a"][:3]:
        assert sched.kv.pool.blocks[b].ref_cnt == 3
    results = run_all(sched, runner)
    assert tokens_of(results["b"]) == tokens_of(results["c"])
    assert sched.kv.num_free_blocks == sched.kv.num_blocks
    for b in tables["a"][:3]:
        assert sched.kv.pool.blocks[b].ref_cnt == 0
        assert sched.kv.pool.blocks[b].block_hash is not None  # still cached while free


def test_same_prompt_arriving_together_computes_the_prompt_once() -> None:
    # The n > 1 case: the front end adds n requests with one prompt at once. The second
    # waits one step for the first one's blocks instead of computing them again.
    sched, runner = make_scheduler(max_num_batched_tokens=64), FakeRunner(BS)
    prompt = list(range(50, 61))  # 11 tokens: 2 full blocks + 3
    for rid in ["a", "b", "c"]:
        sched.add_request(make_request(rid, prompt, max_tokens=3))
    so, _ = step(sched, runner)
    assert so.num_scheduled_tokens == {"a": 11}
    so, _ = step(sched, runner)
    assert so.num_scheduled_tokens == {"a": 1, "b": 3, "c": 3}
    assert [n.num_computed_tokens for n in so.scheduled_new_reqs] == [8, 8]
    results = run_all(sched, runner)
    assert tokens_of(results["b"]) == tokens_of(results["c"])


def test_lru_evicts_older_prefixes_first_and_their_tails_first() -> None:
    # 6 blocks; each request holds 3 (9 prompt tokens + 1 computed output) and leaves its 2
    # full blocks cached when it finishes.
    sched, runner = make_scheduler(num_blocks=6, max_model_len=24), FakeRunner(BS)
    prompts = {rid: [i] * 9 for i, rid in enumerate(["p", "q", "r"], start=1)}
    for rid in ["p", "q"]:
        sched.add_request(make_request(rid, prompts[rid], max_tokens=2, max_model_len=24))
        run_all(sched, runner)
    assert sched.kv.pool.num_cached_blocks == 4
    # r needs 3 blocks: 2 never-cached ones, then one eviction: p's (freed before q's)
    # last block (a request's tail is freed first).
    sched.add_request(make_request("r", prompts["r"], max_tokens=2, max_model_len=24))
    run_all(sched, runner)
    assert sched.kv.pool.num_evictions == 1
    sched.add_request(make_request("q2", prompts["q"], max_tokens=1, max_model_len=24))
    so, _ = step(sched, runner)
    assert so.scheduled_new_reqs[0].num_computed_tokens == 8  # q's blocks survived
    run_all(sched, runner)
    sched.add_request(make_request("p2", prompts["p"], max_tokens=1, max_model_len=24))
    so, _ = step(sched, runner)
    assert so.scheduled_new_reqs[0].num_computed_tokens == 4  # p kept only its first block


def test_prefix_caching_disabled_never_hits() -> None:
    sched, runner = make_scheduler(prefix_caching=False), FakeRunner(BS)
    for rid in ["a", "b"]:
        sched.add_request(make_request(rid, list(range(12)), max_tokens=2))
        so, _ = step(sched, runner)
        assert so.scheduled_new_reqs[0].num_computed_tokens == 0
        run_all(sched, runner)
    assert sched.kv.pool.num_cached_blocks == 0
    assert sched.get_stats().prefix_cache_queries == 0
