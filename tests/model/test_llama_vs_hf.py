"""shoal's Llama-family model against transformers' on the same weights (float32)."""

from __future__ import annotations

import random

import pytest
import torch

from shoal.config import ModelConfig
from shoal.model.arch import arch_from_source
from shoal.model.loader import load_model
from shoal.model_source import resolve_model
from tests.model.paged import PagedDriver
from tests.model.tiny_hf import VOCAB, hf_logits, make_hf_model, save_hf_model

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 50000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
VARIANTS = {
    "llama": ("llama", {}),
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "llama-attention-bias": ("llama", {"attention_bias": True}),
    "llama-rope-llama3": ("llama", {"rope_parameters": LLAMA3_ROPE}),
    "llama-rope-linear": (
        "llama",
        {"rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}},
    ),
    "qwen2": ("qwen2", {}),
    "mistral-sliding-window": ("mistral", {"sliding_window": 5}),
}


def _load_pair(tmp_path, variant: str):
    kind, overrides = VARIANTS[variant]
    hf = make_hf_model(kind, **overrides)
    source = resolve_model(save_hf_model(hf, str(tmp_path / variant)))
    arch = arch_from_source(source)
    model = load_model(
        ModelConfig(model=source.path), source, arch, 256, torch.float32, torch.device("cpu")
    )
    return hf, model, arch


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_prefill_logits_match_transformers(tmp_path, variant: str) -> None:
    hf, model, arch = _load_pair(tmp_path, variant)
    token_ids = torch.randint(0, VOCAB, (23,), generator=torch.Generator().manual_seed(1)).tolist()
    driver = PagedDriver(model, arch, num_blocks=16, block_size=4)
    driver.add("a", token_ids)
    ours = driver.step({"a": len(token_ids)})["a"]
    torch.testing.assert_close(ours, hf_logits(hf, token_ids), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", ["llama", "qwen2", "mistral-sliding-window"])
def test_paged_steps_match_full_sequence(tmp_path, variant: str) -> None:
    """Several requests of uneven lengths, prompts split across steps, decodes mixed with
    prefill chunks, blocks shuffled, and one request starting from another's cached blocks:
    every token's logits equal a full-sequence forward's."""
    hf, model, arch = _load_pair(tmp_path, variant)
    rng = random.Random(3)
    seqs = {name: [rng.randrange(VOCAB) for _ in range(length)] for name, length in
            [("a", 21), ("b", 14), ("c", 9), ("d", 1)]}  # fmt: skip
    # "e" shares b's first 8 tokens, read from b's first two blocks (a prefix-cache hit).
    seqs["e"] = seqs["b"][:8] + [rng.randrange(VOCAB) for _ in range(7)]
    driver = PagedDriver(model, arch, num_blocks=64, block_size=4)
    for name in "abcd":
        driver.add(name, seqs[name])
    got: dict[str, list[torch.Tensor]] = {name: [] for name in seqs}
    schedules = [
        {"a": 6, "b": 3},  # two first chunks
        {"d": 1, "a": 7, "c": 9},  # a one-token prompt; a's second chunk; c whole
        {"c": 0, "b": 5, "a": 1},  # c idle
        {"a": 1, "c": 0, "b": 6},
    ]
    for schedule in schedules:
        schedule = {k: v for k, v in sorted(schedule.items(), key=lambda kv: kv[1] != 1) if v}
        for name, logits in driver.step(schedule).items():
            got[name].append(logits)
    driver.add("e", seqs["e"], shared_blocks=driver.requests["b"].block_ids[:2])
    got["e"].append(torch.empty(0, VOCAB))
    # Now decode everyone one token at a time (e first gets a 5-token chunk).
    while any(r.num_computed < len(r.token_ids) for r in driver.requests.values()):
        left = {n: len(r.token_ids) - r.num_computed for n, r in driver.requests.items()}
        schedule = {n: 1 for n, k in left.items() if k and n != "e"}
        if left["e"]:
            schedule["e"] = min(left["e"], 5) if left["e"] > 2 else 1
        schedule = dict(sorted(schedule.items(), key=lambda kv: kv[1] != 1))
        for name, logits in driver.step(schedule).items():
            got[name].append(logits)
    for name, tokens in seqs.items():
        start = 8 if name == "e" else 0
        expected = hf_logits(hf, tokens)[start:]
        torch.testing.assert_close(torch.cat(got[name]), expected, atol=2e-4, rtol=1e-4)
