"""Bad input over HTTP: OpenAI error bodies, status codes, the API key; no torch in the API server.

Runs against both frontends (`[python]`, `[rust]`); what is about the Python API-server
process itself is marked python_only."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.serving.api_helpers import TIMEOUT_S, running_server
from tests.serving.conftest import ServeProcess

API_KEY = "test-secret"
AUTH = {"authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def server(tiny_model_dir: str, frontend: str) -> Iterator[ServeProcess]:
    with running_server(tiny_model_dir, "--api-key", API_KEY, frontend=frontend) as server:
        yield server


@pytest.fixture(scope="module")
def model(url: str) -> str:
    return httpx.get(f"{url}/v1/models", headers=AUTH).json()["data"][0]["id"]


def _post(url: str, path: str, body: Any = None, content: bytes | None = None) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, content=content, headers=AUTH, timeout=TIMEOUT_S)


def _error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == status and "Traceback" not in error["message"]
    return error


@pytest.mark.parametrize(
    ("path", "fields", "param"),
    [
        ("/v1/completions", {"max_tokens": 0}, "max_tokens"),
        ("/v1/completions", {"max_tokens": "three"}, "max_tokens"),
        ("/v1/completions", {"temperature": -1}, "temperature"),
        ("/v1/completions", {"top_p": 1.5}, "top_p"),
        ("/v1/completions", {"n": 0}, "n"),
        ("/v1/completions", {"n": 10**9}, "n"),
        ("/v1/completions", {"prompt": ["a"] * 600, "n": 2}, "prompt"),
        ("/v1/chat/completions", {"n": 129}, "n"),
        ("/v1/completions", {"logprobs": 50}, "logprobs"),
        ("/v1/completions", {"prompt": ""}, "prompt"),
        ("/v1/completions", {"prompt": None}, "prompt"),
        ("/v1/completions", {"prompt": [10**9]}, "prompt_token_ids"),
        ("/v1/completions", {"stop": [""]}, "stop"),
        ("/v1/completions", {"min_tokens": 9, "max_tokens": 2}, "min_tokens"),
        ("/v1/completions", {"frequency_penalty": 3.0}, "frequency_penalty"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "wizard", "content": "x"}]},
            "messages[0].role",
        ),
        ("/v1/chat/completions", {"messages": []}, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "user"}]}, "messages[0].content"),
        ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    ],
)
def test_bad_fields_are_400_naming_the_param(
    url: str, model: str, path: str, fields: dict[str, Any], param: str
) -> None:
    body: dict[str, Any] = {"model": model}
    body.update(
        {"prompt": "Hi"}
        if path == "/v1/completions"
        else {"messages": [{"role": "user", "content": "Hi"}]}
    )
    body.update(fields)
    error = _error(_post(url, path, body), 400)
    assert error["param"] == param
    assert error["type"] == "BadRequestError"


def test_prompt_longer_than_max_model_len_is_400(url: str, model: str) -> None:
    error = _error(_post(url, "/v1/completions", {"model": model, "prompt": "word " * 400}), 400)
    assert error["param"] == "prompt" and "256" in error["message"]
    body = {"model": model, "prompt": "Hi", "max_tokens": 300}
    assert _error(_post(url, "/v1/completions", body), 400)["param"] == "max_tokens"


@pytest.mark.parametrize("content", [b"{not json", b"", b"[1, 2]", b'{"model": "m"'])
def test_malformed_json_is_400(url: str, content: bytes) -> None:
    _error(_post(url, "/v1/completions", content=content), 400)


def test_unknown_model_is_404(url: str) -> None:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, timeout=TIMEOUT_S)
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="no-such-model", prompt="Hi", max_tokens=2)
    assert info.value.body["type"] == "NotFoundError"  # type: ignore[index]
    assert info.value.body["param"] == "model"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "x"}]
        )


def test_unknown_route_404_and_wrong_method_405(url: str) -> None:
    _error(httpx.get(f"{url}/v1/nothing-here"), 404)
    _error(httpx.get(f"{url}/v1/completions", headers=AUTH), 405)


def test_api_key_guards_v1_only(url: str, model: str) -> None:
    body = {"model": model, "prompt": "Hi", "max_tokens": 1}
    _error(httpx.post(f"{url}/v1/completions", json=body), 401)
    wrong = {"authorization": "Bearer nope"}
    _error(httpx.post(f"{url}/v1/completions", json=body, headers=wrong), 401)
    assert httpx.get(f"{url}/health").status_code == 200
    assert httpx.get(f"{url}/metrics").status_code == 200
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, timeout=TIMEOUT_S)
    assert client.completions.create(model=model, prompt="Hi", max_tokens=1).choices


def test_bad_request_in_a_stream_fails_before_any_event(url: str, model: str) -> None:
    body = {"model": model, "prompt": "Hi", "max_tokens": 0, "stream": True}
    error = _error(_post(url, "/v1/completions", body), 400)
    assert error["param"] == "max_tokens"


def test_detokenize_rejects_ids_outside_the_vocabulary(url: str) -> None:
    error = _error(_post(url, "/detokenize", {"tokens": [1, -5]}), 400)
    assert error["param"] == "tokens"


@pytest.mark.python_only("about the ApiServer_i Python process; the native one has no Python")
def test_the_api_server_process_never_loads_torch(server: ServeProcess) -> None:
    engine = server.child_named("EngineCore_0")
    api_server = server.child_named("ApiServer_0")
    # The engine maps libtorch; an API server must not (a real import, not a name check).
    assert "torch" in _mapped_files(engine.pid)
    assert "torch" not in _mapped_files(api_server.pid)


def _mapped_files(pid: int) -> str:
    with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as f:
        return f.read()
