"""ModelRunner end to end on tiny checkpoints: greedy identity with transformers, logprobs,
seeds independent of batching and preemption, min_tokens, and its configuration errors."""

from __future__ import annotations

import json
import os

import pytest
import torch

from shoal.config import CacheConfig, ModelConfig, ParallelConfig, SchedulerConfig, ShoalConfig
from shoal.core.scheduler_output import SchedulerOutput
from shoal.worker.model_runner import (
    FRONTEND_BUSY_TOKENS_PER_S,
    ModelRunner,
    TokenRate,
    cpu_threads,
    kv_cache_torch_dtype,
)
from tests.model.tiny_hf import VOCAB, make_hf_model, save_hf_model
from tests.worker.runner_driver import RunnerDriver

BLOCK_SIZE = 4
PROMPTS = {
    "a": [5, 17, 301, 44, 9, 120, 77, 3, 250, 61, 18],
    "b": [400, 2, 33],
    "c": [7],
    "d": [99, 98, 97, 96, 95, 94, 93, 92, 91, 90, 89, 88, 87, 86, 85, 84, 83],
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory):
    hf = make_hf_model("llama", seed=5)
    return hf, save_hf_model(hf, str(tmp_path_factory.mktemp("tiny-llama")))


def make_runner(path: str, num_blocks: int = 128, **model_kw) -> ModelRunner:
    config = ShoalConfig(
        model=ModelConfig(model=path, **model_kw),
        cache=CacheConfig(block_size=BLOCK_SIZE),
        scheduler=SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8),
    )
    runner = ModelRunner(config)
    runner.initialize_kv_cache(num_blocks)
    return runner


def test_greedy_matches_transformers_generate_under_chunking(checkpoint) -> None:
    hf, path = checkpoint
    driver = RunnerDriver(make_runner(path), num_blocks=128, chunk=5)
    for req_id in "abc":
        driver.add(req_id, PROMPTS[req_id], temperature=0.0, max_tokens=8, logprobs=3)
    driver.step()
    driver.step()
    driver.add("d", PROMPTS["d"], temperature=0.0, max_tokens=8)  # joins mid-flight
    done = driver.run()
    # Finished requests are dropped when the next step tells the runner.
    assert set(driver.runner.requests.states) == set(driver.pending_drops)
    driver.runner.execute_model(SchedulerOutput(finished_req_ids=driver.pending_drops))
    assert not driver.runner.requests.states
    for req_id, prompt in PROMPTS.items():
        expected = hf.generate(
            torch.tensor([prompt]), max_new_tokens=8, do_sample=False, attention_mask=None
        )[0, len(prompt) :].tolist()
        assert done[req_id].outputs == expected, req_id
    # Logprobs: the raw distribution at each generated position.
    req = done["a"]
    with torch.no_grad():
        raw = hf(torch.tensor([req.prompt + req.outputs])).logits[0].log_softmax(-1)
    for step, (entry,) in enumerate(req.logprobs):
        dist = raw[len(req.prompt) - 1 + step]
        token, logprob, rank, top_ids, top_values = entry
        assert token == req.outputs[step] and rank == 1
        assert abs(logprob - dist[token].item()) < 1e-4
        assert top_ids == dist.topk(3).indices.tolist()
        torch.testing.assert_close(torch.tensor(top_values), dist.topk(3).values, atol=1e-4, rtol=0)


def _seeded_tokens(
    path: str, *, others: bool, chunk: int, preempt_at: int | None = None
) -> list[int]:
    driver = RunnerDriver(make_runner(path), num_blocks=128, chunk=chunk)
    if others:
        driver.add("x", PROMPTS["d"], temperature=1.0, max_tokens=12)
        driver.add("y", PROMPTS["b"], temperature=0.7, top_k=20, seed=9, max_tokens=12)
    driver.add("s", PROMPTS["a"], temperature=0.9, top_p=0.95, seed=42, max_tokens=10)
    steps = 0
    while "s" in driver.running:
        driver.step()
        steps += 1
        if steps == preempt_at:
            driver.preempt("s")
    return driver.done["s"].outputs


