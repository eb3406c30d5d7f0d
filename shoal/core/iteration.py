"""`compute_iteration_details`: context (prefill) vs generation counts of one step."""

from __future__ import annotations

from dataclasses import dataclass

from shoal.core.scheduler_output import SchedulerOutput


@dataclass
class IterationDetails:
    """Requests and tokens of one step, split into context (prefill) and generation."""

    num_ctx_requests: int
    num_ctx_tokens: int
    num_generation_requests: int
    num_generation_tokens: int
    num_encoder_inputs: int = 0
    num_encoder_output_tokens: int = 0


def compute_iteration_details(scheduler_output: SchedulerOutput) -> IterationDetails:
    """Count context and generation requests and tokens in `scheduler_output`.

    A scheduled request is context when it is new this step (including one resumed after
    preemption) or a cached request with no output tokens yet (a later chunk of a chunked
    prefill); every other scheduled request is generation. Its tokens are its
    `num_scheduled_tokens`. Encoder counts come from `scheduled_encoder_input_stats` when
    the output carries one (shoal has no encoder models: 0).
    """
    new_ids = {r.req_id for r in scheduler_output.scheduled_new_reqs}
    cached = scheduler_output.scheduled_cached_reqs
    ctx_reqs = ctx_tokens = gen_reqs = gen_tokens = 0
    for req_id, num_tokens in scheduler_output.num_scheduled_tokens.items():
        if cached.is_context_phase(req_id) or req_id in new_ids:
            ctx_reqs += 1
            ctx_tokens += num_tokens
        else:
            gen_reqs += 1
            gen_tokens += num_tokens
    encoder_stats = getattr(scheduler_output, "scheduled_encoder_input_stats", None)
    return IterationDetails(
        ctx_reqs,
        ctx_tokens,
        gen_reqs,
        gen_tokens,
        num_encoder_inputs=getattr(encoder_stats, "num_inputs", 0) if encoder_stats else 0,
        num_encoder_output_tokens=(
            getattr(encoder_stats, "output_tokens", 0) if encoder_stats else 0
        ),
    )
