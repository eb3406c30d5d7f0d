"""Structured outputs and tool calling over HTTP with the official `openai` client (and one
LangChain test): `shoal serve` on the tiny random-weight model, started with
`--enable-auto-tool-choice --tool-call-parser hermes`. Random weights ramble, so the schemas
bound every string and number, and assertions hold for outputs the grammar finished."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.serving.api_helpers import TIMEOUT_S, running_server
from tests.serving.conftest import ServeProcess

MESSAGES: list[Any] = [{"role": "user", "content": "Tell me about a person."}]

PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "unit": {"type": "string", "enum": ["C", "F"]},
            },
            "required": ["city", "unit"],
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "parameters": {
            "type": "object",
            "properties": {
                "a": {"type": "integer", "minimum": -99, "maximum": 99},
                "b": {"type": "integer", "minimum": -99, "maximum": 99},
            },
            "required": ["a", "b"],
        },
    },
}
TOOLS: list[Any] = [WEATHER, ADD]
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


class Person(BaseModel):
    name: str = Field(max_length=10)
    age: int = Field(ge=0, le=120)


@pytest.fixture(scope="module")
def server(tiny_model_dir: str) -> Iterator[ServeProcess]:
    with running_server(
        # The tools' system prompt takes ~300 tokens.
        tiny_model_dir,
        "--max-model-len",
        "1024",
        "--enable-auto-tool-choice",
        "--tool-call-parser",
        "hermes",
    ) as server:
        yield server


def _chat(client: openai.OpenAI, model: str, **kwargs: Any) -> Any:
    kwargs.setdefault("messages", MESSAGES)
    kwargs.setdefault("max_tokens", 120)
    return client.chat.completions.create(model=model, **kwargs)


# ------------------------------------------------------------------ structured outputs


def test_json_schema_output_validates(client: openai.OpenAI, model: str) -> None:
    finished = 0
    for seed in range(4):
        reply = _chat(
            client,
            model,
            seed=seed,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "person", "schema": PERSON_SCHEMA, "strict": True},
            },
        )
        choice = reply.choices[0]
        if choice.finish_reason == "stop":
            finished += 1
            jsonschema.validate(json.loads(choice.message.content), PERSON_SCHEMA)
    assert finished >= 2  # the bounded schema ends well within max_tokens


def test_json_object_is_an_object(client: openai.OpenAI, model: str) -> None:
    # Free keys and values: random weights may ramble inside a string until max_tokens, so
    # only the outputs the grammar finished must parse.
    for seed in range(3):
        reply = _chat(client, model, seed=seed, response_format={"type": "json_object"})
        choice = reply.choices[0]
        assert choice.message.content.startswith("{")
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.message.content), dict)


def test_parse_with_a_pydantic_model(client: openai.OpenAI, model: str) -> None:
    completion = client.beta.chat.completions.parse(
        model=model, messages=MESSAGES, response_format=Person, max_tokens=100, temperature=0
    )
    message = completion.choices[0].message
    assert completion.choices[0].finish_reason == "stop"
    assert isinstance(message.parsed, Person)
    assert 0 <= message.parsed.age <= 120 and len(message.parsed.name) <= 10


@pytest.mark.parametrize(
    ("extra", "check"),
    [
        ({"guided_regex": r"[a-c]{3}-\d{2}"}, lambda t: len(t) == 6 and t[3] == "-"),
        ({"guided_choice": ["yes", "no", "maybe"]}, lambda t: t in ("yes", "no", "maybe")),
        ({"guided_grammar": 'root ::= "x" [0-9] [0-9] "y"'}, lambda t: len(t) == 4),
        (
            {"guided_json": {"type": "integer", "minimum": 3, "maximum": 7}},
            lambda t: 3 <= json.loads(t) <= 7,
        ),
        ({"structured_outputs": {"choice": ["left", "right"]}}, lambda t: t in ("left", "right")),
        ({"structured_outputs": {"regex": "[01]{4}"}}, lambda t: set(t) <= {"0", "1"}),
    ],
)
def test_vllm_extra_body_fields(
    client: openai.OpenAI, model: str, extra: dict[str, Any], check: Any
) -> None:
    for seed in (0, 1):
        reply = _chat(client, model, seed=seed, extra_body=extra, max_tokens=30)
        choice = reply.choices[0]
        assert choice.finish_reason == "stop", choice
        assert check(choice.message.content), choice.message.content
    text = client.completions.create(
        model=model, prompt="Answer:", max_tokens=30, temperature=0, extra_body=extra
    )
    assert text.choices[0].finish_reason == "stop" and check(text.choices[0].text)


def test_streamed_json_schema_parses(client: openai.OpenAI, model: str) -> None:
    stream = _chat(
        client,
        model,
        temperature=0,
        stream=True,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": PERSON_SCHEMA},
        },
    )
    text, finish = "", None
    for chunk in stream:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    assert finish == "stop"
    jsonschema.validate(json.loads(text), PERSON_SCHEMA)


def test_rows_with_and_without_grammars_share_steps(client: openai.OpenAI, model: str) -> None:
    """Plain greedy requests give the same text alone and beside constrained ones."""
    prompts = [f"Item {i}:" for i in range(3)]

    def plain(prompt: str) -> str:
        out = client.completions.create(
            model=model,
            prompt=prompt,
            max_tokens=12,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        return out.choices[0].text

    alone = [plain(p) for p in prompts]

    def constrained(seed: int) -> Any:
        return _chat(client, model, seed=seed, extra_body={"guided_json": PERSON_SCHEMA})

    with ThreadPoolExecutor(8) as pool:
        grammar_futures = [pool.submit(constrained, s) for s in range(5)]
        plain_futures = [pool.submit(plain, p) for p in prompts]
        together = [f.result() for f in plain_futures]
        replies = [f.result() for f in grammar_futures]
    assert together == alone
    for reply in replies:
        if reply.choices[0].finish_reason == "stop":
            jsonschema.validate(json.loads(reply.choices[0].message.content), PERSON_SCHEMA)


# ------------------------------------------------------------------ tool calling


def _check_call(call: Any) -> None:
    assert call.type == "function" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])


@pytest.mark.parametrize("parallel", [True, False])
def test_required_tool_choice_always_gives_valid_arguments(
    client: openai.OpenAI, model: str, parallel: bool
) -> None:
    finished = 0
    for seed in range(4):
        reply = _chat(
            client,
            model,
            seed=seed,
            tools=TOOLS,
            tool_choice="required",
            parallel_tool_calls=parallel,
            max_tokens=150,
        )
        choice = reply.choices[0]
        if choice.finish_reason == "length":
            continue
        finished += 1
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content is None
        calls = choice.message.tool_calls
        assert calls and (parallel or len(calls) == 1)
        for call in calls:
            _check_call(call)
    assert finished >= 2


def test_named_tool_choice_gives_that_function(client: openai.OpenAI, model: str) -> None:
    for seed in range(3):
        reply = _chat(
            client,
            model,
            seed=seed,
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "add"}},
        )
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        (call,) = choice.message.tool_calls
        assert call.function.name == "add"
        _check_call(call)


def _collect_stream(stream: Any) -> tuple[str, dict[int, dict[str, Any]], str | None]:
    """(content, tool calls by index as OpenAI's accumulating clients build them, finish)."""
    content, calls, finish = "", {}, None
    for chunk in stream:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"id": None, "name": None, "arguments": ""})
                call["id"] = delta.id or call["id"]
                if delta.function is not None:
                    call["name"] = delta.function.name or call["name"]
                    call["arguments"] += delta.function.arguments or ""
            finish = choice.finish_reason or finish
    return content, calls, finish


