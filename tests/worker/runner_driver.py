"""A minimal scheduler for runner tests: fixed prefill chunk size, shuffled blocks, and
preemption on request, emitting `SchedulerOutput`s exactly per the runner contract."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from shoal.core.scheduler_output import (
    ModelRunnerOutput,
    NewRequestData,
    SchedulerOutput,
)
from shoal.sampling_params import SamplingParams
from shoal.worker.model_runner import ModelRunner


@dataclass
class DriverRequest:
    req_id: str
    prompt: list[int]
    params: SamplingParams
    eos_token_id: int | None
    outputs: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    is_new: bool = True

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.outputs)


class RunnerDriver:
    def __init__(self, runner: ModelRunner, num_blocks: int, chunk: int, seed: int = 0) -> None:
        self.runner, self.chunk = runner, chunk
        self.block_size = runner.block_size
        self.free = list(range(num_blocks))
        random.Random(seed).shuffle(self.free)
        self.running: dict[str, DriverRequest] = {}
        self.done: dict[str, DriverRequest] = {}
        self.pending_drops: set[str] = set()
        self._preempted: set[str] = set()

    def add(
        self, req_id: str, prompt: list[int], eos_token_id: int | None = None, **params
    ) -> None:
        self.running[req_id] = DriverRequest(req_id, prompt, SamplingParams(**params), eos_token_id)

    def preempt(self, req_id: str) -> None:
        req = self.running[req_id]
        self.free.extend(req.block_ids)
        req.block_ids, req.num_computed, req.is_new = [], 0, True
        self._preempted.add(req_id)

    def step(self) -> ModelRunnerOutput:
        so = SchedulerOutput(finished_req_ids=self.pending_drops, preempted_req_ids=self._preempted)
        self.pending_drops, self._preempted = set(), set()
        for req in self.running.values():
            n = min(self.chunk, req.num_tokens - req.num_computed)
            new_blocks = self._allocate(req, req.num_computed + n)
            if req.is_new:
                so.scheduled_new_reqs.append(NewRequestData(
                    req.req_id, list(req.prompt), list(req.outputs), req.params,
                    list(req.block_ids), req.num_computed, req.eos_token_id,
                ))  # fmt: skip
                req.is_new = False
            else:
                cached = so.scheduled_cached_reqs
                cached.req_ids.append(req.req_id)
                cached.new_block_ids.append(new_blocks)
                cached.num_computed_tokens.append(req.num_computed)
                cached.num_output_tokens.append(len(req.outputs))
            so.num_scheduled_tokens[req.req_id] = n
        so.total_num_scheduled_tokens = sum(so.num_scheduled_tokens.values())
        out = self.runner.execute_model(so)
        self._update(so, out)
        return out

    def run(self, max_steps: int = 500) -> dict[str, DriverRequest]:
        for _ in range(max_steps):
            if not self.running:
                return self.done
            self.step()
        raise AssertionError("requests did not finish")

    def _allocate(self, req: DriverRequest, num_tokens: int) -> list[int]:
        new = []
        while len(req.block_ids) * self.block_size < num_tokens:
            new.append(self.free.pop())
            req.block_ids.append(new[-1])
        return new

    def _update(self, so: SchedulerOutput, out: ModelRunnerOutput) -> None:
        assert sorted(out.req_ids) == sorted(so.num_scheduled_tokens)
        for i, req_id in enumerate(out.req_ids):
            req = self.running[req_id]
            req.num_computed += so.num_scheduled_tokens[req_id]
            sampled = out.sampled_token_ids[i]
            assert len(sampled) == (req.num_computed == req.num_tokens)
            if not sampled:
                assert out.logprobs[i] is None
                continue
            req.outputs.extend(sampled)
            req.logprobs.append(out.logprobs[i])
            if len(req.outputs) >= (req.params.max_tokens or 0):
                self.done[req_id] = self.running.pop(req_id)
                self.free.extend(req.block_ids)
                self.pending_drops.add(req_id)
