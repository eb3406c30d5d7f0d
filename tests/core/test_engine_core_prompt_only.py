"""Prompt work in a real EngineCore on a tiny transformers checkpoint: prompt logprobs and
pooled embeddings equal a reference computed here from transformers, whatever the chunking,
the prefix cache and preemption; prompt-only requests (max_tokens 0) end after the prompt."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from shoal.config import CacheConfig, ModelConfig, SchedulerConfig, ShoalConfig
from shoal.engine.core import EngineCore
from shoal.protocol import EngineCoreOutput, EngineCoreRequest, FinishReason
from shoal.sampling_params import SamplingParams
from tests.model.tiny_hf import make_hf_model, save_hf_model

PROMPT = [5, 17, 301, 44, 9, 120, 77, 3, 250, 61, 18, 5, 17, 400, 2, 33, 99]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory):
    hf = make_hf_model("llama", seed=3)
    return hf, save_hf_model(hf, str(tmp_path_factory.mktemp("tiny-llama")))


def make_core(path: str, budget: int = 256, num_blocks: int = 256) -> EngineCore:
    return EngineCore(
        ShoalConfig(
            model=ModelConfig(model=path, max_model_len=128),
            cache=CacheConfig(block_size=4, num_blocks=num_blocks),
            scheduler=SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=8),
        )
    )


def run(core: EngineCore, requests: dict[str, SamplingParams], prompt=PROMPT):
    for req_id, params in requests.items():
        core.add_request(EngineCoreRequest(req_id, list(prompt), params, None, time.time()))
    outputs: dict[str, list[EngineCoreOutput]] = {r: [] for r in requests}
    for _ in range(500):
        if not core.has_unfinished_requests():
            break
        for output in core.step().outputs:
            outputs[output.request_id].append(output)
        core.scheduler.check_integrity()
    assert not core.has_unfinished_requests()
    return outputs


def hf_prompt_logprobs(hf, prompt: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([prompt])).logits[0].float().log_softmax(-1)  # [P, vocab]


def check_prompt_logprobs(hf, entries, prompt: list[int], k: int) -> None:
    reference = hf_prompt_logprobs(hf, prompt)
    assert [e.token_id for e in entries] == prompt[1:]
    for j, entry in enumerate(entries):
        dist = reference[j]
        assert abs(entry.logprob - dist[prompt[j + 1]].item()) < 1e-4
        assert entry.rank == int((dist > dist[prompt[j + 1]]).sum()) + 1
        assert entry.top_token_ids == dist.topk(k).indices.tolist()


@pytest.mark.parametrize("budget", [256, 5])  # whole prompt, then chunks of 5
def test_prompt_logprobs_match_transformers(checkpoint, budget: int) -> None:
    hf, path = checkpoint
    core = make_core(path, budget=budget)
    outputs = run(
        core,
        {
            "scored": SamplingParams(max_tokens=0, prompt_logprobs=3),
            "gen": SamplingParams(temperature=0.0, max_tokens=3, prompt_logprobs=2),
            "plain": SamplingParams(temperature=0.0, max_tokens=3),
        },
    )
    (scored,) = outputs["scored"]
    assert scored.finish_reason == FinishReason.LENGTH and scored.new_token_ids == []
    check_prompt_logprobs(hf, scored.prompt_logprobs, PROMPT, 3)
    first, *rest = outputs["gen"]
    check_prompt_logprobs(hf, first.prompt_logprobs, PROMPT, 2)
    assert all(o.prompt_logprobs is None for o in rest)
    assert sum(len(o.new_token_ids) for o in outputs["gen"]) == 3
    assert all(o.prompt_logprobs is None for o in outputs["plain"])


def test_prompt_logprobs_ignore_prefix_cache_hits(checkpoint) -> None:
    hf, path = checkpoint
    core = make_core(path, budget=6)
    run(core, {"warm": SamplingParams(temperature=0.0, max_tokens=1)})  # caches the blocks
    (scored,) = run(core, {"scored": SamplingParams(max_tokens=0, prompt_logprobs=1)})["scored"]
    check_prompt_logprobs(hf, scored.prompt_logprobs, PROMPT, 1)
    assert scored.num_cached_tokens == 0


def test_prompt_logprobs_after_preemption(checkpoint) -> None:
    """A request preempted mid-prompt computes it again: its logprobs come once, complete."""
    hf, path = checkpoint
    core = make_core(path, budget=4)
    params = SamplingParams(max_tokens=0, prompt_logprobs=1)
    core.add_request(EngineCoreRequest("p", list(PROMPT), params, None, time.time()))
    core.step()
    core.step()  # two chunks in
    request = core.scheduler.requests["p"]
    assert request.prompt_logprobs
    core.scheduler.running.remove(request)
    core.scheduler._preempt(request)
    (scored,) = _finish(core, "p")
    check_prompt_logprobs(hf, scored.prompt_logprobs, PROMPT, 1)


def _finish(core: EngineCore, req_id: str) -> list[EngineCoreOutput]:
    outputs = []
    while core.has_unfinished_requests():
        outputs += [o for o in core.step().outputs if o.request_id == req_id]
        core.scheduler.check_integrity()
    return outputs


def reference_embedding(hf, prompt: list[int], pooling: str, normalize: bool = True):
    with torch.no_grad():
        hidden = hf.model(torch.tensor([prompt])).last_hidden_state[0].float()
    vector = hidden.mean(0) if pooling == "mean" else hidden[-1]
    return torch.nn.functional.normalize(vector, dim=-1) if normalize else vector


@pytest.mark.parametrize("pooling", ["mean", "last"])
@pytest.mark.parametrize("budget", [256, 3])
def test_embeddings_match_transformers(checkpoint, pooling: str, budget: int) -> None:
    hf, path = checkpoint
    core = make_core(path, budget=budget)
    run(core, {"warm": SamplingParams(temperature=0.0, max_tokens=1)})  # prefix cache warm
    outputs = run(
        core,
        {
            "emb": SamplingParams(max_tokens=0, pooling=pooling),
            "raw": SamplingParams(max_tokens=0, pooling=pooling, normalize=False),
            "gen": SamplingParams(temperature=0.0, max_tokens=4),
        },
    )
    for req_id, normalize in (("emb", True), ("raw", False)):
        (out,) = outputs[req_id]
        assert out.finish_reason == FinishReason.LENGTH and out.new_token_ids == []
        got = torch.from_numpy(np.frombuffer(out.embedding, dtype="<f4").copy())
        expected = reference_embedding(hf, PROMPT, pooling, normalize)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert sum(len(o.new_token_ids) for o in outputs["gen"]) == 4


def test_prompt_only_without_work_samples_nothing(checkpoint) -> None:
    _, path = checkpoint
    core = make_core(path)
    (out,) = run(core, {"echo": SamplingParams(max_tokens=0)})["echo"]
    assert out.new_token_ids == [] and out.finish_reason == FinishReason.LENGTH
    assert out.prompt_logprobs is None and out.embedding == b""
    assert not core.model_runner.prompt_pass.is_active


@pytest.mark.parametrize(
    ("fields", "name"),
    [
        ({"logit_bias": {10**6: 1.0}}, "logit_bias"),
        ({"allowed_token_ids": [3, 10**6]}, "allowed_token_ids"),
        ({"bad_words_token_ids": [[5, 10**6]]}, "bad_words"),
    ],
)
def test_control_ids_outside_the_vocabulary_are_refused(checkpoint, fields, name) -> None:
    """The engine checks control ids itself (other clients of its socket may send anything):
    `ValueError` naming the field, and the engine keeps serving."""
    _, path = checkpoint
    core = make_core(path)
    params = SamplingParams(temperature=0.0, max_tokens=2, **fields)
    with pytest.raises(ValueError, match=f"^{name}:"):
        core.add_request(EngineCoreRequest("bad", list(PROMPT), params, None, time.time()))
    outputs = run(core, {"ok": SamplingParams(temperature=0.0, max_tokens=2)})
    assert sum(len(o.new_token_ids) for o in outputs["ok"]) == 2
