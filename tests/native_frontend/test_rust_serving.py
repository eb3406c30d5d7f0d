"""The OpenAI surface of `shoal serve --frontend rust` with the official `openai` client, and
greedy output identical to `--frontend python` on the same tiny random-weight model (both
servers up for the whole module, same flags, same seed: the same weights).

The tests skip, naming the build command, when the binary is not built
(tests/native_frontend/conftest.py::rust_binary; SHOAL_RUST_TARGET_DIR picks another build).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

import shoal
from tests.helpers import make_tiny_model_dir
from tests.serving.api_helpers import running_server
from tests.serving.conftest import CLIENT_TIMEOUT_S, ServeProcess

API_KEY = "rust-secret"
AUTH = {"authorization": f"Bearer {API_KEY}"}
BODY_LIMIT = 65536
FLAGS = ["--api-key", API_KEY, "--max-request-body-bytes", str(BODY_LIMIT)]
NO_EOS = {"ignore_eos": True}
MESSAGES = [{"role": "user", "content": "Say something."}]
# Mixed text for the tokenizer: ASCII, Unicode, code, whitespace runs, emoji.
MIXED_TEXT = "Hello, wörld! ünïcødé 日本語 def f(x):\n    return x  \t\n\n🙂👍🏽 ok"


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_tiny_model_dir(str(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="module")
def rust_server(tiny_model_dir: str) -> Iterator[ServeProcess]:
    with running_server(tiny_model_dir, *FLAGS, frontend="rust") as server:
        yield server


@pytest.fixture(scope="module")
def python_server(tiny_model_dir: str, rust_server: ServeProcess) -> Iterator[ServeProcess]:
    # After the rust one: a missing binary skips the module before this one starts.
    with running_server(tiny_model_dir, *FLAGS, frontend="python") as server:
        yield server


@pytest.fixture(scope="module")
def url(rust_server: ServeProcess) -> str:
    assert rust_server.url is not None
    return rust_server.url


@pytest.fixture(scope="module")
def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, timeout=CLIENT_TIMEOUT_S)


@pytest.fixture(scope="module")
def python_client(python_server: ServeProcess) -> openai.OpenAI:
    url = python_server.url
    return openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, timeout=CLIENT_TIMEOUT_S)


@pytest.fixture(scope="module")
def model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def _post(url: str, path: str, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, headers=headers or AUTH, timeout=CLIENT_TIMEOUT_S)


def _error(response: httpx.Response, status: int) -> dict[str, Any]:
    """The OpenAI error object of `response`, which must have `status`."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert {"message", "type", "param", "code"} <= set(error), error
    assert error["code"] == status and "Traceback" not in error["message"]
    return error


# ---------------------------------------------------------------- the small routes


def test_models_names_what_python_names(
    client: openai.OpenAI, python_client: openai.OpenAI, model: str
) -> None:
    cards = client.models.list().data
    assert [c.id for c in cards] == [c.id for c in python_client.models.list().data] == [model]
    assert cards[0].model_extra is not None and cards[0].model_extra["max_model_len"] == 256


def test_health_version_and_metrics(url: str) -> None:
    assert httpx.get(f"{url}/health", timeout=CLIENT_TIMEOUT_S).status_code == 200
    version = httpx.get(f"{url}/version", timeout=CLIENT_TIMEOUT_S).json()
    assert version == {"version": shoal.__version__}
    metrics = httpx.get(f"{url}/metrics", timeout=CLIENT_TIMEOUT_S)
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    # One view with the engines' stats.
    for name in ("num_requests_running", "num_requests_waiting", "api_requests_in_flight"):
        assert f"shoal:{name}{{" in metrics.text, metrics.text[:2000]


