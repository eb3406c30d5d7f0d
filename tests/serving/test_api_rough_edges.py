"""Issue 21's rough edges, end to end on one `shoal serve` (tiny model) with the official openai
client: /v1/models/{id}, CORS, /health's body, n > 1 streamed one choice per chunk,
--chat-template, the access log, the periodic stats line and /v1/responses. On both
frontends (`[python]`, `[rust]`); /v1/responses and prompt_embeds are python_only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.serving.api_helpers import TIMEOUT_S, running_server, sse_payloads
from tests.serving.conftest import ServeProcess

ORIGIN = "http://app.example"
TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
GREEDY = {"ignore_eos": True}


@pytest.fixture(scope="module")
def server(
    tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory, frontend: str
) -> Iterator[ServeProcess]:
    template = tmp_path_factory.mktemp("template") / "chat.jinja"
    template.write_text(TEMPLATE)
    flags = ["--enable-access-log", "--chat-template", str(template)]
    flags += ["--allowed-origins", json.dumps([ORIGIN]), "--allow-credentials"]
    flags += ["--allowed-headers", json.dumps(["authorization", "content-type", "x-trace"])]
    saved = os.environ.get("SHOAL_LOG_STATS_INTERVAL_S")
    os.environ["SHOAL_LOG_STATS_INTERVAL_S"] = "0.5"
    try:
        with running_server(tiny_model_dir, *flags, frontend=frontend) as server:
            yield server
    finally:
        if saved is None:
            os.environ.pop("SHOAL_LOG_STATS_INTERVAL_S", None)
        else:
            os.environ["SHOAL_LOG_STATS_INTERVAL_S"] = saved


# -- /v1/models/{id}, /health ------------------------------------------------------------------


def test_retrieve_model_and_404_for_an_unknown_one(client: openai.OpenAI, model: str) -> None:
    card = client.models.retrieve(model)
    assert card.id == model and card.object == "model"
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("no-such/model")
    body = info.value.body
    assert isinstance(body, dict)
    assert body["param"] == "model" and "no-such/model" in body["message"]
    assert body["type"] and body["code"] == 404


def test_health_has_no_body_labelled_json(url: str) -> None:
    response = httpx.get(f"{url}/health", timeout=TIMEOUT_S)
    assert response.status_code == 200
    assert response.content == b""
    assert "content-type" not in response.headers


# -- CORS --------------------------------------------------------------------------------------


def test_preflight_is_answered_for_an_allowed_origin(url: str) -> None:
    response = httpx.options(
        f"{url}/v1/chat/completions",
        headers={
            "origin": ORIGIN,
            "access-control-request-method": "POST",
            "access-control-request-headers": "authorization, content-type",
        },
        timeout=TIMEOUT_S,
    )
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == ORIGIN
    assert response.headers["access-control-allow-credentials"] == "true"
    assert "POST" in response.headers["access-control-allow-methods"]
    allowed = response.headers["access-control-allow-headers"].lower()
    assert "authorization" in allowed and "content-type" in allowed


@pytest.mark.parametrize(
    ("origin", "headers"),
    [("http://evil.example", "content-type"), (ORIGIN, "x-not-allowed")],
)
def test_preflight_refuses_other_origins_and_headers(url: str, origin: str, headers: str) -> None:
    response = httpx.options(
        f"{url}/v1/completions",
        headers={
            "origin": origin,
            "access-control-request-method": "POST",
            "access-control-request-headers": headers,
        },
        timeout=TIMEOUT_S,
    )
    assert response.status_code == 400
    if origin != ORIGIN:
        assert "access-control-allow-origin" not in response.headers


def test_cross_origin_responses_carry_cors_headers(url: str, model: str) -> None:
    response = httpx.post(
        f"{url}/v1/completions",
        json={"model": model, "prompt": "Hi", "max_tokens": 2},
        headers={"origin": ORIGIN},
        timeout=TIMEOUT_S,
    )
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == ORIGIN
    assert response.headers["vary"] == "Origin"
    other = httpx.get(f"{url}/v1/models", headers={"origin": "http://evil.example"})
    assert other.status_code == 200 and "access-control-allow-origin" not in other.headers


# -- n > 1 streaming, --chat-template -----------------------------------------------------------


def test_streamed_chat_sends_one_choice_per_chunk(client: openai.OpenAI, model: str) -> None:
    messages = [{"role": "user", "content": "Count."}]
    kw = {"model": model, "messages": messages, "max_tokens": 6, "n": 3, "seed": 7}
    full = client.chat.completions.create(temperature=0.8, extra_body=GREEDY, **kw)  # type: ignore[call-overload]
    stream = client.chat.completions.create(stream=True, temperature=0.8, extra_body=GREEDY, **kw)  # type: ignore[call-overload]
    texts: dict[int, str] = {}
    roles: dict[int, str] = {}
    for chunk in stream:
        assert len(chunk.choices) == 1, chunk
        choice = chunk.choices[0]
        texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
        if choice.delta.role:
            roles[choice.index] = choice.delta.role
    assert roles == {0: "assistant", 1: "assistant", 2: "assistant"}
    assert texts == {c.index: c.message.content for c in full.choices}


def test_chat_template_flag_renders_the_messages(url: str, model: str) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    tokens = httpx.post(
        f"{url}/tokenize", json={"model": model, "messages": messages}, timeout=TIMEOUT_S
    ).json()["tokens"]
    text = httpx.post(f"{url}/detokenize", json={"tokens": tokens}, timeout=TIMEOUT_S).json()
    assert text["prompt"] == "<system>Be brief.\n<user>Hi\n<assistant>"


# -- logs ----------------------------------------------------------------------------------------


def test_access_log_and_stats_line(server: ServeProcess, client: openai.OpenAI, model: str) -> None:
    client.completions.create(model=model, prompt="Hello", max_tokens=4, extra_body=GREEDY)
    # The native frontend logs the same line from its own role.
    server.wait_for_log(
        r'\[(ApiServer_0|RustFrontend) [^\]]*\].*"POST /v1/completions HTTP/1.1" 200 ', TIMEOUT_S
    )
    server.wait_for_log(
        r"\[EngineCore_0 [^\]]*\].*Avg prompt throughput: [\d.]+ tokens/s, Avg generation "
        r"throughput: [\d.]+ tokens/s, Running: \d+ reqs, Waiting: \d+ reqs, KV cache usage: "
        r"[\d.]+%, Prefix cache hit rate: [\d.]+%",
        TIMEOUT_S,
    )


# -- /v1/responses -----------------------------------------------------------------------------


@pytest.mark.python_only("/v1/responses: the native frontend answers 400 naming it")
def test_responses_create_with_a_string_and_instructions(client: openai.OpenAI, model: str) -> None:
    response = client.responses.create(
        model=model, input="Say hi.", instructions="Be brief.", max_output_tokens=5, temperature=0
    )
    assert response.object == "response" and response.id.startswith("resp_")
    assert response.status in ("completed", "incomplete")
    assert response.output[0].type == "message"
    assert response.output_text == response.output[0].content[0].text  # type: ignore[union-attr]
    assert response.usage is not None
    assert 1 <= response.usage.output_tokens <= 5
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens
    # The same conversation through chat gives the same greedy text.
    chat = client.chat.completions.create(
        model=model,
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Say hi."},
        ],
        max_tokens=5,
        temperature=0,
    )
    assert response.output_text == chat.choices[0].message.content
    assert response.usage.input_tokens == chat.usage.prompt_tokens  # type: ignore[union-attr]


@pytest.mark.python_only("/v1/responses: the native frontend answers 400 naming it")
def test_responses_message_list_and_incomplete_status(client: openai.OpenAI, model: str) -> None:
    response = client.responses.create(
        model=model,
        input=[
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": [{"type": "output_text", "text": "Hello!"}]},
            {"role": "user", "content": [{"type": "input_text", "text": "Go on."}]},
        ],
        max_output_tokens=3,
        temperature=0,
        extra_body=GREEDY,
    )
    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.usage is not None and response.usage.output_tokens == 3


@pytest.mark.python_only("/v1/responses: the native frontend answers 400 naming it")
def test_responses_stream_sends_openais_events(client: openai.OpenAI, model: str) -> None:
    kw = {"model": model, "input": "Tell me more.", "max_output_tokens": 6, "temperature": 0}
    full = client.responses.create(**kw)  # type: ignore[call-overload]
    events = list(client.responses.create(stream=True, **kw))  # type: ignore[call-overload]
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:-1] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
    ]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")  # type: ignore[union-attr]
    assert deltas == full.output_text == events[-1].response.output_text  # type: ignore[union-attr]


@pytest.mark.python_only("/v1/responses: the native frontend answers 400 naming it")
def test_responses_stream_ends_without_done_marker(url: str, model: str) -> None:
    body = {"model": model, "input": "Hi", "max_output_tokens": 2, "stream": True}
    with httpx.stream("POST", f"{url}/v1/responses", json=body, timeout=TIMEOUT_S) as response:
        payloads = list(sse_payloads(response))
    assert "[DONE]" not in payloads
    assert json.loads(payloads[-1])["type"] in ("response.completed", "response.incomplete")


@pytest.mark.python_only("/v1/responses: the native frontend answers 400 naming it")
@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": ""}, "input"),
        ({"input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image"}]}]},
            "input[0].content[0]",
        ),
        ({"input": [{"type": "function_call_output"}]}, "input[0].type"),
        ({"input": "x", "tools": [{"type": "function", "name": "f"}]}, "tools"),
        ({"input": "x", "previous_response_id": "resp_1"}, "previous_response_id"),
        ({"input": "x", "text": {"format": {"type": "json_object"}}}, "text.format"),
        ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
        ({"input": 5}, "input"),
    ],
)
def test_responses_bad_input_gets_400_naming_the_field(
    client: openai.OpenAI, model: str, body: dict[str, object], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.post("/responses", body={"model": model, **body}, cast_to=object)
    error = info.value.body
    assert isinstance(error, dict)
    assert error["param"] == param, error


@pytest.mark.python_only("the native frontend answers 400 naming prompt_embeds, not the flag")
def test_prompt_embeds_without_the_flag_get_400(client: openai.OpenAI, model: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(
            model=model,
            prompt=None,  # type: ignore[arg-type]
            max_tokens=2,
            extra_body={"prompt_embeds": "AAAA"},
        )
    error = info.value.body
    assert isinstance(error, dict) and error["param"] == "prompt_embeds"
    assert "--enable-prompt-embeds" in error["message"]


# -- flags ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--chat-template", "no-such-file.jinja"], "--chat-template"),
        (["--chat-template", "{% for %}"], "--chat-template: not a valid Jinja template"),
        (["--allowed-origins", "http://a"], "--allowed-origins"),
    ],
)
def test_bad_front_end_flags_name_the_flag(flags: list[str], message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "shoal.entrypoints.cli", "serve", *flags],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_prefix_caching_flags_are_accepted(tmp_path: Path) -> None:
    from shoal.entrypoints.serve_args import config_from_args, make_serve_parser

    parser = make_serve_parser()
    assert config_from_args(
        parser.parse_args(["--enable-prefix-caching"])
    ).cache.enable_prefix_caching
    off = parser.parse_args(["--no-enable-prefix-caching"])
    assert not config_from_args(off).cache.enable_prefix_caching
    inline = parser.parse_args(["--chat-template", TEMPLATE, "--disable-log-stats"])
    from shoal.entrypoints.serve_args import server_config_from_args

    assert server_config_from_args(inline).chat_template == TEMPLATE
    assert config_from_args(inline).log_stats_interval_s == 0