def test_seeded_request_reproducible_across_batches_and_preemption(checkpoint) -> None:
    _, path = checkpoint
    alone = _seeded_tokens(path, others=False, chunk=64)
    assert len(set(alone)) > 1
    assert _seeded_tokens(path, others=True, chunk=3) == alone
    assert _seeded_tokens(path, others=True, chunk=5, preempt_at=6) == alone


def test_min_tokens_masks_eos(checkpoint) -> None:
    _, path = checkpoint
    driver = RunnerDriver(make_runner(path), num_blocks=64, chunk=16)
    driver.add("g", PROMPTS["b"], temperature=0.0, max_tokens=4)
    greedy = driver.run()["g"].outputs
    eos = greedy[0]  # the token greedy would emit first
    driver = RunnerDriver(make_runner(path), num_blocks=64, chunk=16)
    driver.add("m", PROMPTS["b"], eos_token_id=eos, temperature=0.0, max_tokens=4, min_tokens=2)
    outputs = driver.run()["m"].outputs
    assert eos not in outputs[:2] and outputs[0] != greedy[0]


def _count_calls(monkeypatch: pytest.MonkeyPatch, *targets: tuple[object, str]) -> dict[str, int]:
    """Count the calls of each (object, method name)."""
    calls = {name: 0 for _, name in targets}
    for obj, name in targets:
        original = getattr(obj, name)

        def counted(*args, _name=name, _original=original):
            calls[_name] += 1
            return _original(*args)

        monkeypatch.setattr(obj, name, counted)
    return calls


def test_plain_greedy_steps_skip_the_logits(checkpoint, monkeypatch) -> None:
    """Greedy requests without logprobs or banned tokens get the native argmax straight from
    the hidden states (transformers' tokens still); anything else takes the logits."""
    hf, path = checkpoint
    runner = make_runner(path)
    assert runner.fused_decode is not None
    calls = _count_calls(
        monkeypatch,
        (runner.model, "compute_logits"),
        (runner.greedy_head, "token_ids"),
        (runner.fused_decode, "forward"),
    )
    driver = RunnerDriver(runner, num_blocks=128, chunk=5)
    for req_id in "bd":
        driver.add(req_id, PROMPTS[req_id], temperature=0.0, max_tokens=8)
    done = driver.run()
    assert calls["compute_logits"] == 0
    assert calls["token_ids"] >= 8
    assert calls["forward"] >= 5  # the runner took the fused path for the decode-only steps
    for req_id in "bd":
        prompt = torch.tensor([PROMPTS[req_id]])
        expected = hf.generate(prompt, max_new_tokens=8, do_sample=False)[0, prompt.shape[1] :]
        assert done[req_id].outputs == expected.tolist(), req_id
    # One request asking for logprobs (or sampling, or with min_tokens) sends the step
    # through the logits.
    for extra in ({"logprobs": 1}, {"temperature": 0.8}, {"min_tokens": 2, "eos_token_id": 3}):
        before = calls["compute_logits"]
        driver = RunnerDriver(runner, num_blocks=128, chunk=16)
        driver.add("g", PROMPTS["b"], temperature=0.0, max_tokens=2)
        params = {"temperature": 0.0, "max_tokens": 2} | extra
        eos = params.pop("eos_token_id", None)
        driver.add("x", PROMPTS["c"], eos_token_id=eos, **params)
        driver.run()
        assert calls["compute_logits"] > before, extra


def test_native_lm_head_can_be_turned_off(checkpoint, monkeypatch) -> None:
    from shoal.model.greedy_head import GreedyHead
    from shoal.model.ops import select_ops

    _, path = checkpoint
    runner = make_runner(path)
    hidden = torch.randn(3, runner.model.arch.hidden_size)
    assert runner.greedy_head.token_ids(hidden) is not None
    assert runner.greedy_head.token_ids(hidden.bfloat16()) is None
    monkeypatch.setenv("SHOAL_NATIVE_LM_HEAD", "0")
    # The ops table a process started with the switch off gets.
    assert GreedyHead(runner.model, select_ops()).token_ids(hidden) is None