def test_tokenize_matches_python_and_detokenize_round_trips(
    url: str, python_server: ServeProcess, model: str
) -> None:
    body = {"model": model, "prompt": MIXED_TEXT}
    tokens = _post(url, "/tokenize", body).json()
    expected = _post(str(python_server.url), "/tokenize", body).json()
    assert tokens == expected
    assert tokens["count"] == len(tokens["tokens"]) > 0 and tokens["max_model_len"] == 256
    text = _post(url, "/detokenize", {"model": model, "tokens": tokens["tokens"]}).json()
    assert text == {"prompt": MIXED_TEXT}
    chat = {"model": model, "messages": MESSAGES}
    assert (
        _post(url, "/tokenize", chat).json()
        == _post(str(python_server.url), "/tokenize", chat).json()
    )


# ---------------------------------------------------------------- generation


def test_completion_stream_equals_non_streamed_with_usage(
    client: openai.OpenAI, model: str
) -> None:
    kwargs: dict[str, Any] = {"model": model, "prompt": "The sky is", "max_tokens": 12}
    full = client.completions.create(**kwargs, temperature=0, extra_body=NO_EOS)
    choice = full.choices[0]
    assert choice.finish_reason == "length"
    assert full.usage is not None and full.usage.completion_tokens == 12
    assert full.usage.total_tokens == full.usage.prompt_tokens + 12
    chunks = list(
        client.completions.create(
            **kwargs,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=NO_EOS,
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage


def test_chat_stream_equals_non_streamed_with_usage(client: openai.OpenAI, model: str) -> None:
    kwargs: dict[str, Any] = {"model": model, "messages": MESSAGES, "max_completion_tokens": 10}
    full = client.chat.completions.create(**kwargs, temperature=0, extra_body=NO_EOS)
    message = full.choices[0].message
    assert message.role == "assistant" and full.choices[0].finish_reason == "length"
    chunks = list(
        client.chat.completions.create(
            **kwargs,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=NO_EOS,
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == message.content
    assert chunks[-1].usage == full.usage


def test_stop_string_cuts_the_text(client: openai.OpenAI, model: str) -> None:
    kwargs: dict[str, Any] = {
        "model": model,
        "prompt": "Count:",
        "max_tokens": 16,
        "temperature": 0,
    }
    text = client.completions.create(**kwargs, extra_body=NO_EOS).choices[0].text
    stop = text[6:9]
    assert len(stop) == 3, text
    expected = text[: text.find(stop)]
    stopped = client.completions.create(**kwargs, stop=[stop], extra_body=NO_EOS).choices[0]
    assert (stopped.text, stopped.finish_reason) == (expected, "stop")
    stream = client.completions.create(**kwargs, stop=stop, stream=True, extra_body=NO_EOS)
    assert "".join(c.choices[0].text for c in stream if c.choices) == expected


# ---------------------------------------------------------------- the same as python


@pytest.mark.parametrize("prompt", ["The sky is", "def main():\n", "Ünïcode 🙂 text"])
def test_greedy_completion_is_identical_to_python(
    client: openai.OpenAI, python_client: openai.OpenAI, model: str, prompt: str
) -> None:
    kwargs: dict[str, Any] = {
        "model": model,
        "prompt": prompt,
        "max_tokens": 16,
        "temperature": 0,
        "logprobs": 1,
        "extra_body": NO_EOS,
    }
    rust = client.completions.create(**kwargs)
    python = python_client.completions.create(**kwargs)
    assert rust.choices[0].text == python.choices[0].text
    assert rust.choices[0].logprobs.tokens == python.choices[0].logprobs.tokens  # type: ignore[union-attr]
    assert rust.usage == python.usage


def test_greedy_chat_is_identical_to_python(
    client: openai.OpenAI, python_client: openai.OpenAI, model: str
) -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name three colours."},
        {"role": "assistant", "content": "Red, green, blue."},
        {"role": "user", "content": "And three more?"},
    ]
    kwargs: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "max_completion_tokens": 16,
        "temperature": 0,
        "extra_body": NO_EOS,
    }
    rust = client.chat.completions.create(**kwargs)
    python = python_client.chat.completions.create(**kwargs)
    assert rust.choices[0].message.content == python.choices[0].message.content
    assert rust.usage == python.usage  # the same prompt: the template rendered identically


# ---------------------------------------------------------------- guards and refusals


def test_api_key_guards_v1_only(url: str, model: str) -> None:
    body = {"model": model, "prompt": "Hi", "max_tokens": 1}
    _error(_post(url, "/v1/completions", body, headers={"x": "no auth"}), 401)
    _error(_post(url, "/v1/completions", body, headers={"authorization": "Bearer nope"}), 401)
    assert httpx.get(f"{url}/health", timeout=CLIENT_TIMEOUT_S).status_code == 200
    assert _post(url, "/v1/completions", body).status_code == 200


def test_body_over_the_limit_is_413_naming_the_flag(url: str, model: str) -> None:
    big = {"model": model, "prompt": "x" * (BODY_LIMIT + 1), "max_tokens": 1}
    error = _error(_post(url, "/v1/completions", big), 413)
    assert "--max-request-body-bytes" in error["message"]
    small = {"model": model, "prompt": "x " * 50, "max_tokens": 2}
    assert _post(url, "/v1/completions", small).status_code == 200


@pytest.mark.parametrize(
    ("path", "fields", "named"),
    [
        ("/v1/chat/completions", {"response_format": {"type": "json_object"}}, "response_format"),
        ("/v1/completions", {"guided_json": {"type": "object"}}, "guided_json"),
        ("/v1/completions", {"structured_outputs": {"regex": "a+"}}, "structured_outputs"),
        (
            "/v1/chat/completions",
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
            "tools",
        ),
        ("/v1/completions", {"prompt_embeds": "AAAA"}, "prompt_embeds"),
        ("/v1/completions", {"echo": True}, "echo"),
        ("/v1/completions", {"logit_bias": {"5": 1.0}}, "logit_bias"),
        ("/v1/chat/completions", {"prompt_logprobs": 1}, "prompt_logprobs"),
    ],
)
def test_unsupported_features_are_400_naming_them(
    url: str, model: str, path: str, fields: dict[str, Any], named: str
) -> None:
    body: dict[str, Any] = {"model": model, "max_tokens": 2}
    body.update({"prompt": "Hi"} if path == "/v1/completions" else {"messages": MESSAGES}, **fields)
    error = _error(_post(url, path, body), 400)
    assert named == error["param"] or named in error["message"], error


def test_unsupported_routes_are_400_naming_them(url: str, model: str) -> None:
    body = {"model": model, "input": "Hi"}
    for path in ("/v1/embeddings", "/v1/responses"):
        error = _error(_post(url, path, body), 400)
        assert path in error["message"], error


def test_the_official_client_sees_bad_requests_as_bad_requests(
    client: openai.OpenAI, model: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=model, prompt="Hi", max_tokens=0)
    assert info.value.body["param"] == "max_tokens"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="Hi", max_tokens=2)


# ---------------------------------------------------------------- the default model


@pytest.mark.slow
def test_the_default_model_serves_the_official_client_as_python_does() -> None:
    """The embedded SmolLM2-135M-Instruct GGUF (tokenizer and chat template from its
    metadata), one server per frontend in turn: the same greedy answers."""
    answers = []
    for frontend in ("rust", "python"):
        with running_server(None, tiny=False, frontend=frontend) as server:
            client = openai.OpenAI(
                base_url=f"{server.url}/v1", api_key="unused", timeout=CLIENT_TIMEOUT_S
            )
            model = client.models.list().data[0].id
            chat = client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": "Name three rivers."}],
                max_tokens=24,
                temperature=0,
            )
            completion = client.completions.create(
                model=model, prompt="The capital of France is", max_tokens=12, temperature=0
            )
            answers.append((model, chat.choices[0].message.content, chat.usage, completion))
    (rust_model, rust_chat, rust_usage, rust_completion) = answers[0]
    (python_model, python_chat, python_usage, python_completion) = answers[1]
    assert rust_model == python_model == "SmolLM2-135M-Instruct"
    assert rust_chat == python_chat and rust_chat
    assert rust_usage == python_usage
    assert rust_completion.choices[0].text == python_completion.choices[0].text
