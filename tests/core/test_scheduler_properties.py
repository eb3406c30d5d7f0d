"""Random workloads with random aborts: integrity holds every step, nothing leaks, and every
request that is not aborted gets exactly the tokens it gets when running alone."""

from __future__ import annotations

from dataclasses import dataclass

from core_fakes import FakeRunner, make_request, make_scheduler, run_all, step, tokens_of
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from shoal.core.request import RequestStatus
from shoal.protocol import FinishReason


@dataclass
class Job:
    request_id: str
    prompt: list[int]
    max_tokens: int
    arrival_step: int
    abort_step: int | None


@st.composite
def workloads(draw: st.DrawFn) -> tuple[dict, list[Job]]:
    block_size = draw(st.sampled_from([1, 2, 4, 8]))
    max_model_len = draw(st.integers(8, 40))
    min_blocks = -(-max_model_len // block_size)
    num_blocks = draw(st.integers(min_blocks, min_blocks + 6))
    chunked = draw(st.booleans())
    budget = draw(st.integers(1, 48))
    if not chunked:
        budget = max(budget, max_model_len)
    cfg = dict(
        num_blocks=num_blocks,
        block_size=block_size,
        max_num_batched_tokens=budget,
        max_num_seqs=draw(st.integers(1, 8)),
        chunked=chunked,
        prefix_caching=draw(st.booleans()),
        max_model_len=max_model_len,
    )
    # A few shared prefixes over a tiny vocabulary, so prefix-cache hits are common.
    prefixes = draw(st.lists(st.lists(st.integers(0, 3), max_size=12), min_size=1, max_size=3))
    jobs = []
    for i in range(draw(st.integers(1, 10))):
        prompt = draw(st.sampled_from(prefixes)) + draw(
            st.lists(st.integers(0, 3), min_size=1, max_size=10)
        )
        prompt = prompt[: max_model_len - 1]
        max_tokens = draw(st.integers(1, max_model_len - len(prompt)))
        arrival = draw(st.integers(0, 12))
        abort = draw(st.none() | st.integers(arrival, arrival + 15))
        jobs.append(Job(f"r{i}", prompt, max_tokens, arrival, abort))
    return cfg, jobs


def _alone(job: Job, max_model_len: int) -> list[int]:
    sched = make_scheduler(num_blocks=64, max_model_len=max_model_len)
    sched.add_request(
        make_request("x", job.prompt, max_tokens=job.max_tokens, max_model_len=max_model_len)
    )
    # FakeRunner's default sampler is a function of the token prefix only.
    return tokens_of(run_all(sched, FakeRunner(4))["x"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads())
def test_random_workloads_keep_integrity_and_outputs(workload: tuple[dict, list[Job]]) -> None:
    cfg, jobs = workload
    max_model_len = cfg["max_model_len"]
    sched = make_scheduler(**cfg)
    runner = FakeRunner(cfg["block_size"])
    results: dict[str, list] = {}
    aborted: set[str] = set()
    num_preemptions = num_hits = 0
    for now in range(2_000):
        for job in jobs:
            if job.arrival_step == now:
                sched.add_request(
                    make_request(
                        job.request_id,
                        job.prompt,
                        max_tokens=job.max_tokens,
                        max_model_len=max_model_len,
                    )
                )
            if job.abort_step == now:
                done = sched.finish_requests([job.request_id], RequestStatus.FINISHED_ABORTED)
                aborted |= {r.request_id for r in done}
                sched.check_integrity()
        if now > max(j.arrival_step for j in jobs) and not sched.has_unfinished_requests():
            break
        _, outputs = step(sched, runner)
        stats = sched.get_stats()
        num_preemptions += stats.num_preemptions
        num_hits += stats.prefix_cache_hits
        for o in outputs:
            results.setdefault(o.request_id, []).append(o)
    else:
        raise AssertionError("workload did not finish")
    event(f"preempted: {num_preemptions > 0}")
    event(f"prefix hits: {num_hits > 0}")
    event(f"aborted: {bool(aborted)}")

    assert sched.kv.num_free_blocks == cfg["num_blocks"] and not sched.kv.block_tables
    assert not sched.running and not sched.waiting
    for job in jobs:
        if job.request_id in aborted:
            continue
        outs = results[job.request_id]
        assert outs[-1].finish_reason == FinishReason.LENGTH
        assert tokens_of(outs) == _alone(job, max_model_len)
