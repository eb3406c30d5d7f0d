"""`EngineCore` on a runner handed to it (`runner=`): a `FakeModelRunner` that checks the
scheduler<->runner contract. No model, no torch."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from core_fakes import FakeModelRunner, make_request, make_scheduler, run_all, tokens_of

from shoal.config import CacheConfig, ModelConfig, SchedulerConfig, ShoalConfig
from shoal.core.scheduler_output import ModelRunnerOutput, SchedulerOutput
from shoal.engine.core import EngineCore
from shoal.protocol import EngineCoreOutput, EngineCoreRequest, FinishReason
from shoal.sampling_params import SamplingParams

BLOCK_SIZE = 4


def config(
    num_blocks: int | None = 64, max_model_len: int | None = 128, memory_bytes: int = 1 << 20
) -> ShoalConfig:
    return ShoalConfig(
        model=ModelConfig(max_model_len=max_model_len),
        cache=CacheConfig(
            block_size=BLOCK_SIZE, num_blocks=num_blocks, kv_cache_memory_bytes=memory_bytes
        ),
        scheduler=SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=16),
    )


def fake_core(cfg: ShoalConfig | None = None) -> tuple[EngineCore, FakeModelRunner]:
    cfg = cfg or config()
    runner = FakeModelRunner(cfg)
    return EngineCore(cfg, runner=runner), runner


def request(request_id: str, prompt: list[int], max_tokens: int = 6) -> EngineCoreRequest:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return EngineCoreRequest(request_id, prompt, params, None, time.time())


def run(core: EngineCore, max_steps: int = 1000) -> dict[str, list[EngineCoreOutput]]:
    by_id: dict[str, list[EngineCoreOutput]] = {}
    for _ in range(max_steps):
        if not core.has_unfinished_requests():
            return by_id
        for o in core.step().outputs:
            by_id.setdefault(o.request_id, []).append(o)
        core.scheduler.check_integrity()
    raise AssertionError("the engine did not finish")


PROMPTS = {"a": [5, 17, 33, 90, 4, 250, 11, 12, 13], "b": [7, 8, 9], "c": list(range(40, 70))}


def test_the_core_drives_the_runner_it_is_given() -> None:
    core, runner = fake_core()
    assert core.model_runner is runner
    assert (core.num_blocks, runner.num_blocks, core.max_model_len) == (64, 64, 128)
    for rid, prompt in PROMPTS.items():
        core.add_request(request(rid, prompt))
    got = run(core)
    # The same tokens as the scheduler alone over its own fake runner.
    scheduler, reference = make_scheduler(block_size=BLOCK_SIZE), FakeModelRunner(config())
    reference.initialize_kv_cache(64)
    for rid, prompt in PROMPTS.items():
        scheduler.add_request(make_request(rid, prompt, max_tokens=6, ignore_eos=True))
    expected = run_all(scheduler, reference)
    assert {rid: tokens_of(o) for rid, o in got.items()} == {
        rid: tokens_of(o) for rid, o in expected.items()
    }
    assert all(o[-1].finish_reason == FinishReason.LENGTH for o in got.values())
    assert core.scheduler.kv.num_free_blocks == core.num_blocks


def test_warm_up_runs_through_the_runner_and_leaves_nothing_behind() -> None:
    core, runner = fake_core()
    # Warm-up ran steps on the runner, then a step with nothing scheduled dropped its
    # requests there; the scheduler starts afresh.
    assert runner.num_steps > 0
    assert runner.reqs == {}
    assert not core.has_unfinished_requests()
    assert core.scheduler.kv.num_free_blocks == core.num_blocks
    assert core.get_stats().num_running_reqs == 0
    # A request may reuse a warm-up request's id.
    core.add_request(request("warmup-0-0", PROMPTS["b"]))
    assert len(tokens_of(run(core)["warmup-0-0"])) == 6


def test_the_runner_sizes_the_cache_and_max_model_len() -> None:
    per_block = FakeModelRunner.BYTES_PER_BLOCK
    core, runner = fake_core(
        config(num_blocks=None, max_model_len=None, memory_bytes=10 * per_block)
    )
    assert core.num_blocks == runner.num_blocks == 10
    # The runner's 2048 positions, capped to what 10 blocks of 4 hold.
    assert core.max_model_len == 40 < runner.max_model_len
    with pytest.raises(ValueError, match="kv-cache-memory-bytes"):
        fake_core(config(num_blocks=None, memory_bytes=per_block - 1))


def test_prompt_ids_are_checked_against_the_runners_vocabulary() -> None:
    core, runner = fake_core()
    with pytest.raises(ValueError, match=f"token id {runner.vocab_size} at position 1"):
        core.add_request(request("bad", [1, runner.vocab_size, 2]))
    core.add_request(request("ok", [1, runner.vocab_size - 1, 2]))
    assert len(tokens_of(run(core)["ok"])) == 6


class _FailingRunner(FakeModelRunner):
    def execute_model(self, so: SchedulerOutput) -> ModelRunnerOutput:
        if "boom" in so.num_scheduled_tokens:
            raise RuntimeError("injected")
        return super().execute_model(so)


def test_a_failing_model_step_reaches_the_caller() -> None:
    cfg = config()
    core = EngineCore(cfg, runner=_FailingRunner(cfg))
    core.add_request(request("boom", PROMPTS["b"]))
    with pytest.raises(RuntimeError, match="injected"):
        core.step()


def test_the_engine_modules_and_a_core_on_a_fake_runner_import_no_torch() -> None:
    code = (
        "import sys\n"
        "import shoal.engine.core, shoal.engine.core_proc, shoal.engine.manager\n"
        "from test_engine_core_fake_runner import fake_core\n"
        "core, _ = fake_core()\n"
        "heavy = [m for m in ('torch', 'shoal.worker.model_runner') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    here = str(Path(__file__).parent)
    env_path = [here, *sys.path]
    result = subprocess.run(
        [sys.executable, "-c", f"import sys; sys.path[:0] = {env_path!r}\n{code}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
