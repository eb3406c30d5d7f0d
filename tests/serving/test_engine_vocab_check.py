"""An engine process checks prompt token ids itself: a request sent straight to its socket
(bypassing the API server's check) with an id outside the model's vocabulary finishes with
an error, alone, while the engine keeps serving the requests around it."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from shoal.engine.manager import CoreEngineProcManager
from shoal.protocol import EngineCoreRequest, FinishReason
from shoal.sampling_params import SamplingParams
from tests.helpers import TINY_LLAMA_CONFIG, make_tiny_model_dir
from tests.serving.engine_harness import FakeApiServers, make_request, serving_engine, tokens

VOCAB = TINY_LLAMA_CONFIG["vocab_size"]


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[FakeApiServers, CoreEngineProcManager]]:
    model_dir = make_tiny_model_dir(str(tmp_path_factory.mktemp("tiny")))
    with serving_engine(model_dir, num_clients=1) as served:
        yield served


def _prompt_with(token_id: int, request_id: str) -> EngineCoreRequest:
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    return EngineCoreRequest(request_id, [10, 11, token_id, 12], params, 2, time.time())


@pytest.mark.parametrize("bad", [VOCAB, -1, 2**63 - 1])
def test_an_out_of_vocabulary_prompt_fails_alone(served, bad: int) -> None:
    servers, manager = served
    servers.add(0, make_request("running", max_tokens=30))
    servers.collect(0, {"running"}, first_only=True)  # in flight when the bad one comes
    servers.add(0, _prompt_with(bad, "oov"))
    servers.add(0, _prompt_with(VOCAB - 1, "after"))
    got = servers.collect(0, {"running", "oov", "after"})
    assert [(o.finish_reason, o.new_token_ids) for o in got["oov"]] == [(FinishReason.ERROR, [])]
    assert got["running"][-1].finish_reason == FinishReason.LENGTH
    assert len(tokens(got["running"])) == 29  # the first token came before
    assert got["after"][-1].finish_reason == FinishReason.LENGTH
    assert len(tokens(got["after"])) == 4
    assert manager.processes[0].is_alive()


def test_the_api_server_refuses_ids_past_the_models_vocabulary_with_400(
    serve, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The tokenizer (49152 ids) knows more tokens than this model has rows (1000): the API
    server learns the model's size from EngineReady and answers 400, for ids and for text
    that encodes past it, instead of a 500 from the engine's refusal."""
    import httpx

    model_dir = make_tiny_model_dir(str(tmp_path_factory.mktemp("vocab-1000")), vocab_size=1000)
    server = serve(model=model_dir)
    url = f"{server.url}/v1/completions"
    model = httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"][0]["id"]
    for prompt in ([5, 5000, 7], "The quick brown fox jumps over the lazy dog"):
        body = {"model": model, "prompt": prompt, "max_tokens": 2}
        r = httpx.post(url, json=body, timeout=30)
        assert r.status_code == 400, r.text
        assert "token id" in r.json()["error"]["message"], r.text
    r = httpx.post(url, json={"model": model, "prompt": [5, 999, 7], "max_tokens": 2}, timeout=30)
    assert r.status_code == 200, r.text
