"""`prompt_embeds` on /v1/completions end to end: `shoal serve --enable-prompt-embeds` with 2 API
servers over 2 engines (tiny model with real weights), the official openai client, and the
shared-memory tensor queue between them (nothing may stay in the shared-memory directory)."""

from __future__ import annotations

import base64
import glob
import io
import os
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
import torch
from safetensors.torch import load_file

from shoal.runtime.tensor_queue import SHM_DIR
from tests.helpers import make_tiny_hf_checkpoint
from tests.serving.api_helpers import TIMEOUT_S, running_server, sse_payloads
from tests.serving.conftest import ServeProcess

GREEDY = {"ignore_eos": True}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_tiny_hf_checkpoint(str(tmp_path_factory.mktemp("embeds-model")), seed=3)


@pytest.fixture(scope="module")
def embed_table(model_dir: str) -> torch.Tensor:
    return load_file(os.path.join(model_dir, "model.safetensors"))["model.embed_tokens.weight"]


@pytest.fixture(scope="module")
def server(model_dir: str) -> Iterator[ServeProcess]:
    flags = ["--load-format", "auto", "--enable-prompt-embeds"]
    flags += ["--api-server-count", "2", "--data-parallel-size", "2"]
    with running_server(model_dir, *flags) as server:
        yield server
    assert _segments() == []


@pytest.fixture(scope="module")
def client(server: ServeProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=TIMEOUT_S)


@pytest.fixture(autouse=True)
def _no_segment_left() -> Iterator[None]:
    yield
    deadline = time.monotonic() + 5
    while _segments() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _segments() == []


def _segments() -> list[str]:
    return glob.glob(os.path.join(SHM_DIR, "shoal-tq-*"))


def encode(tensor: torch.Tensor) -> str:
    buffer = io.BytesIO()
    torch.save(tensor, buffer)
    return base64.b64encode(buffer.getvalue()).decode()


def ids(seed: int, n: int = 40) -> list[int]:
    return [(37 * i + 11 * seed) % 900 + 20 for i in range(n)]


def complete(client: openai.OpenAI, model: str, **kw: object) -> openai.types.Completion:
    kw.setdefault("max_tokens", 8)
    return client.completions.create(model=model, temperature=0, extra_body=GREEDY, **kw)  # type: ignore[call-overload, no-any-return]


def by_embeds(client: openai.OpenAI, model: str, embeds: torch.Tensor, **kw: object) -> str:
    extra = {**GREEDY, "prompt_embeds": encode(embeds)}
    out = client.completions.create(
        model=model, prompt=None, max_tokens=8, temperature=0, extra_body=extra, **kw
    )  # type: ignore[call-overload]
    return str(out.choices[0].text)


def test_greedy_from_embeddings_equals_greedy_from_tokens(
    client: openai.OpenAI, model: str, embed_table: torch.Tensor
) -> None:
    for seed in range(4):  # several requests: both API servers and both engines serve some
        prompt = ids(seed, 5 + 9 * seed)
        expected = complete(client, model, prompt=prompt)
        got = client.completions.create(
            model=model,
            prompt=None,  # type: ignore[arg-type]
            max_tokens=8,
            temperature=0,
            extra_body={**GREEDY, "prompt_embeds": encode(embed_table[prompt])},
        )
        assert got.choices[0].text == expected.choices[0].text
        assert got.usage is not None and expected.usage is not None
        assert got.usage.prompt_tokens == len(prompt) == expected.usage.prompt_tokens


def test_prefix_cache_keeps_embedding_and_token_prompts_apart(
    client: openai.OpenAI, model: str, embed_table: torch.Tensor
) -> None:
    # Token prompts of the placeholder id (0) first: their blocks are cached by token hash.
    zeros = complete(client, model, prompt=[0] * 40).choices[0].text
    a, b = ids(7), ids(8)
    want_a = complete(client, model, prompt=a).choices[0].text
    want_b = complete(client, model, prompt=b).choices[0].text
    assert len({zeros, want_a, want_b}) == 3  # the test can tell them apart
    for _ in range(2):  # the second round hits the cache of the first
        assert by_embeds(client, model, embed_table[a]) == want_a
        assert by_embeds(client, model, embed_table[b]) == want_b
    assert complete(client, model, prompt=[0] * 40).choices[0].text == zeros


