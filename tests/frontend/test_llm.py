"""Offline `LLM` on a tiny random-weight model: prompt forms, n, seeds, stop strings, logprobs,
chat, streaming and validation."""

from __future__ import annotations

import pytest

from shoal import LLM, SamplingParams
from shoal.entrypoints.llm import build_config

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
PROMPTS = ["Hello, my name is", "The capital of France is", "def add(a, b):", "1 2 3"]


@pytest.fixture(scope="module")
def llm(tiny_model_dir: str) -> LLM:
    return LLM(tiny_model_dir, load_format="dummy", num_blocks=256, max_num_seqs=8)


def test_generate_one_string(llm: LLM) -> None:
    (out,) = llm.generate("Hello", GREEDY)
    assert out.prompt == "Hello" and out.finished
    assert out.prompt_token_ids == llm.get_tokenizer().encode("Hello")
    (seq,) = out.outputs
    assert len(seq.token_ids) == 12 and seq.finish_reason == "length"
    assert seq.text == llm.get_tokenizer().decode(seq.token_ids)


def test_batch_keeps_order_and_matches_single_runs(llm: LLM) -> None:
    batch = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.prompt for o in batch] == PROMPTS
    for prompt, out in zip(PROMPTS, batch, strict=True):
        (alone,) = llm.generate(prompt, GREEDY)
        assert alone.outputs[0].token_ids == out.outputs[0].token_ids


def test_token_id_prompts_and_per_prompt_params(llm: LLM) -> None:
    ids = llm.get_tokenizer().encode("Hello")
    outs = llm.generate(
        [{"prompt_token_ids": ids}, ids, "Hello"],
        [GREEDY, SamplingParams(temperature=0.0, max_tokens=3), GREEDY],
    )
    assert outs[0].prompt is None and outs[0].prompt_token_ids == ids
    assert [len(o.outputs[0].token_ids) for o in outs] == [12, 3, 12]
    assert outs[0].outputs[0].token_ids == outs[2].outputs[0].token_ids
    assert outs[1].outputs[0].token_ids == outs[0].outputs[0].token_ids[:3]
    (single,) = llm.generate(ids, GREEDY)  # a bare list of ids is one prompt
    assert single.outputs[0].token_ids == outs[0].outputs[0].token_ids


def test_bad_prompt_rejects_the_whole_batch(llm: LLM) -> None:
    with pytest.raises(ValueError, match="^prompt: must not be empty"):
        llm.generate(["fine", ""], GREEDY)
    with pytest.raises(ValueError, match="^sampling_params: got 1 for 2 prompts"):
        llm.generate(["a", "b"], [GREEDY])
    with pytest.raises(ValueError, match="^max_tokens: .*maximum context length"):
        llm.generate("a", SamplingParams(max_tokens=10**6))
    assert not llm.engine.has_unfinished_requests()
    assert llm.generate([], GREEDY) == []


def test_max_tokens_none_fills_the_context(llm: LLM) -> None:
    prompt = [100] * (llm.max_model_len - 5)
    (out,) = llm.generate(prompt, SamplingParams(max_tokens=None, ignore_eos=True))
    assert len(out.outputs[0].token_ids) == 5


def test_n_and_seeds_reproduce(llm: LLM) -> None:
    params = SamplingParams(n=3, seed=7, temperature=1.0, max_tokens=8, ignore_eos=True)
    (first,) = llm.generate("Tell me", params)
    assert [o.index for o in first.outputs] == [0, 1, 2]
    seqs = [tuple(o.token_ids) for o in first.outputs]
    assert len(set(seqs)) == 3  # child i samples with seed 7 + i
    # The same seed gives the same tokens, alone or batched with other requests.
    others = SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True)
    again = llm.generate(["Tell me", "noise", "more noise"], [params, others, others])
    assert [tuple(o.token_ids) for o in again[0].outputs] == seqs
    (one,) = llm.generate("Tell me", SamplingParams(seed=8, max_tokens=8, ignore_eos=True))
    assert tuple(one.outputs[0].token_ids) == seqs[1]


def test_stop_string_cuts_text(llm: LLM) -> None:
    tok = llm.get_tokenizer()
    (ref,) = llm.generate("Hello", GREEDY)
    text = ref.outputs[0].text
    # Two tokens from the middle that decode to whole characters.
    stop = next(
        s
        for k in range(3, 9)
        if (s := tok.decode(ref.outputs[0].token_ids[k : k + 2]))
        and "\ufffd" not in s
        and s in text
    )
    (out,) = llm.generate(
        "Hello", SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, stop=[stop])
    )
    seq = out.outputs[0]
    assert seq.text == text[: text.index(stop)]
    assert seq.finish_reason == "stop" and seq.stop_reason == stop
    assert len(seq.token_ids) < 12
    assert not llm.engine.engine_core.scheduler.has_unfinished_requests()


