"""`--stream-interval`: one SSE chunk per N tokens, the same text and tokens as one per token.

One API server over the tiny model started with `--stream-interval 4`; the chunk sizes are
read from the completions stream's per-chunk logprobs (one entry per token)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.serving.api_helpers import TIMEOUT_S, running_server, sse_payloads
from tests.serving.conftest import ServeProcess

NO_EOS = {"ignore_eos": True}


@pytest.fixture(scope="module")
def server(tiny_model_dir: str, frontend: str) -> Iterator[ServeProcess]:
    with running_server(tiny_model_dir, "--stream-interval", "4", frontend=frontend) as server:
        yield server


def _stream(url: str, body: dict) -> list[dict]:
    with httpx.stream("POST", url, json={**body, "stream": True}, timeout=TIMEOUT_S) as r:
        assert r.status_code == 200
        payloads = list(sse_payloads(r))
    assert payloads[-1] == "[DONE]"
    return [json.loads(p) for p in payloads[:-1]]


def test_completion_chunks_carry_four_tokens_after_the_first(url: str) -> None:
    body = {"prompt": "The sky is", "max_tokens": 14, "temperature": 0, "logprobs": 0, **NO_EOS}
    chunks = _stream(f"{url}/v1/completions", body)
    sizes = [len(c["choices"][0]["logprobs"]["tokens"]) for c in chunks if c["choices"]]
    assert sizes == [1, 4, 4, 4, 1]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    full = httpx.post(
        f"{url}/v1/completions", json={**body, "stream": False}, timeout=TIMEOUT_S
    ).json()
    assert "".join(c["choices"][0]["text"] for c in chunks) == full["choices"][0]["text"]


def test_chat_stream_has_the_same_text_in_fewer_chunks(url: str) -> None:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=TIMEOUT_S)
    model = client.models.list().data[0].id
    kwargs = {
        "model": model,
        "messages": [{"role": "user", "content": "Say something."}],
        "max_completion_tokens": 13,
        "temperature": 0,
        "extra_body": NO_EOS,
    }
    full = client.chat.completions.create(**kwargs)
    chunks = list(
        client.chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    # The role chunk, then 1 + 4 + 4 + 4 tokens in 4 chunks (not 13), then usage.
    assert len([c for c in chunks if c.choices]) == 5
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 13
