"""Offline `LLM` on a tiny random checkpoint against transformers: embeddings (`LLM.embed`),
prompt logprobs on `RequestOutput`, and bad words tokenized by the input processor."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shoal import LLM, SamplingParams
from tests.helpers import make_tiny_hf_checkpoint

TEXTS = ["The quick brown fox", "jumps over the lazy dog"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_tiny_hf_checkpoint(str(tmp_path_factory.mktemp("tiny-hf")), seed=8)


@pytest.fixture(scope="module")
def hf(checkpoint: str):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(checkpoint, torch_dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def llm(checkpoint: str) -> LLM:
    # A small token budget: long prompts arrive in several chunks.
    return LLM(checkpoint, num_blocks=128, max_num_seqs=8, max_num_batched_tokens=4)


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_embed_equals_transformers(llm: LLM, hf, pooling: str) -> None:
    vectors = llm.embed(TEXTS, pooling=pooling, use_tqdm=False)
    tokenizer = llm.get_tokenizer()
    for text, vector in zip(TEXTS, vectors, strict=True):
        with torch.no_grad():
            hidden = hf.model(torch.tensor([tokenizer.encode(text)])).last_hidden_state[0]
        expected = hidden.mean(0) if pooling == "mean" else hidden[-1]
        expected = torch.nn.functional.normalize(expected, dim=-1)
        np.testing.assert_allclose(vector, expected.numpy(), atol=1e-4)
    raw = llm.embed(TEXTS[0], pooling=pooling, normalize=False, use_tqdm=False)[0]
    assert abs(np.linalg.norm(raw) - 1.0) > 1e-3  # not normalized
    np.testing.assert_allclose(np.asarray(raw) / np.linalg.norm(raw), vectors[0], atol=1e-5)


def test_prompt_logprobs_on_request_output(llm: LLM, hf) -> None:
    ids = llm.get_tokenizer().encode(TEXTS[1])
    params = SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=2, n=2)
    (out,) = llm.generate({"prompt_token_ids": ids}, params, use_tqdm=False)
    assert out.prompt_logprobs is not None and len(out.prompt_logprobs) == len(ids)
    assert out.prompt_logprobs[0] is None
    with torch.no_grad():
        reference = hf(torch.tensor([ids])).logits[0].log_softmax(-1)
    for j, position in enumerate(out.prompt_logprobs[1:]):
        assert position is not None
        chosen = position[ids[j + 1]]
        assert chosen.logprob == pytest.approx(reference[j, ids[j + 1]].item(), abs=1e-4)
        top = [t for t, lp in position.items() if lp.rank is not None and lp.rank <= 2]
        assert set(top) >= set(reference[j].topk(2).indices.tolist()) - {ids[j + 1]}
    assert all(len(o.token_ids) == 2 for o in out.outputs)


def test_bad_words_from_text(llm: LLM) -> None:
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    (plain,) = llm.generate(TEXTS[0], greedy, use_tqdm=False)
    tokenizer = llm.get_tokenizer()
    first = tokenizer.decode(plain.outputs[0].token_ids[:1]).strip()
    assert first
    banned = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, bad_words=[first])
    (out,) = llm.generate(TEXTS[0], banned, use_tqdm=False)
    words = {tokenizer.decode([t]).strip() for t in out.outputs[0].token_ids}
    assert first not in words
