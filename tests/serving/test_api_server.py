"""The OpenAI API end to end: `shoal serve` (2 API servers, 1 engine, tiny model) + the openai client.

Every test runs against both frontends (`[python]`, `[rust]`: with --frontend rust the one
native process serves every connection and --api-server-count is ignored)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.serving.api_helpers import TIMEOUT_S, running_server, sse_payloads
from tests.serving.conftest import ServeProcess

NO_EOS = {"ignore_eos": True}
MESSAGES = [{"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def server(tiny_model_dir: str, frontend: str) -> Iterator[ServeProcess]:
    with running_server(tiny_model_dir, "--api-server-count", "2", frontend=frontend) as server:
        yield server


def test_models_version_and_health(url: str, client: openai.OpenAI, model: str) -> None:
    cards = client.models.list().data
    assert [c.id for c in cards] == [model]
    assert cards[0].model_extra is not None and cards[0].model_extra["max_model_len"] == 256
    assert httpx.get(f"{url}/version").json()["version"]
    assert httpx.get(f"{url}/health").status_code == 200


def test_streamed_completion_equals_non_streamed_under_greedy(
    client: openai.OpenAI, model: str
) -> None:
    full = client.completions.create(
        model=model, prompt="The sky is", max_tokens=12, temperature=0, extra_body=NO_EOS
    )
    choice = full.choices[0]
    assert choice.finish_reason == "length"
    assert full.usage is not None
    assert (full.usage.completion_tokens, full.usage.total_tokens) == (
        12,
        full.usage.prompt_tokens + 12,
    )
    chunks = list(
        client.completions.create(
            model=model,
            prompt="The sky is",
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=NO_EOS,
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage


def test_streamed_chat_equals_non_streamed_under_greedy(client: openai.OpenAI, model: str) -> None:
    full = client.chat.completions.create(
        model=model,
        messages=MESSAGES,
        max_completion_tokens=10,
        temperature=0,
        extra_body=NO_EOS,
    )
    message = full.choices[0].message
    assert message.role == "assistant" and full.choices[0].finish_reason == "length"
    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=MESSAGES,
            max_completion_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=NO_EOS,
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == message.content
    assert chunks[-1].usage == full.usage


def test_sse_stream_ends_with_done(url: str, model: str) -> None:
    body = {"model": model, "prompt": "Hi", "max_tokens": 3, "stream": True, **NO_EOS}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=TIMEOUT_S) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        payloads = list(sse_payloads(r))
    assert payloads[-1] == "[DONE]"
    assert all("choices" in json.loads(p) for p in payloads[:-1])


def test_n_with_seed_is_reproducible(client: openai.OpenAI, model: str) -> None:
    def sample() -> list[str]:
        r = client.completions.create(
            model=model,
            prompt="Once",
            max_tokens=8,
            n=3,
            temperature=1.0,
            seed=11,
            extra_body=NO_EOS,
        )
        assert sorted(c.index for c in r.choices) == [0, 1, 2]
        assert r.usage is not None and r.usage.completion_tokens == 24
        return [c.text for c in sorted(r.choices, key=lambda c: c.index)]

    assert sample() == sample()


def test_stop_string_cuts_the_text(client: openai.OpenAI, model: str) -> None:
    kwargs = {"model": model, "prompt": "Count:", "max_tokens": 16, "temperature": 0}
    text = client.completions.create(**kwargs, extra_body=NO_EOS).choices[0].text
    stop = text[6:9]
    assert len(stop) == 3, text
    expected = text[: text.find(stop)]
    stopped = client.completions.create(**kwargs, stop=[stop], extra_body=NO_EOS).choices[0]
    assert (stopped.text, stopped.finish_reason) == (expected, "stop")
    assert stopped.model_extra is not None and stopped.model_extra["stop_reason"] == stop
    stream = client.completions.create(**kwargs, stop=stop, stream=True, extra_body=NO_EOS)
    assert "".join(c.choices[0].text for c in stream if c.choices) == expected


@pytest.mark.python_only("echo: the native frontend answers 400 naming it")
def test_echo_returns_the_prompt_first(client: openai.OpenAI, model: str) -> None:
    kwargs = {"model": model, "prompt": "Echo me", "max_tokens": 4, "temperature": 0}
    plain = client.completions.create(**kwargs, extra_body=NO_EOS).choices[0].text
    echoed = client.completions.create(**kwargs, echo=True, extra_body=NO_EOS).choices[0].text
    assert echoed == "Echo me" + plain
    stream = client.completions.create(**kwargs, echo=True, stream=True, extra_body=NO_EOS)
    assert "".join(c.choices[0].text for c in stream if c.choices) == echoed


def test_completion_logprobs_in_openai_format(client: openai.OpenAI, model: str) -> None:
    r = client.completions.create(
        model=model, prompt="Log", max_tokens=5, temperature=0, logprobs=2, extra_body=NO_EOS
    )
    choice = r.choices[0]
    lp = choice.logprobs
    assert lp is not None and lp.tokens is not None and lp.text_offset is not None
    assert lp.token_logprobs is not None and lp.top_logprobs is not None
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert "".join(lp.tokens) == choice.text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert logprob <= 0 and len(top) == 2
        # Greedy: the sampled token is the most likely one.
        assert max(top.values()) == pytest.approx(logprob) and token in top


def test_chat_logprobs_in_openai_format(client: openai.OpenAI, model: str) -> None:
    r = client.chat.completions.create(
        model=model,
        messages=MESSAGES,
        max_completion_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        extra_body=NO_EOS,
    )
    content = r.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 4
    assert "".join(e.token for e in content) == r.choices[0].message.content
    for entry in content:
        assert entry.bytes is not None and bytes(entry.bytes).decode("utf-8", "replace")
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)


def test_tokenize_and_detokenize_round_trip(url: str, model: str) -> None:
    tokens = httpx.post(f"{url}/tokenize", json={"model": model, "prompt": "Hello world"}).json()
    assert tokens["count"] == len(tokens["tokens"]) > 0 and tokens["max_model_len"] == 256
    text = httpx.post(f"{url}/detokenize", json={"model": model, "tokens": tokens["tokens"]})
    assert text.json() == {"prompt": "Hello world"}
    chat = httpx.post(f"{url}/tokenize", json={"messages": MESSAGES}).json()
    assert chat["count"] > tokens["count"]


def test_x_request_id_is_echoed(url: str, model: str) -> None:
    headers = {"x-request-id": "my-request-42"}
    body = {"model": model, "prompt": "Hi", "max_tokens": 2}
    r = httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=TIMEOUT_S)
    assert r.headers["x-request-id"] == "my-request-42"
    assert r.json()["id"] == "cmpl-my-request-42"
    body["stream"] = True
    with httpx.stream(
        "POST", f"{url}/v1/completions", json=body, headers=headers, timeout=TIMEOUT_S
    ) as streamed:
        assert streamed.headers["x-request-id"] == "my-request-42"
        assert list(sse_payloads(streamed))[-1] == "[DONE]"


def test_batched_prompts_with_n_stream_like_non_streamed(client: openai.OpenAI, model: str) -> None:
    kwargs = {
        "model": model,
        "prompt": ["one", "two three"],
        "max_tokens": 4,
        "n": 2,
        "temperature": 0,
        "logprobs": 1,
        "extra_body": NO_EOS,
    }
    full = client.completions.create(**kwargs)  # type: ignore[call-overload]
    assert sorted(c.index for c in full.choices) == [0, 1, 2, 3]
    expected = {c.index: c.text for c in full.choices}
    texts: dict[int, str] = {}
    tokens: dict[int, list[str]] = {}
    offsets: dict[int, list[int]] = {}
    for chunk in client.completions.create(**kwargs, stream=True):  # type: ignore[call-overload]
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            tokens.setdefault(choice.index, []).extend(choice.logprobs.tokens)
            offsets.setdefault(choice.index, []).extend(choice.logprobs.text_offset)
    assert texts == expected
    for index, text in texts.items():
        assert "".join(tokens[index]) == text
        assert offsets[index] == [len("".join(tokens[index][:i])) for i in range(4)]