def test_logprobs_shape(llm: LLM) -> None:
    (out,) = llm.generate(
        "Hello", SamplingParams(temperature=0.0, max_tokens=5, logprobs=3, ignore_eos=True)
    )
    seq = out.outputs[0]
    assert seq.logprobs is not None and len(seq.logprobs) == 5
    for token_id, position in zip(seq.token_ids, seq.logprobs, strict=True):
        # Greedy: the sampled token is the top one, listed first; the top 3 hold it.
        assert next(iter(position)) == token_id and position[token_id].rank == 1
        assert sorted(lp.rank for lp in position.values()) == [1, 2, 3]
        assert all(lp.logprob <= 0.0 and lp.decoded_token is not None for lp in position.values())
    total = sum(p[t].logprob for t, p in zip(seq.token_ids, seq.logprobs, strict=True))
    assert seq.cumulative_logprob == pytest.approx(total, abs=1e-4)
    (plain,) = llm.generate("Hello", SamplingParams(max_tokens=2, logprobs=0))
    assert plain.outputs[0].logprobs is not None
    assert all(len(p) == 1 for p in plain.outputs[0].logprobs)


def test_chat_renders_the_template(llm: LLM) -> None:
    conversation = [{"role": "user", "content": "Hi there"}]
    (out,) = llm.chat(conversation, GREEDY)
    tok = llm.get_tokenizer()
    assert out.prompt == tok.apply_chat_template(conversation)
    assert out.prompt_token_ids == tok.encode(out.prompt, add_special_tokens=False)
    both = llm.chat([conversation, [{"role": "user", "content": "Bye"}]], GREEDY)
    assert both[0].outputs[0].token_ids == out.outputs[0].token_ids
    with pytest.raises(ValueError, match=r"^messages\[0\]\.content"):
        llm.chat([{"role": "user", "content": None}])


def test_stream_yields_deltas(llm: LLM) -> None:
    (ref,) = llm.generate("Hello", GREEDY)
    deltas = list(llm.stream("Hello", GREEDY))
    assert deltas[-1].finished and not any(d.finished for d in deltas[:-1])
    assert "".join(d.outputs[0].text for d in deltas) == ref.outputs[0].text
    assert [t for d in deltas for t in d.outputs[0].token_ids] == ref.outputs[0].token_ids
    # Leaving a stream early aborts its request.
    stream = llm.stream("Hello", GREEDY)
    next(stream)
    stream.close()
    assert not llm.output_processor.has_unfinished_requests()
    assert not llm.engine.engine_core.scheduler.has_unfinished_requests()


def test_progress_bar_on_stderr(llm: LLM, capsys: pytest.CaptureFixture[str]) -> None:
    llm.generate(PROMPTS, GREEDY)
    captured = capsys.readouterr()
    assert "Processed prompts" in captured.err and captured.out == ""
    llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert "Processed prompts" not in capsys.readouterr().err


def test_prefix_cache_hits_on_repeat(llm: LLM) -> None:
    prompt = "shared prefix " * 20
    llm.generate(prompt, GREEDY)
    before = llm.stats.prefix_cache_hits
    (out,) = llm.generate(prompt, GREEDY)
    assert llm.stats.prefix_cache_hits > before
    assert out.num_cached_tokens >= 16


def test_default_mode_is_auto_and_resolves_to_float32_on_an_hf_dir(llm: LLM) -> None:
    """`LLM()` takes `shoal serve`'s default, auto; the engine makes it concrete: a Hugging
    Face directory (the tiny model) has no 4-bit weights, so the exact float32 path runs."""
    assert llm.config.model.quantization == "auto"
    runner = llm.engine.engine_core.model_runner
    assert runner.config.model.quantization is None
    assert str(runner.kv_dtype) == "torch.float32"
    assert build_config(quantization="none").model.quantization is None


def test_config_settings() -> None:
    config = build_config(model="m", block_size=32, max_num_seqs=3, enable_chunked_prefill=False)
    assert config.cache.block_size == 32 and config.scheduler.max_num_seqs == 3
    assert not config.scheduler.enable_chunked_prefill
    with pytest.raises(ValueError, match="^gpu_memory_utilization: not a setting"):
        build_config(gpu_memory_utilization=0.9)
    with pytest.raises(ValueError, match="^--block-size"):
        LLM(block_size=3)
    with pytest.raises(ValueError, match="^data_parallel_size"):
        LLM(data_parallel_size=2)