def test_dummy_bfloat16_runner(tmp_path) -> None:
    config = {
        "architectures": ["Qwen2ForCausalLM"], "vocab_size": VOCAB, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 64, "tie_word_embeddings": True,
    }  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    runner = make_runner(str(tmp_path), load_format="dummy", dtype="bfloat16")
    assert runner.dtype == torch.bfloat16 and runner.device == torch.device("cpu")
    assert runner.max_model_len == 64 and runner.vocab_size == VOCAB
    assert runner.arch.architecture == "Qwen2ForCausalLM"
    driver = RunnerDriver(runner, num_blocks=128, chunk=4)
    driver.add("a", PROMPTS["a"], temperature=0.8, top_k=5, max_tokens=6, logprobs=2)
    outputs = driver.run()["a"].outputs
    assert len(outputs) == 6 and all(0 <= t < VOCAB for t in outputs)


def test_sizes_and_configuration_errors(checkpoint) -> None:
    _, path = checkpoint
    runner = make_runner(path, num_blocks=8)
    # 2 (K, V) x 2 layers x 2 kv heads x 16 head_dim x 4 bytes x 4 tokens per block
    assert runner.num_blocks_for_memory(10 * 2048 + 5) == 10
    assert runner.kv_caches[0].shape == (2, 8, BLOCK_SIZE, 2, 16)
    with pytest.raises(ValueError, match="--max-model-len"):
        make_runner(path, max_model_len=10_000)
    assert make_runner(path, max_model_len=100).max_model_len == 100


def test_buffers_and_rows_grow_past_configured_limits(checkpoint) -> None:
    _, path = checkpoint

    def greedy(max_tokens_per_step: int, max_seqs: int) -> dict[str, list[int]]:
        config = ShoalConfig(
            model=ModelConfig(model=path),
            cache=CacheConfig(block_size=BLOCK_SIZE),
            scheduler=SchedulerConfig(
                max_num_batched_tokens=max_tokens_per_step, max_num_seqs=max_seqs
            ),
        )
        runner = ModelRunner(config)
        runner.initialize_kv_cache(128)
        driver = RunnerDriver(runner, num_blocks=128, chunk=16)
        for req_id, prompt in PROMPTS.items():
            driver.add(req_id, prompt, temperature=0.0, max_tokens=3)
        return {r: req.outputs for r, req in driver.run().items()}

    assert greedy(4, 1) == greedy(256, 8)


def test_cpu_thread_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    serving = ParallelConfig(data_parallel_size=2, api_server_count=1)
    assert cpu_threads(serving) == 3  # (8 - 1) // 2: one core left to the API servers
    offline = ParallelConfig(data_parallel_size=2, api_server_count=0)
    assert cpu_threads(offline) == 4  # offline: every core
    assert cpu_threads(serving, large=True) == 4  # large steps: every core too
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert cpu_threads(ParallelConfig(data_parallel_size=4)) == 1  # at least one
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert cpu_threads(serving) == torch.get_num_threads()  # left as torch set it