def test_a_list_of_embeddings_and_n_greater_than_one(
    client: openai.OpenAI, model: str, embed_table: torch.Tensor
) -> None:
    a, b = ids(1, 12), ids(2, 20)
    want = [complete(client, model, prompt=p).choices[0].text for p in (a, b)]
    out = client.completions.create(
        model=model,
        prompt=None,  # type: ignore[arg-type]
        max_tokens=8,
        temperature=0,
        n=2,
        extra_body={**GREEDY, "prompt_embeds": [encode(embed_table[a]), encode(embed_table[b])]},
    )
    texts = {c.index: c.text for c in out.choices}
    assert texts == {0: want[0], 1: want[0], 2: want[1], 3: want[1]}


def test_streamed_embeddings_equal_non_streamed(
    client: openai.OpenAI, model: str, embed_table: torch.Tensor
) -> None:
    prompt = ids(4, 30)
    want = complete(client, model, prompt=prompt).choices[0].text
    stream = client.completions.create(
        model=model,
        prompt=None,  # type: ignore[arg-type]
        max_tokens=8,
        temperature=0,
        stream=True,
        extra_body={**GREEDY, "prompt_embeds": encode(embed_table[prompt])},
    )
    assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == want


def test_bf16_and_batched_3d_tensors_are_accepted(
    client: openai.OpenAI, model: str, embed_table: torch.Tensor
) -> None:
    prompt = ids(5, 10)
    want = complete(client, model, prompt=prompt).choices[0].text
    assert by_embeds(client, model, embed_table[prompt][None]) == want
    assert by_embeds(client, model, embed_table[prompt].to(torch.bfloat16))  # runs


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ("not base64 at all!", "base64"),
        (base64.b64encode(b"garbage bytes").decode(), "torch.save"),
        (encode(torch.zeros(4, 7)), "hidden size"),
        (encode(torch.zeros(64)), "[tokens, hidden]"),
        (encode(torch.zeros(4, 64, dtype=torch.int64)), "floating-point"),
        (encode(torch.full((4, 64), float("nan"))), "NaN"),
        (encode(torch.zeros(0, 64)), "no rows"),
        (encode(torch.zeros(300, 64)), "maximum context length"),
        (encode({"not": "a tensor"}), "not a tensor"),
        ([], "must not be empty"),
    ],
)
def test_malformed_or_oversized_tensors_get_400_naming_the_field(
    client: openai.OpenAI, model: str, payload: object, message: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(
            model=model,
            prompt=None,  # type: ignore[arg-type]
            max_tokens=4,
            extra_body={"prompt_embeds": payload},
        )
    error = info.value.body
    assert isinstance(error, dict)
    assert message in error["message"]
    assert error["param"] == "prompt_embeds"


def test_embeddings_with_echo_get_400(client: openai.OpenAI, model: str) -> None:
    with pytest.raises(openai.BadRequestError, match="echo"):
        client.completions.create(
            model=model,
            prompt=None,  # type: ignore[arg-type]
            max_tokens=4,
            echo=True,
            extra_body={"prompt_embeds": encode(torch.zeros(3, 64))},
        )


def test_neither_prompt_nor_embeddings_gets_400(server: ServeProcess) -> None:
    response = httpx.post(f"{server.url}/v1/completions", json={"max_tokens": 2}, timeout=TIMEOUT_S)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "prompt"


def test_streamed_400_before_any_byte(server: ServeProcess) -> None:
    body = {"prompt_embeds": "@@", "max_tokens": 2, "stream": True}
    with httpx.stream(
        "POST", f"{server.url}/v1/completions", json=body, timeout=TIMEOUT_S
    ) as response:
        response.read()
        assert response.status_code == 400
        assert not list(sse_payloads(response))