@pytest.mark.parametrize(
    "tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}]
)
def test_streamed_tool_calls_in_openai_chunk_shape(
    client: openai.OpenAI, model: str, tool_choice: Any
) -> None:
    finished = 0
    for seed in range(3):
        stream = _chat(
            client,
            model,
            seed=seed,
            tools=TOOLS,
            tool_choice=tool_choice,
            parallel_tool_calls=False,
            stream=True,
        )
        content, calls, finish = _collect_stream(stream)
        if finish == "length":
            continue  # random weights: a string ran on (arguments cut short)
        finished += 1
        assert finish == "tool_calls" and content == ""
        assert len(calls) == 1
        for call in calls.values():
            assert call["id"].startswith("call_")
            jsonschema.validate(json.loads(call["arguments"]), PARAMETERS[call["name"]])
        if isinstance(tool_choice, dict):
            assert [c["name"] for c in calls.values()] == ["get_weather"]
    assert finished >= 1


def test_auto_tool_choice_answers_with_content(client: openai.OpenAI, model: str) -> None:
    # Random weights never write <tool_call>: the answer is content (the parser: unit tests).
    reply = _chat(client, model, temperature=0, tools=TOOLS, max_tokens=8)
    assert reply.choices[0].message.content
    assert not reply.choices[0].message.tool_calls
    stream = _chat(client, model, temperature=0, tools=TOOLS, max_tokens=8, stream=True)
    content, calls, finish = _collect_stream(stream)
    assert content == reply.choices[0].message.content and not calls and finish == "length"


