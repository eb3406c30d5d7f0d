"""Scheduler on plain Python objects: budget, chunking, seqs cap, preemption, aborts, stops."""

from __future__ import annotations

import pytest
from core_fakes import FakeRunner, make_request, make_scheduler, run_all, step, tokens_of

from shoal.config import CacheConfig, SchedulerConfig
from shoal.core.request import RequestStatus
from shoal.core.scheduler import Scheduler
from shoal.protocol import FinishReason

BS = 4


def _alone(prompt: list[int], **params: object) -> list[int]:
    """Greedy reference: the tokens the request gets running alone with room to spare."""
    sched = make_scheduler(num_blocks=256)
    sched.add_request(make_request("ref", prompt, **params))
    return tokens_of(run_all(sched, FakeRunner(BS))["ref"])


def test_prefill_then_decode_then_length_finish_frees_blocks() -> None:
    sched, runner = make_scheduler(), FakeRunner(BS)
    sched.add_request(make_request("a", list(range(10)), max_tokens=3))
    so, outs = step(sched, runner)
    assert [n.req_id for n in so.scheduled_new_reqs] == ["a"]
    assert so.num_scheduled_tokens == {"a": 10}
    assert so.scheduled_new_reqs[0].block_ids == sched.kv.get_block_ids("a")
    assert len(outs) == 1 and len(outs[0].new_token_ids) == 1
    so, outs = step(sched, runner)
    assert so.scheduled_cached_reqs.req_ids == ["a"] and so.num_scheduled_tokens == {"a": 1}
    so, outs = step(sched, runner)
    assert outs[0].finish_reason == FinishReason.LENGTH
    assert not sched.has_unfinished_requests()
    assert sched.kv.num_free_blocks == sched.kv.num_blocks
    # The runner hears about the finish with the next step that schedules tokens.
    sched.add_request(make_request("b", [7, 7]))
    so, _ = step(sched, runner)
    assert so.finished_req_ids == {"a"}


def test_budget_respected_and_all_finish_identically() -> None:
    prompts = {f"r{i}": [i + 1] * (3 + 5 * i) for i in range(8)}
    sched, runner = make_scheduler(max_num_batched_tokens=10), FakeRunner(BS)
    for rid, p in prompts.items():
        sched.add_request(make_request(rid, p, max_tokens=5))
    results = run_all(sched, runner)  # step() asserts the budget every step
    for rid, p in prompts.items():
        assert tokens_of(results[rid]) == _alone(p, max_tokens=5)


def test_chunked_prefill_chunks_and_samples_only_at_the_end() -> None:
    sched, runner = make_scheduler(max_num_batched_tokens=8), FakeRunner(BS)
    sched.add_request(make_request("a", list(range(25)), max_tokens=2))
    chunks = []
    while True:
        so, outs = step(sched, runner)
        chunks.append(so.num_scheduled_tokens["a"])
        if outs:
            break
        assert sched.get_stats().num_ctx_tokens == chunks[-1]
    assert chunks == [8, 8, 8, 1]
    assert so.scheduled_cached_reqs.is_context_phase("a")


def test_without_chunking_a_prompt_waits_for_a_whole_budget() -> None:
    sched = make_scheduler(max_num_batched_tokens=128, chunked=False)
    runner = FakeRunner(BS)
    sched.add_request(make_request("a", [1] * 100, max_tokens=2))
    sched.add_request(make_request("b", [2] * 50, max_tokens=2))
    so, _ = step(sched, runner)
    assert so.num_scheduled_tokens == {"a": 100}  # b does not fit whole behind a
    so, _ = step(sched, runner)
    assert so.num_scheduled_tokens == {"a": 1, "b": 50}
    with pytest.raises(ValueError, match="max-num-batched-tokens"):
        make_scheduler(max_num_batched_tokens=64, chunked=False, max_model_len=128)


def test_max_num_seqs_caps_running() -> None:
    sched, runner = make_scheduler(max_num_seqs=2), FakeRunner(BS)
    for i in range(5):
        sched.add_request(make_request(f"r{i}", [i + 1] * 5, max_tokens=3))
    so, _ = step(sched, runner)
    assert sorted(so.num_scheduled_tokens) == ["r0", "r1"]
    assert len(sched.waiting) == 3
    results = run_all(sched, runner)
    assert len(results) == 5


def test_preemption_frees_the_newest_and_resume_recomputes_outputs() -> None:
    # 6 blocks of 4 = 24 slots; two requests that each grow to 20 tokens cannot both fit.
    sched = make_scheduler(num_blocks=6, max_model_len=24)
    runner = FakeRunner(BS)
    sched.add_request(make_request("old", [1] * 6, max_tokens=14, max_model_len=24))
    sched.add_request(make_request("new", [2] * 6, max_tokens=14, max_model_len=24))
    results: dict[str, list] = {}
    preempted_seen, resumed_with_outputs = set(), False
    while sched.has_unfinished_requests():
        so, outs = step(sched, runner)
        preempted_seen |= so.preempted_req_ids
        for new in so.scheduled_new_reqs:
            if new.output_token_ids:
                resumed_with_outputs = True
                assert new.num_computed_tokens % BS == 0
        for o in outs:
            results.setdefault(o.request_id, []).append(o)
    assert preempted_seen == {"new"}
    assert resumed_with_outputs
    assert tokens_of(results["old"]) == _alone([1] * 6, max_tokens=14)
    assert tokens_of(results["new"]) == _alone([2] * 6, max_tokens=14)
    assert sched.kv.num_free_blocks == 6


