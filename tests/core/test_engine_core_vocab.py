"""The engine's own check of prompt token ids against the model's vocabulary, in-process:
`EngineCore.add_request` refuses an id outside it (before, the embedding lookup failed the
whole step), the engine keeps serving, and the offline `LLM` reports a `ValueError`."""

from __future__ import annotations

import json
import time

import pytest

from shoal.config import CacheConfig, ModelConfig, ShoalConfig
from shoal.protocol import EngineCoreRequest, FinishReason
from shoal.sampling_params import SamplingParams
from tests.helpers import TINY_LLAMA_CONFIG, make_tiny_model_dir

pytest.importorskip("torch")
pytest.importorskip("shoal.worker.model_runner")

from shoal import LLM  # noqa: E402
from shoal.engine.core import EngineCore  # noqa: E402

VOCAB = 384


@pytest.fixture(scope="module")
def core(tmp_path_factory: pytest.TempPathFactory) -> EngineCore:
    path = tmp_path_factory.mktemp("tiny-llama-384")
    config = {**TINY_LLAMA_CONFIG, "vocab_size": VOCAB, "max_position_embeddings": 256}
    (path / "config.json").write_text(json.dumps(config))
    return EngineCore(
        ShoalConfig(
            model=ModelConfig(model=str(path), load_format="dummy", max_model_len=128),
            cache=CacheConfig(block_size=4, num_blocks=64),
        )
    )


def _request(request_id: str, prompt: list[int], max_tokens: int = 4) -> EngineCoreRequest:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return EngineCoreRequest(request_id, prompt, params, None, time.time())


def _run(core: EngineCore) -> dict[str, tuple[int, FinishReason | None]]:
    """Step until idle: {request id: (tokens generated, finish reason)}."""
    got: dict[str, tuple[int, FinishReason | None]] = {}
    for _ in range(200):
        if not core.has_unfinished_requests():
            return got
        for o in core.step().outputs:
            count = got.get(o.request_id, (0, None))[0]
            got[o.request_id] = (count + len(o.new_token_ids), o.finish_reason)
    raise AssertionError("the engine did not finish")


@pytest.mark.parametrize(("bad", "position"), [(VOCAB, 1), (-1, 2), (10**9, 0)])
def test_an_id_outside_the_vocabulary_is_refused_and_others_run(
    core: EngineCore, bad: int, position: int
) -> None:
    assert core.model_runner.vocab_size == VOCAB
    core.add_request(_request("running", [5, 6, 7, 8], max_tokens=6))
    (first,) = core.step().outputs  # "running" is in flight when the bad request comes
    assert len(first.new_token_ids) == 1
    prompt = [5, 6, 7]
    prompt[position] = bad
    with pytest.raises(ValueError, match=rf"token id {bad} at position {position} .*size {VOCAB}"):
        core.add_request(_request("bad", prompt))
    # Refused before it was queued: its id is free, and the engine serves everyone.
    core.add_request(_request("bad", [5, 6, VOCAB - 1]))
    results = _run(core)
    assert results["running"] == (5, FinishReason.LENGTH)
    assert results["bad"] == (4, FinishReason.LENGTH)
    assert core.scheduler.kv.num_free_blocks == core.num_blocks


def test_offline_llm_refuses_an_id_past_the_models_vocabulary(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    # The default tokenizer (49152 ids) over a model with 1000: the input processor checks
    # against the smaller of the two (the engine's own check is the test above).
    model_dir = make_tiny_model_dir(str(tmp_path_factory.mktemp("vocab-1000")), vocab_size=1000)
    llm = LLM(model_dir, load_format="dummy", num_blocks=64)
    greedy = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    with pytest.raises(ValueError, match=r"token id 5000 at position 1 .*\[0, 1000\)"):
        llm.generate([[5, 5000, 7]], greedy, use_tqdm=False)
    # Text whose tokens fall past the model's rows is refused too, not sent to fail there.
    with pytest.raises(ValueError, match=r"prompt: token id \d+ at position \d+"):
        llm.generate(["The quick brown fox jumps over the lazy dog"], greedy, use_tqdm=False)
    # A refused stream leaves nothing behind: the next request runs.
    with pytest.raises(ValueError):
        list(llm.stream([5, 5000, 7], greedy))
    (out,) = llm.generate([[5, 999, 7]], greedy, use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 3
