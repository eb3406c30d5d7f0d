"""EngineCore with the real ModelRunner and a tiny random-weight Llama (load_format="dummy").

Greedy outputs must not depend on how requests are batched, chunked, prefix-cached or
preempted.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable

import pytest

from shoal.config import CacheConfig, ModelConfig, SchedulerConfig, ShoalConfig
from shoal.protocol import EngineCoreRequest, FinishReason
from shoal.sampling_params import SamplingParams
from tests.helpers import TINY_LLAMA_CONFIG

pytest.importorskip("torch")
pytest.importorskip("shoal.worker.model_runner")

from shoal.engine.core import EngineCore  # noqa: E402

VOCAB = 384
TINY_CONFIG = {**TINY_LLAMA_CONFIG, "vocab_size": VOCAB, "max_position_embeddings": 256}
BLOCK_SIZE = 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("tiny-llama")
    (path / "config.json").write_text(json.dumps(TINY_CONFIG))
    return str(path)


def make_core(
    model_dir: str,
    *,
    num_blocks: int | None = 256,
    budget: int = 256,
    max_num_seqs: int = 16,
    prefix_caching: bool = True,
    max_model_len: int | None = 128,
    kv_cache_memory_bytes: int = 1 << 20,
) -> EngineCore:
    return EngineCore(
        ShoalConfig(
            model=ModelConfig(model=model_dir, load_format="dummy", max_model_len=max_model_len),
            cache=CacheConfig(
                block_size=BLOCK_SIZE,
                num_blocks=num_blocks,
                enable_prefix_caching=prefix_caching,
                kv_cache_memory_bytes=kv_cache_memory_bytes,
            ),
            scheduler=SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_num_seqs),
        )
    )


def request(
    req_id: str, prompt: list[int], eos_token_id: int | None = None, **params: object
) -> EngineCoreRequest:
    params = {"temperature": 0.0, "max_tokens": 8, **params}
    return EngineCoreRequest(
        request_id=req_id,
        prompt_token_ids=prompt,
        sampling_params=SamplingParams(**params),  # type: ignore[arg-type]
        eos_token_id=eos_token_id,
        arrival_time=time.time(),
    )


def run(core: EngineCore, reqs: Iterable[EngineCoreRequest], max_steps: int = 2000) -> dict:
    """Add `reqs`, step to completion (integrity checked every step); returns
    {id: (tokens, last output)} and stashes the steps' stats and each request's
    num_cached_tokens (reported with its first output) on the core."""
    for r in reqs:
        core.add_request(r)
    tokens: dict[str, list[int]] = {}
    last: dict = {}
    core.stats_seen = []  # type: ignore[attr-defined]
    core.num_cached = {}  # type: ignore[attr-defined]
    for _ in range(max_steps):
        if not core.has_unfinished_requests():
            break
        out = core.step()
        core.scheduler.check_integrity()
        core.stats_seen.append(out.scheduler_stats)  # type: ignore[attr-defined]
        for o in out.outputs:
            if o.request_id not in tokens:
                core.num_cached[o.request_id] = o.num_cached_tokens  # type: ignore[attr-defined]
            tokens.setdefault(o.request_id, []).extend(o.new_token_ids)
            last[o.request_id] = o
    else:
        raise AssertionError("engine did not finish")
    assert core.scheduler.kv.num_free_blocks == core.num_blocks
    return {rid: (tokens[rid], last[rid]) for rid in last}


PROMPTS = {
    "a": [5, 17, 33, 90, 4, 250, 11, 12, 13, 14, 15, 16, 200],
    "b": [7, 8, 9],
    "c": [100 + i for i in range(30)],
    "d": [5, 17, 33, 90, 4, 250, 11, 12, 99, 98],  # shares a's first 2 blocks
}


@pytest.fixture(scope="module")
def reference(model_dir: str) -> dict[str, list[int]]:
    """Each prompt run alone, without prefix caching, on a roomy engine."""
    core = make_core(model_dir, prefix_caching=False)
    return {rid: run(core, [request(rid, p, max_tokens=10)])[rid][0] for rid, p in PROMPTS.items()}


def _all(**params: object) -> list[EngineCoreRequest]:
    return [request(rid, p, max_tokens=10, **params) for rid, p in PROMPTS.items()]


def test_engine_exposes_its_capacity(model_dir: str) -> None:
    core = make_core(model_dir, num_blocks=40, max_model_len=None)
    assert (core.num_blocks, core.block_size) == (40, BLOCK_SIZE)
    assert core.max_model_len == 160  # 256 positions, capped by 40 blocks of 4
    sized = make_core(model_dir, num_blocks=None, kv_cache_memory_bytes=1 << 20)
    assert sized.num_blocks == sized.model_runner.num_blocks_for_memory(1 << 20) > 0
    assert sized.max_model_len == 128


def test_greedy_outputs_are_identical_alone_and_batched(model_dir, reference) -> None:
    results = run(make_core(model_dir), _all())
    assert {rid: toks for rid, (toks, _) in results.items()} == reference
    assert all(o.finish_reason == FinishReason.LENGTH for _, o in results.values())


def test_greedy_outputs_identical_with_chunked_prefill(model_dir, reference) -> None:
    core = make_core(model_dir, budget=5)
    results = run(core, _all())
    assert {rid: toks for rid, (toks, _) in results.items()} == reference
    assert max(s.num_ctx_tokens for s in core.stats_seen) <= 5


def test_greedy_outputs_identical_with_prefix_cache_hits(model_dir, reference) -> None:
    core = make_core(model_dir)
    assert run(core, [request("a", PROMPTS["a"], max_tokens=10)])["a"][0] == reference["a"]
    results = run(core, [request(f"{rid}2", p, max_tokens=10) for rid, p in PROMPTS.items()])
    for rid in PROMPTS:
        assert results[f"{rid}2"][0] == reference[rid]
    # a2 hits all of a's full prompt blocks (not its last token); d2 shares 2 blocks.
    assert core.num_cached["a2"] == 12
    assert core.num_cached["d2"] == 8
    assert core.num_cached["b2"] == 0
    assert sum(s.prefix_cache_hits for s in core.stats_seen) >= 20


def test_greedy_outputs_identical_under_preemption(model_dir, reference) -> None:
    # 12 blocks of 4 = 48 slots for 4 requests that grow to 13..40 tokens.
    core = make_core(model_dir, num_blocks=12, max_model_len=48)
    results = run(core, _all())
    assert {rid: toks for rid, (toks, _) in results.items()} == reference
    assert sum(s.num_preemptions for s in core.stats_seen) > 0


def test_seeded_sampling_is_identical_alone_and_under_preemption(model_dir) -> None:
    params = {"max_tokens": 10, "temperature": 1.0, "seed": 11}
    alone = make_core(model_dir)
    ref = {rid: run(alone, [request(rid, p, **params)])[rid][0] for rid, p in PROMPTS.items()}
    core = make_core(model_dir, num_blocks=12, max_model_len=48)
    results = run(core, [request(rid, p, **params) for rid, p in PROMPTS.items()])
    assert {rid: toks for rid, (toks, _) in results.items()} == ref
    assert sum(s.num_preemptions for s in core.stats_seen) > 0


def test_stop_token_and_max_tokens_with_the_real_runner(model_dir, reference) -> None:
    core = make_core(model_dir)
    stop = reference["c"][3]
    first = reference["c"].index(stop)
    toks, last = run(core, [request("c", PROMPTS["c"], max_tokens=10, stop_token_ids=[stop])])["c"]
    assert toks == reference["c"][: first + 1]
    assert (last.finish_reason, last.stop_reason) == (FinishReason.STOP, stop)
    toks, last = run(core, [request("b", PROMPTS["b"], max_tokens=3)])["b"]
    assert toks == reference["b"][:3] and last.finish_reason == FinishReason.LENGTH


def test_eos_stops_only_after_min_tokens(model_dir, reference) -> None:
    core = make_core(model_dir)
    eos = reference["a"][1]
    toks, last = run(core, [request("a", PROMPTS["a"], eos_token_id=eos, max_tokens=10)])["a"]
    assert toks == reference["a"][:2] and last.finish_reason == FinishReason.STOP
    assert last.stop_reason is None
    # The runner masks EOS until min_tokens outputs exist; the scheduler does not stop on it.
    toks, last = run(
        core, [request("a2", PROMPTS["a"], eos_token_id=eos, max_tokens=10, min_tokens=4)]
    )["a2"]
    assert eos not in toks[:4] and len(toks) >= 4
    assert toks[-1] == eos if last.finish_reason == FinishReason.STOP else len(toks) == 10


def test_abort_yields_an_abort_output_and_frees_blocks(model_dir) -> None:
    core = make_core(model_dir, budget=8)
    core.add_request(request("x", PROMPTS["c"], max_tokens=50))
    core.add_request(request("y", PROMPTS["b"], max_tokens=50))
    core.step()  # x mid-prefill, y waiting
    core.abort_requests(["x", "y", "nope"])
    assert core.has_unfinished_requests()  # the abort outputs are still to deliver
    out = core.step()
    assert sorted(o.request_id for o in out.outputs) == ["x", "y"]
    assert all(o.finish_reason == FinishReason.ABORT and o.finished for o in out.outputs)
    assert not core.has_unfinished_requests()
    assert core.scheduler.kv.num_free_blocks == core.num_blocks
    empty = core.step()
    assert empty.outputs == [] and empty.scheduler_stats is not None
    # The engine keeps working after aborts.
    assert run(core, [request("z", PROMPTS["b"], max_tokens=2)])["z"][0]


def test_add_request_rejects_bad_requests(model_dir) -> None:
    core = make_core(model_dir, max_model_len=16)
    with pytest.raises(ValueError, match="prompt_token_ids"):
        core.add_request(request("long", list(range(17))))
    with pytest.raises(ValueError, match="prompt_token_ids"):
        core.add_request(request("empty", []))
    core.add_request(request("a", [1, 2]))
    with pytest.raises(ValueError, match="request_id"):
        core.add_request(request("a", [1, 2]))
    core.abort_all_requests()
    assert [o.finish_reason for o in core.step().outputs] == [FinishReason.ABORT]


def test_too_small_kv_memory_is_a_value_error(model_dir: str) -> None:
    with pytest.raises(ValueError, match="kv-cache-memory-bytes"):
        EngineCore(
            ShoalConfig(
                model=ModelConfig(model=model_dir, load_format="dummy"),
                cache=CacheConfig(block_size=BLOCK_SIZE, kv_cache_memory_bytes=16),
            )
        )
