"""API-server pieces without a server: request schemas, error params, shared metrics, no torch."""

from __future__ import annotations

import subprocess
import sys

import msgspec
import pytest

from shoal.api.asgi import error_for
from shoal.api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    validation_param,
)


def _decode(type_: type, body: bytes) -> object:
    return msgspec.json.decode(body, type=type_)


def test_completion_request_maps_openai_and_vllm_fields() -> None:
    body = (
        b'{"model": "m", "prompt": "hi", "max_tokens": 7, "temperature": 0, "top_p": 0.5,'
        b' "top_k": 3, "min_p": 0.1, "seed": 4, "stop": "x", "n": 2, "logprobs": 1,'
        b' "ignore_eos": true, "min_tokens": 2, "skip_special_tokens": false, "user": "u",'
        b' "unknown_field": 1}'
    )
    request = _decode(CompletionRequest, body)
    assert isinstance(request, CompletionRequest)
    params = request.to_sampling_params()
    assert (params.max_tokens, params.temperature, params.top_p, params.top_k) == (7, 0, 0.5, 3)
    assert (params.min_p, params.seed, params.stop, params.n, params.logprobs) == (
        0.1,
        4,
        ["x"],
        2,
        1,
    )
    assert params.ignore_eos and params.min_tokens == 2 and not params.skip_special_tokens


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [("a", ["a"]), (["a", "b"], ["a", "b"]), ([1, 2], [[1, 2]]), ([[1], [2, 3]], [[1], [2, 3]])],
)
def test_completion_prompt_shapes(prompt: object, expected: list) -> None:
    assert CompletionRequest(prompt=prompt).prompts() == expected  # type: ignore[arg-type]


def test_completion_prompt_of_mixed_types_names_prompt() -> None:
    with pytest.raises(ValueError, match="^prompt:"):
        CompletionRequest(prompt=["a", 1]).prompts()


def test_chat_request_prefers_max_completion_tokens() -> None:
    request = ChatCompletionRequest(messages=[], max_tokens=5, max_completion_tokens=9)
    assert request.to_sampling_params().max_tokens == 9
    request = ChatCompletionRequest(messages=[], logprobs=True, top_logprobs=3)
    assert request.to_sampling_params().logprobs == 3


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"logit_bias": {"1": 200.0}}, "logit_bias"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"top_p": 0}, "top_p"),
        ({"n": 0}, "n"),
    ],
)
def test_unsupported_or_invalid_fields_are_rejected_by_name(fields: dict, param: str) -> None:
    request = CompletionRequest(prompt="x", **fields)
    with pytest.raises(ValueError) as info:
        request.to_sampling_params()
    status, body = error_for(info.value)
    assert status == 400
    assert msgspec.json.decode(body)["error"]["param"] == param


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b'{"prompt": "x", "max_tokens": "many"}', "max_tokens"),
        (b'{"prompt": 3}', "prompt"),
        (
            b'{"prompt": "x", "stream_options": {"include_usage": 3}}',
            "stream_options.include_usage",
        ),
    ],
)
def test_schema_errors_become_400_naming_the_field(body: bytes, param: str) -> None:
    with pytest.raises(msgspec.ValidationError) as info:
        _decode(CompletionRequest, body)
    status, error = error_for(info.value)
    assert status == 400
    payload = msgspec.json.decode(error)["error"]
    assert payload["param"] == param
    assert payload["type"] == "BadRequestError" and payload["code"] == 400


def test_a_completion_without_prompt_or_prompt_embeds_names_prompt() -> None:
    # `prompt` is optional in the schema (prompt_embeds may replace it): the check is prompts().
    request = _decode(CompletionRequest, b'{"max_tokens": 3}')
    assert isinstance(request, CompletionRequest)
    with pytest.raises(ValueError, match=r"^prompt: required \(or prompt_embeds\)"):
        request.prompts()


def test_malformed_json_is_400_and_unexpected_errors_are_500_without_details() -> None:
    with pytest.raises(msgspec.DecodeError) as info:
        _decode(CompletionRequest, b"{nope")
    assert error_for(info.value)[0] == 400
    status, body = error_for(KeyError("secret internal detail"))
    assert status == 500
    assert b"secret" not in body and b"Traceback" not in body


def test_validation_param_of_plain_messages() -> None:
    assert validation_param("top_p: must be in (0, 1]") == "top_p"
    assert validation_param("messages[0].role: must be one of") == "messages[0].role"
    assert validation_param("something went wrong") is None


def test_api_server_modules_do_not_import_torch() -> None:
    code = (
        "import sys\n"
        "import shoal.api.server, shoal.engine.client\n"
        "import shoal.api.routes, shoal.api.metrics\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