def test_preempted_request_is_not_readmitted_in_the_same_step() -> None:
    sched = make_scheduler(num_blocks=4, max_model_len=16)
    runner = FakeRunner(BS)
    sched.add_request(make_request("a", [1] * 7, max_tokens=9, max_model_len=16))
    sched.add_request(make_request("b", [2] * 7, max_tokens=9, max_model_len=16))
    for _ in range(40):
        so, _ = step(sched, runner)
        new_ids = {n.req_id for n in so.scheduled_new_reqs}
        assert not new_ids & so.preempted_req_ids
        if not sched.has_unfinished_requests():
            break
    assert sched.get_num_unfinished_requests() == 0


@pytest.mark.parametrize("stage", ["waiting", "mid_prefill", "decoding", "preempted"])
def test_abort_at_every_stage(stage: str) -> None:
    sched = make_scheduler(num_blocks=6, max_num_batched_tokens=8, max_model_len=24)
    runner = FakeRunner(BS)
    sched.add_request(make_request("keep", [1] * 6, max_tokens=14, max_model_len=24))
    sched.add_request(make_request("x", [2] * 6, max_tokens=14, max_model_len=24))

    def reached() -> bool:
        x = sched.requests["x"]
        in_prefill = 0 < x.num_computed_tokens < x.num_prompt_tokens
        return {
            "waiting": x.status == RequestStatus.WAITING,
            "mid_prefill": x.status == RequestStatus.RUNNING and in_prefill,
            "decoding": x.status == RequestStatus.RUNNING and x.num_output_tokens > 0,
            "preempted": x.status == RequestStatus.PREEMPTED,
        }[stage]

    for _ in range(100):
        if reached():
            break
        step(sched, runner)
    else:
        pytest.fail(f"never reached stage {stage}")
    x = sched.requests["x"]
    was_running = x.status == RequestStatus.RUNNING
    finished = sched.finish_requests(["x", "x", "unknown"], RequestStatus.FINISHED_ABORTED)
    assert [r.request_id for r in finished] == ["x"]
    assert x.status.finish_reason == FinishReason.ABORT
    sched.check_integrity()
    assert sched.finish_requests(["x"], RequestStatus.FINISHED_ABORTED) == []
    so, _ = step(sched, runner)
    assert ("x" in so.finished_req_ids) == was_running
    results = run_all(sched, runner)
    assert results["keep"][-1].finish_reason == FinishReason.LENGTH
    assert "x" not in results
    assert sched.kv.num_free_blocks == 6 and not sched.kv.block_tables


def _scripted(tokens: list[int]) -> FakeRunner:
    it = iter(tokens)
    return FakeRunner(BS, sample=lambda _rid, _toks: next(it))


@pytest.mark.parametrize(
    ("params", "eos", "script", "expected", "reason", "stop_reason"),
    [
        ({}, 9, [5, 9, 6], [5, 9], FinishReason.STOP, None),
        ({"ignore_eos": True, "max_tokens": 3}, 9, [5, 9, 6], [5, 9, 6], FinishReason.LENGTH, None),
        ({"stop_token_ids": [6]}, 9, [5, 6, 9], [5, 6], FinishReason.STOP, 6),
        ({"max_tokens": 2}, 9, [5, 5, 5], [5, 5], FinishReason.LENGTH, None),
        ({"min_tokens": 3}, 9, [9, 9, 9, 9], [9, 9, 9], FinishReason.STOP, None),
        (
            {"min_tokens": 2, "stop_token_ids": [6]},
            None,
            [6, 5, 6],
            [6, 5, 6],
            FinishReason.STOP,
            6,
        ),
        ({"max_tokens": None}, 9, [1] * 20, [1] * 6, FinishReason.LENGTH, None),
    ],
)
def test_stop_conditions(params, eos, script, expected, reason, stop_reason) -> None:
    sched = make_scheduler(max_model_len=10)
    params = {"max_tokens": 8, **params}
    sched.add_request(make_request("a", [3] * 4, eos_token_id=eos, max_model_len=10, **params))
    outs = run_all(sched, _scripted(script))["a"]
    assert tokens_of(outs) == expected
    assert outs[-1].finish_reason == reason and outs[-1].stop_reason == stop_reason
    assert all(o.finish_reason is None for o in outs[:-1])


def test_add_request_rejects_duplicates_and_too_long_prompts() -> None:
    sched = make_scheduler(max_model_len=16)
    sched.add_request(make_request("a", [1, 2], max_model_len=16))
    with pytest.raises(ValueError, match="request_id"):
        sched.add_request(make_request("a", [1, 2], max_model_len=16))
    with pytest.raises(ValueError, match="prompt_token_ids"):
        sched.add_request(make_request("b", [1] * 17, max_model_len=32))
    with pytest.raises(ValueError, match="prompt_token_ids"):
        make_request("c", [])


def test_too_few_blocks_for_max_model_len_is_rejected() -> None:
    with pytest.raises(ValueError, match="num_blocks"):
        Scheduler(SchedulerConfig(), CacheConfig(block_size=16), 3, 64)


def test_stats_report_queues_usage_and_iteration_details() -> None:
    sched, runner = make_scheduler(max_num_seqs=1), FakeRunner(BS)
    sched.add_request(make_request("a", [1] * 9, max_tokens=4))
    sched.add_request(make_request("b", [2] * 5, max_tokens=4))
    step(sched, runner)
    stats = sched.get_stats()
    assert (stats.num_running_reqs, stats.num_waiting_reqs) == (1, 1)
    assert (stats.num_ctx_requests, stats.num_ctx_tokens) == (1, 9)
    assert stats.num_blocks_free == stats.num_blocks_total - 3
    assert stats.kv_cache_usage == pytest.approx(3 / 64)
    step(sched, runner)
    stats = sched.get_stats()
    assert (stats.num_generation_requests, stats.num_generation_tokens) == (1, 1)
