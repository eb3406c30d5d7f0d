"""EngineCore with the real ModelRunner: prompts given as input embeddings (`prompt_embeds`)
generate exactly what the same prompts' tokens do, however the steps chunk, batch, cache or
preempt them, and never share prefix-cache blocks with token prompts."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest

from tests.core.test_engine_core_runner import PROMPTS, TINY_CONFIG, make_core, request, run

torch = pytest.importorskip("torch")

from shoal.engine.core import EngineCore  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("tiny-llama-embeds")
    (path / "config.json").write_text(json.dumps(TINY_CONFIG))
    return str(path)


@pytest.fixture(scope="module")
def reference(model_dir: str) -> dict[str, list[int]]:
    core = make_core(model_dir, prefix_caching=False)
    return {rid: run(core, [request(rid, p, max_tokens=10)])[rid][0] for rid, p in PROMPTS.items()}


def add_embeds(core: EngineCore, rid: str, prompt: list[int], **params: Any) -> None:
    embeds = core.model_runner.model.embed_tokens[prompt].clone()  # type: ignore[attr-defined]
    salt = hashlib.sha256(embeds.numpy().tobytes()).digest()
    core.add_request(request(rid, [0] * len(prompt), max_tokens=10, **params), embeds, salt)


def tokens_of(results: dict) -> dict[str, list[int]]:
    return {rid: toks for rid, (toks, _) in results.items()}


@pytest.mark.parametrize(
    "engine",
    [
        {},  # one step per prompt
        {"budget": 5},  # chunked prefill: the tensor's rows in slices
        {"num_blocks": 12, "max_model_len": 48},  # preemption: prompts recomputed
    ],
    ids=["plain", "chunked", "preempted"],
)
def test_embeddings_generate_what_their_tokens_do(
    model_dir: str, reference: dict[str, list[int]], engine: dict[str, int]
) -> None:
    core = make_core(model_dir, **engine)
    for rid, prompt in PROMPTS.items():
        add_embeds(core, rid, prompt)
    results = run(core, [])
    assert tokens_of(results) == reference
    if "num_blocks" in engine:
        assert sum(s.num_preemptions for s in core.stats_seen) > 0  # type: ignore[attr-defined]


def test_embedding_and_token_prompts_batch_together(model_dir: str, reference) -> None:
    core = make_core(model_dir, budget=7)
    for rid in ("a", "c"):
        add_embeds(core, rid, PROMPTS[rid])
    results = run(core, [request(rid, PROMPTS[rid], max_tokens=10) for rid in ("b", "d")])
    assert tokens_of(results) == reference


def test_prefix_cache_shares_blocks_only_between_equal_tensors(model_dir: str, reference) -> None:
    core = make_core(model_dir)
    zeros = [0] * len(PROMPTS["c"])
    run(core, [request("z", zeros, max_tokens=10)])  # placeholder ids, cached by token hash
    add_embeds(core, "c", PROMPTS["c"])
    assert tokens_of(run(core, []))["c"] == reference["c"]
    assert core.num_cached["c"] == 0  # type: ignore[attr-defined]
    add_embeds(core, "c2", PROMPTS["c"])
    assert tokens_of(run(core, []))["c2"] == reference["c"]
    assert core.num_cached["c2"] > 0  # type: ignore[attr-defined]


def test_a_tensor_of_the_wrong_shape_is_refused(model_dir: str) -> None:
    core = make_core(model_dir)
    embeds = torch.zeros(3, TINY_CONFIG["hidden_size"])
    with pytest.raises(ValueError, match="prompt_embeds: shape"):
        core.add_request(request("x", [0, 0], max_tokens=2), embeds, b"salt")
    with pytest.raises(ValueError, match="prompt_embeds: shape"):
        core.add_request(request("y", [0, 0, 0], max_tokens=2), torch.zeros(3, 5), b"salt")