# Random weights never write a call by themselves: a regex (allowed beside tool_choice auto,
# which adds no grammar) makes the model write one in Hermes' format, for the parser to read.
HERMES_REGEX = (
    r'Sure\. <tool_call>\{"name": "add", "arguments": \{"a": [0-9], "b": [0-9]\}\}</tool_call>'
)


def test_auto_tool_choice_reads_hermes_calls(client: openai.OpenAI, model: str) -> None:
    extra = {"guided_regex": HERMES_REGEX}
    reply = _chat(client, model, temperature=0, tools=TOOLS, extra_body=extra, max_tokens=60)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.content == "Sure."
    (call,) = choice.message.tool_calls
    assert call.function.name == "add"
    _check_call(call)
    stream = _chat(
        client, model, temperature=0, tools=TOOLS, extra_body=extra, max_tokens=60, stream=True
    )
    content, calls, finish = _collect_stream(stream)
    assert finish == "tool_calls" and content.strip() == "Sure."
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        ("add", call.function.arguments)
    ]


def test_a_tool_call_turn_renders_with_the_default_template(
    client: openai.OpenAI, model: str
) -> None:
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "21 C"},
    ]
    reply = _chat(client, model, messages=messages, tools=TOOLS, tool_choice="none", max_tokens=4)
    assert reply.choices[0].finish_reason == "length"


# ------------------------------------------------------------------ bad input: 400 naming it


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {
                "name": "x", "schema": {"type": "array", "uniqueItems": True}}}},
            "response_format.json_schema.schema",
            "uniqueItems",
        ),
        ({"response_format": {"type": "yaml"}}, "response_format.type", "yaml"),
        ({"guided_regex": "(ab"}, "guided_regex", "regular expression"),
        # Python's re takes it literally; xgrammar's compile (in the engine) refuses it.
        ({"guided_regex": "a{2,"}, "guided_regex", "repetition"),
        ({"guided_choice": []}, "guided_choice", "non-empty"),
        ({"guided_grammar": "root ::= foo"}, "guided_grammar", "foo"),
        ({"guided_grammar": "start ::= 'a'"}, "guided_grammar", "root"),
        ({"guided_json": {"type": "object", "not": {}}}, "guided_json", "not"),
        ({"guided_json": "{not json"}, "guided_json", "JSON"),
        ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs.structural_tag", ""),
        ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice", "one output constraint"),
        ({"guided_decoding_backend": "outlines", "guided_regex": "a"}, "guided_decoding_backend", ""),
        ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0].function.name", ""),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
         "tool_choice", "nope"),
        ({"tool_choice": "required"}, "tool_choice", "requires tools"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "if": {}}}}]}, "tools[0].function.parameters", "if"),
        ({"tools": TOOLS, "tool_choice": "required", "guided_regex": "a"}, "tool_choice", ""),
    ],
)  # fmt: skip
def test_bad_input_is_a_400_naming_the_field(
    url: str, model: str, body: dict[str, Any], param: str, words: str
) -> None:
    payload = {"model": model, "messages": MESSAGES, "max_tokens": 5, **body}
    response = httpx.post(f"{url}/v1/chat/completions", json=payload, timeout=TIMEOUT_S)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    assert words in error["message"], error


# ------------------------------------------------------------------ LangChain


class Add(BaseModel):
    """Add two integers."""

    a: int = Field(ge=-99, le=99)
    b: int = Field(ge=-99, le=99)


def test_langchain_structured_output_and_bind_tools(url: str, model: str) -> None:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        model=model, base_url=f"{url}/v1", api_key="unused", temperature=0, max_tokens=100
    )
    person = llm.with_structured_output(Person).invoke("Describe someone.")
    assert isinstance(person, Person) and 0 <= person.age <= 120

    tools = llm.bind_tools([Add], tool_choice="required", parallel_tool_calls=False)
    message = tools.invoke("What is 2 + 3?")
    assert message.tool_calls, message
    for call in message.tool_calls:
        assert call["name"] == "Add"
        Add(**call["args"])  # validates


def test_the_api_server_never_loads_xgrammar_or_torch(server: ServeProcess) -> None:
    # After every test above (file order): the checks ran in the API server, the grammars
    # in the engine.
    def mapped(role: str) -> str:
        with open(f"/proc/{server.child_named(role).pid}/maps", encoding="utf-8") as f:
            return f.read()

    assert "xgrammar" in mapped("EngineCore_0")
    api_server = mapped("ApiServer_0")
    assert "torch" not in api_server and "xgrammar" not in api_server
