"""compute_iteration_details per the seed's contract (docs/api.md)."""

from __future__ import annotations

from shoal.core.iteration import IterationDetails, compute_iteration_details
from shoal.core.scheduler_output import CachedRequestData, NewRequestData, SchedulerOutput
from shoal.sampling_params import SamplingParams


def _new(req_id: str, num_outputs: int = 0) -> NewRequestData:
    return NewRequestData(req_id, [1, 2, 3], [5] * num_outputs, SamplingParams(), [0], 0)


def _cached(pairs: list[tuple[str, int]]) -> CachedRequestData:
    return CachedRequestData(
        req_ids=[r for r, _ in pairs],
        new_block_ids=[[] for _ in pairs],
        num_computed_tokens=[8 for _ in pairs],
        num_output_tokens=[n for _, n in pairs],
    )


def test_empty_output_is_all_zero() -> None:
    assert compute_iteration_details(SchedulerOutput()) == IterationDetails(0, 0, 0, 0)


def test_new_requests_are_context_even_when_resumed_with_outputs() -> None:
    so = SchedulerOutput(
        scheduled_new_reqs=[_new("a"), _new("b", num_outputs=4)],
        num_scheduled_tokens={"a": 3, "b": 7},
    )
    assert compute_iteration_details(so) == IterationDetails(2, 10, 0, 0)


def test_chunked_prefill_continuation_counts_as_context() -> None:
    so = SchedulerOutput(
        scheduled_cached_reqs=_cached([("chunk", 0), ("dec1", 3), ("dec2", 1)]),
        num_scheduled_tokens={"chunk": 16, "dec1": 1, "dec2": 1},
    )
    assert compute_iteration_details(so) == IterationDetails(1, 16, 2, 2)


def test_mixed_step_and_unknown_ids_are_generation() -> None:
    so = SchedulerOutput(
        scheduled_new_reqs=[_new("n")],
        scheduled_cached_reqs=_cached([("c", 0), ("d", 2)]),
        # "ghost" is in no list: is_context_phase says False, so it counts as generation.
        num_scheduled_tokens={"n": 5, "c": 4, "d": 1, "ghost": 2},
    )
    details = compute_iteration_details(so)
    assert details == IterationDetails(2, 9, 2, 3)
    assert (details.num_encoder_inputs, details.num_encoder_output_tokens) == (0, 0)


def test_is_context_phase_lookup() -> None:
    cached = _cached([("a", 0), ("b", 1)])
    assert cached.is_context_phase("a")
    assert not cached.is_context_phase("b")
    assert not cached.is_context_phase("zzz")
    cached.req_ids.append("c")
    cached.new_block_ids.append([])
    cached.num_computed_tokens.append(0)
    cached.num_output_tokens.append(0)
    assert cached.is_context_phase("c")  # the index follows appends
