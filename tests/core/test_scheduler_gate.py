"""The scheduler's gate (a grammar still compiling): a held request waits without blocking
the requests behind it, keeps its place in the queue, and runs once ready."""

from __future__ import annotations

from core_fakes import FakeRunner, make_request, make_scheduler, step

from shoal.core.request import Request


class Gate:
    def __init__(self, held: set[str]) -> None:
        self.held = held
        self.asked: list[str] = []

    @property
    def has_pending(self) -> bool:
        return bool(self.held)

    def is_ready(self, request: Request) -> bool:
        self.asked.append(request.request_id)
        return request.request_id not in self.held


def test_a_held_request_waits_and_the_batch_goes_on() -> None:
    sched, runner = make_scheduler(), FakeRunner(4)
    gate = Gate({"b"})
    sched.gate = gate
    for rid in "abc":
        sched.add_request(make_request(rid, [1, 2, 3], max_tokens=4))
    so, _ = step(sched, runner)
    assert set(so.num_scheduled_tokens) == {"a", "c"}
    assert [r.request_id for r in sched.waiting] == ["b"]
    sched.check_integrity()
    gate.held.clear()
    so, _ = step(sched, runner)
    assert so.num_scheduled_tokens["b"] == 3  # its prefill, beside a's and c's decodes
    sched.check_integrity()


def test_no_pending_grammar_asks_nothing() -> None:
    sched, runner = make_scheduler(), FakeRunner(4)
    gate = Gate(set())
    sched.gate = gate
    sched.add_request(make_request("a", [1, 2], max_tokens=2))
    step(sched, runner)
    assert gate.asked == []


def test_an_aborted_held_request_is_gone() -> None:
    from shoal.core.request import RequestStatus

    sched, runner = make_scheduler(), FakeRunner(4)
    sched.gate = Gate({"a"})
    sched.add_request(make_request("a", [1, 2], max_tokens=2))
    step(sched, runner)
    assert sched.finish_requests(["a"], RequestStatus.FINISHED_ABORTED)
    assert not sched.has_unfinished_requests()
    sched.check_integrity()


def test_an_engine_without_grammars_does_no_grammar_work() -> None:
    """Plain requests: no compile thread, no bitmask in any step (the runner's fast paths
    stay), nothing held by the gate."""
    from test_engine_core_fake_runner import fake_core

    from shoal.protocol import EngineCoreRequest
    from shoal.sampling_params import SamplingParams

    core, runner = fake_core()
    seen = []
    execute = runner.execute_model

    def recording(so):  # type: ignore[no-untyped-def]
        seen.append((so.grammar_req_ids, so.grammar_bitmask))
        return execute(so)

    runner.execute_model = recording  # type: ignore[method-assign]
    for i in range(3):
        params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
        core.add_request(EngineCoreRequest(f"r{i}", [5, 6, 7, 8, 9], params, None, 0.0))
    while core.has_unfinished_requests():
        core.step()
    assert seen and all(ids == [] and bitmask is None for ids, bitmask in seen)
    assert core.structured._executor is None and not core.structured.is_active
