"""API-server pieces without a server: request schemas, error params, shared metrics, no torch."""

from __future__ import annotations

import re
import subprocess
import sys

import msgspec
import pytest

from shoal.api.asgi import error_for
from shoal.api.metrics import HISTOGRAMS, MetricsStore
from shoal.api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    validation_param,
)
from shoal.protocol import SchedulerStats


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
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"logit_bias": {"1": 2.0}}, "logit_bias"),
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
        (b'{"max_tokens": 3}', "prompt"),
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


# ----------------------------------------------------------------------------- metrics


def _value(text: str, name: str, labels: str = "") -> float:
    pattern = rf"^shoal:{re.escape(name)}{{[^}}]*{re.escape(labels)}[^}}]*}} (\S+)$"
    match = re.search(pattern, text, re.M)
    assert match, f"{name} {labels} not in:\n{text}"
    return float(match.group(1))


def test_two_stores_in_one_directory_render_the_same_totals(tmp_path) -> None:
    a = MetricsStore(num_engines=2, directory=str(tmp_path), client_index=0)
    b = MetricsStore(num_engines=2, directory=str(tmp_path), client_index=1)
    try:
        a.inc("requests_received_total")
        b.inc("requests_received_total", 2)
        a.inc("generation_tokens_total", 10)
        ttft = HISTOGRAMS[0]
        a.observe(ttft, 0.003)
        b.observe(ttft, 30.0)
        # Engine 1's newest stats came through b, older ones through a: b's win everywhere.
        a.set_engine_stats(1, 100.0, SchedulerStats(num_running_reqs=5, kv_cache_usage=0.5))
        b.set_engine_stats(1, 200.0, SchedulerStats(num_running_reqs=0, num_blocks_free=7))
        text_a, text_b = a.render("m"), b.render("m")
        assert text_a == text_b
        assert _value(text_a, "requests_received_total") == 3
        assert _value(text_a, "generation_tokens_total") == 10
        assert _value(text_a, "num_requests_running", 'engine="1"') == 0
        assert _value(text_a, "kv_cache_blocks_free", 'engine="1"') == 7
        assert _value(text_a, "time_to_first_token_seconds_count") == 2
        assert _value(text_a, "time_to_first_token_seconds_bucket", 'le="0.005"') == 1
        assert _value(text_a, "time_to_first_token_seconds_bucket", 'le="+Inf"') == 2
        # Stale stats never overwrite newer ones.
        b.set_engine_stats(1, 150.0, SchedulerStats(num_running_reqs=9))
        assert _value(b.render("m"), "num_requests_running", 'engine="1"') == 0
    finally:
        a.close()
        b.close()
    assert list(tmp_path.iterdir()) == []


def test_store_without_directory_counts_this_process_only() -> None:
    store = MetricsStore(num_engines=1)
    store.inc("request_success_total:stop")
    text = store.render('quote"d')
    assert 'model_name="quote\\"d"' in text
    assert _value(text, "request_success_total", 'finished_reason="stop"') == 1
    store.close()


def test_api_server_modules_do_not_import_torch() -> None:
    code = (
        "import sys\n"
        "import shoal.api.server, shoal.engine.client\n"
        "import shoal.api.routes, shoal.api.metrics\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
