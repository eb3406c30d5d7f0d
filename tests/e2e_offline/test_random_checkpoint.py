"""Greedy tokens of a random-weight Llama checkpoint equal transformers' `generate`: alone,
batched, with chunked prefill, with prefix-cache hits and after preemption."""

from __future__ import annotations

import gc

import pytest

from shoal import LLM, SamplingParams
from shoal.processing.tokenizer import Tokenizer
from tests.e2e_offline.hf_reference import HFResult, assert_same_tokens, hf_greedy
from tests.helpers import make_tiny_hf_checkpoint

MAX_TOKENS = 64
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
TEXTS = [
    "Hello",
    "The quick brown fox jumps over the lazy dog.",
    "def main():\n    print('hi')\n",
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10",
    "Les fleurs du jardin sont très belles",
    "你好，世界！这是一个测试。",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "A" * 40,
    " ".join(f"word{i}" for i in range(45)),  # ~140 tokens: several blocks, several chunks
    "Emoji 🎉🚀 and accents: é à ü ñ",
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_tiny_hf_checkpoint(str(tmp_path_factory.mktemp("tiny-ckpt")), seed=1234)


@pytest.fixture(scope="module")
def tokenizer(checkpoint: str) -> Tokenizer:
    return Tokenizer.from_model(checkpoint)


@pytest.fixture(scope="module")
def prompts(tokenizer: Tokenizer) -> list[list[int]]:
    return [tokenizer.encode(t) for t in TEXTS]


@pytest.fixture(scope="module")
def refs(checkpoint: str, prompts: list[list[int]]) -> list[HFResult]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    results = hf_greedy(model, prompts, MAX_TOKENS, eos_token_id=2)
    del model
    gc.collect()
    return results


def _llm(checkpoint: str, **settings: object) -> LLM:
    return LLM(checkpoint, dtype="float32", **{"num_blocks": 256, **settings})


def _token_prompts(prompts: list[list[int]]) -> list[dict[str, list[int]]]:
    return [{"prompt_token_ids": p} for p in prompts]


@pytest.fixture(scope="module")
def llm(checkpoint: str) -> LLM:
    return _llm(checkpoint)


def test_each_alone(llm: LLM, prompts, refs, tokenizer) -> None:
    outs = [llm.generate(p, GREEDY, use_tqdm=False)[0] for p in _token_prompts(prompts)]
    assert_same_tokens("alone", outs, refs, tokenizer)


def test_batched(llm: LLM, prompts, refs, tokenizer) -> None:
    assert_same_tokens("batched", llm.generate(_token_prompts(prompts), GREEDY), refs, tokenizer)


def test_prefix_cache_hits(llm: LLM, prompts, refs, tokenizer) -> None:
    # Every prompt already ran above, and prompt 7's 40 "A"s share blocks with a longer run.
    hits_before = llm.stats.prefix_cache_hits
    shared = [p + p[:20] for p in prompts[8:]]
    llm.generate(_token_prompts(shared), GREEDY, use_tqdm=False)
    outs = llm.generate(_token_prompts(prompts), GREEDY, use_tqdm=False)
    assert llm.stats.prefix_cache_hits > hits_before
    assert sum(o.num_cached_tokens for o in outs) >= 16 * len(prompts[:8])
    assert_same_tokens("prefix-cache hits", outs, refs, tokenizer)


def test_chunked_prefill(checkpoint: str, prompts, refs, tokenizer) -> None:
    llm = _llm(checkpoint, max_num_batched_tokens=8, enable_prefix_caching=False)
    outs = llm.generate(_token_prompts(prompts), GREEDY, use_tqdm=False)
    assert llm.stats.num_steps > max(map(len, prompts)) // 8
    assert_same_tokens("chunked prefill", outs, refs, tokenizer)


def test_after_preemption(checkpoint: str, prompts, refs, tokenizer) -> None:
    # 16 blocks of 16 tokens: the longest request alone needs 14, so the batch must preempt.
    llm = _llm(checkpoint, num_blocks=16, max_num_batched_tokens=64)
    outs = llm.generate(_token_prompts(prompts), GREEDY, use_tqdm=False)
    assert llm.stats.num_preemptions > 0
    assert_same_tokens("after preemption", outs, refs, tokenizer)