def test_large_steps_use_the_core_left_to_the_api_servers(
    checkpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Serving on 2 cores: 2 threads for steps of >= LARGE_STEP_FLOP and for decode steps
    while the API servers are quiet; 1 for small prefills and for decode steps while they are
    busy."""
    _, path = checkpoint
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert cpu_threads(ParallelConfig(api_server_count=1), large=True) == 2
    threads_before = torch.get_num_threads()
    config = ShoalConfig(
        model=ModelConfig(model=path),
        cache=CacheConfig(block_size=BLOCK_SIZE),
        scheduler=SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8),
        parallel=ParallelConfig(api_server_count=1),
    )
    try:
        runner = ModelRunner(config)
        runner.initialize_kv_cache(128)
        assert torch.get_num_threads() == 1
        # This model is tiny: pretend 8 tokens make a large step, and that the API servers
        # are busy streaming (a rate no test reaches).
        runner._large_step_tokens = 8
        runner._frontend_busy_tokens_per_s = -1.0
        seen: list[int] = []
        real_forward = runner._forward  # each step's forward, fused or not

        def forward(*args, **kwargs):
            seen.append(torch.get_num_threads())
            return real_forward(*args, **kwargs)

        monkeypatch.setattr(runner, "_forward", forward)
        driver = RunnerDriver(runner, num_blocks=128, chunk=64)
        driver.add("long", list(range(1, 17)), temperature=0.0, max_tokens=3)
        driver.run()
        # The 16-token prefill ran on both cores, the 1-token decode steps on one.
        assert seen[0] == 2 and seen[1:] and set(seen[1:]) == {1}
        # While the engine streams little, the API servers' core is used for every decode
        # step; a small prefill (4 tokens, under the large step) runs on one thread.
        runner._frontend_busy_tokens_per_s = FRONTEND_BUSY_TOKENS_PER_S
        runner._token_rate = TokenRate()
        seen.clear()
        driver.add("quiet", list(range(1, 5)), temperature=0.0, max_tokens=3)
        driver.run()
        assert seen[0] == 1 and seen[1:] and set(seen[1:]) == {2}
    finally:
        torch.set_num_threads(threads_before)


def test_token_rate_tracks_recent_throughput() -> None:
    now = [0.0]
    rate = TokenRate(time_constant_s=1.0, clock=lambda: now[0])
    for _ in range(200):  # 64 tokens every 25 ms: 2,560 tokens/s
        now[0] += 0.025
        rate.add(64)
    assert 2400 < rate.value < 2700
    now[0] += 5.0  # an idle spell, then one small step
    rate.add(1)
    assert rate.value < 50


def test_float16_kv_cache(checkpoint) -> None:
    """`--kv-cache-dtype float16`: half the bytes per block (twice the blocks for the same
    memory), keys and values stored rounded, generation runs through it."""
    _, path = checkpoint
    config = ShoalConfig(
        model=ModelConfig(model=path),
        cache=CacheConfig(block_size=BLOCK_SIZE, kv_cache_dtype="float16"),
        scheduler=SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8),
    )
    runner = ModelRunner(config)
    runner.initialize_kv_cache(128)
    assert runner.num_blocks_for_memory(10 * 1024 + 5) == 10  # float32: 2048 bytes per block
    assert all(c.dtype == torch.float16 for c in runner.kv_caches)
    driver = RunnerDriver(runner, num_blocks=128, chunk=5)
    for req_id in "ab":
        driver.add(req_id, PROMPTS[req_id], temperature=0.0, max_tokens=6)
    done = driver.run()
    assert all(len(done[r].outputs) == 6 for r in "ab")
    assert runner.kv_caches[0].abs().sum() > 0  # written
    with pytest.raises(ValueError, match="--kv-cache-dtype"):
        CacheConfig(kv_cache_dtype="fp8")


@pytest.mark.parametrize(
    ("flag", "model_dtype", "quantization", "expected"),
    [
        ("auto", torch.float32, None, torch.float32),  # the model's dtype, as in vLLM
        ("auto", torch.bfloat16, None, torch.bfloat16),
        ("auto", torch.float32, "int8", torch.float16),  # quantized weights: half the bytes
        ("auto", torch.float32, "gguf", torch.float16),
        ("float32", torch.float32, "int8", torch.float32),  # the way back
        ("float16", torch.float32, None, torch.float16),
    ],
)
def test_kv_cache_dtype_resolution(
    flag: str, model_dtype: torch.dtype, quantization: str | None, expected: torch.dtype
) -> None:
    assert kv_cache_torch_dtype(flag, model_dtype, quantization) == expected
