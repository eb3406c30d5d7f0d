"""The default model (SmolLM2-135M-Instruct, GGUF Q4_1, run in float32): greedy tokens equal
transformers' `generate` on the same file (it dequantizes the same way), alone with chunked
prefill, and batched under preemption with prefix-cache hits; logprobs and stop strings on
real text. (tests/e2e_offline/test_random_checkpoint.py covers each feature on its own.)"""

from __future__ import annotations

import dataclasses
import gc
import os

import pytest

from shoal import LLM, SamplingParams
from shoal.model_source import default_model_path
from shoal.processing.tokenizer import Tokenizer
from tests.e2e_offline.hf_reference import HFResult, assert_same_tokens, hf_greedy

pytestmark = pytest.mark.slow

MAX_TOKENS = 64
NUM_LOGPROBS = 5
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
QUESTIONS = [  # chat prompts: they share the template's system prompt (a cached prefix)
    "What is the capital of France? Answer in one word.",
    "What is 7 times 8? Reply with only the number.",
    "Say hello in Spanish.",
    "Translate 'thank you' into French. Only the translation.",
    "Is the sky blue? Answer yes or no.",
]
TEXTS = [
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "Les fleurs du jardin sont très belles au printemps, et",
    "1, 2, 3, 4, 5,",
    "The history of the Roman Empire spans more than a thousand years. It began when Augustus "
    "became the first emperor in 27 BC, after a long period of civil war that ended the Roman "
    "Republic. Over the following centuries, the empire",
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_model(None)


@pytest.fixture(scope="module")
def prompts(tokenizer: Tokenizer) -> list[list[int]]:
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS]
    return [tokenizer.encode(c, add_special_tokens=False) for c in chats] + [
        tokenizer.encode(t) for t in TEXTS
    ]


@pytest.fixture(scope="module")
def refs(prompts: list[list[int]]) -> list[HFResult]:
    import torch
    from transformers import AutoModelForCausalLM

    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    ).eval()
    results = hf_greedy(model, prompts, MAX_TOKENS, eos_token_id=2, num_logprobs=NUM_LOGPROBS)
    del model
    gc.collect()
    return results


@pytest.fixture(scope="module")
def llm() -> LLM:
    # One engine for the whole module (loading is the slow part), sized so that a 32-token step
    # budget chunks every prompt longer than 32 tokens, and 24 KV blocks (384 token slots)
    # cannot hold the 10-prompt batch at once, so the batch preempts and recomputes.
    # The exact path, pinned: with no flags the default model runs in gguf mode.
    return LLM(
        dtype="float32",
        quantization="none",
        num_blocks=24,
        max_num_batched_tokens=32,
        max_num_seqs=10,
    )


def _token_prompts(prompts: list[list[int]]) -> list[dict[str, list[int]]]:
    return [{"prompt_token_ids": p} for p in prompts]


def test_references_are_varied(refs: list[HFResult]) -> None:
    lengths = [len(r.token_ids) for r in refs]
    assert any(n < MAX_TOKENS for n in lengths) and lengths.count(MAX_TOKENS) >= 4


def test_each_alone_with_chunked_prefill(llm: LLM, prompts, refs, tokenizer) -> None:
    assert sum(len(p) > 32 for p in prompts) >= 5  # these prefill in chunks
    outs = [llm.generate(p, GREEDY, use_tqdm=False)[0] for p in _token_prompts(prompts)]
    assert_same_tokens("alone (chunked prefill)", outs, refs, tokenizer)


def test_batched_with_preemption_and_prefix_hits(llm: LLM, prompts, refs, tokenizer) -> None:
    before = dataclasses.replace(llm.stats)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=NUM_LOGPROBS)
    outs = llm.generate(_token_prompts(prompts), params, use_tqdm=False)
    assert_same_tokens("batched (preemption, prefix-cache hits)", outs, refs, tokenizer)
    assert llm.stats.num_preemptions > before.num_preemptions
    # The chat prompts share the template's system prompt, and the cache is warm.
    assert llm.stats.prefix_cache_hits > before.prefix_cache_hits
    assert sum(o.num_cached_tokens > 0 for o in outs) >= 5
    for out, ref in zip(outs, refs, strict=True):
        _assert_logprobs_match(out.outputs[0].logprobs, ref)


def _assert_logprobs_match(ours, ref: HFResult) -> None:
    """Top-k logprobs agree with transformers' log_softmax of its logits."""
    assert ours is not None and ref.top_logprobs is not None
    assert len(ours) == len(ref.token_ids)
    for position, theirs in zip(ours, ref.top_logprobs, strict=True):
        top = {t: lp.logprob for t, lp in position.items() if lp.rank <= NUM_LOGPROBS}
        assert set(top) == set(theirs)
        for token_id, logprob in theirs.items():
            assert top[token_id] == pytest.approx(logprob, abs=2e-3)


def test_stop_strings_on_real_text(llm: LLM, prompts, refs, tokenizer) -> None:
    counting = prompts[8]  # "1, 2, 3, 4, 5," -> " 6, 7, 8, ..."
    full = tokenizer.decode(refs[8].token_ids)
    for include in (False, True):
        params = SamplingParams(
            temperature=0.0,
            max_tokens=MAX_TOKENS,
            stop=[" 9,", "\n"],
            include_stop_str_in_output=include,
        )
        (out,) = llm.generate({"prompt_token_ids": counting}, params)
        cut = full.index(" 9,") + (len(" 9,") if include else 0)
        assert out.outputs[0].text == full[:cut]
        assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason == " 9,"
