"""The API server's checks of structured-output fields and tools (torch-free): what becomes
which constraint, and a `ValueError` naming the field for everything else."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from shoal.processing.tool_parsers import HermesToolParser, parse_named, parse_required
from shoal.structured.params import StructuredOutputsParams
from shoal.structured.requests import structured_params
from shoal.structured.tool_choice import plan_tools

SCHEMA = {"type": "object", "properties": {"b": {"type": "string"}, "a": {"type": "integer"}}}
TOOL = {"type": "function", "function": {"name": "f", "parameters": SCHEMA}}


def test_each_field_becomes_one_constraint() -> None:
    rf = {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}}
    by_rf = structured_params(response_format=rf)
    assert by_rf == structured_params(guided_json=SCHEMA)
    assert by_rf == structured_params(structured_outputs={"json": json.dumps(SCHEMA)})
    assert by_rf is not None and by_rf.json is not None
    assert list(json.loads(by_rf.json)["properties"]) == ["b", "a"]  # the client's order
    assert structured_params(response_format={"type": "text"}) is None
    assert structured_params(response_format={"type": "json_object"}) == StructuredOutputsParams(
        json_object=True
    )
    assert structured_params(guided_choice=["a", "b"]) == StructuredOutputsParams(choice=["a", "b"])
    assert structured_params(structured_outputs={"regex": "x+", "disable_fallback": True}) == (
        StructuredOutputsParams(regex="x+")
    )
    assert structured_params(guided_regex="(?<year>\\d{4})") is not None  # JS named group
    key = structured_params(guided_grammar='root ::= "a"')
    assert key is not None and key.cache_key() == ("grammar", 'root ::= "a"')


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"guided_json": {"type": "array", "uniqueItems": True}}, r"^guided_json: .*'uniqueItems'"),
        ({"guided_json": {"properties": {"x": {"not": {}}}}}, r"^guided_json: .*'not' \(at \$\.properties\.x\)"),
        ({"guided_json": {"$ref": "http://example.com/s"}}, r"^guided_json: only local"),
        ({"guided_json": {"type": "text"}}, r"^guided_json: unknown type"),
        ({"guided_json": 3}, r"^guided_json: the schema at \$ must be"),
        ({"response_format": {"type": "json_schema"}}, r"^response_format\.json_schema:"),
        ({"response_format": {"type": "grammar"}}, r"^response_format\.type:"),
        ({"guided_regex": "(a"}, r"^guided_regex: invalid regular expression"),
        ({"guided_choice": ["a", ""]}, r"^guided_choice: every choice"),
        ({"guided_grammar": "x ::= 'a'"}, r"^guided_grammar: .*root"),
        ({"structured_outputs": {}}, r"^structured_outputs: set exactly one"),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, r"^structured_outputs: set"),
        ({"guided_regex": "a", "guided_json": {}}, r"^guided_regex: only one output constraint"),
        ({"guided_whitespace_pattern": " "}, r"^guided_whitespace_pattern:"),
    ],
)  # fmt: skip
def test_bad_specs_name_the_field(fields: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        structured_params(**fields)


def test_tool_plans() -> None:
    assert plan_tools(None, None, None, auto_enabled=False) is None
    none = plan_tools([TOOL], "none", None, auto_enabled=False)
    assert none is not None and none.mode == "none" and none.constraint is None
    auto = plan_tools([TOOL], None, None, auto_enabled=True)
    assert auto is not None and auto.mode == "auto" and auto.constraint is None
    required = plan_tools([TOOL], "required", False, auto_enabled=False)
    assert required is not None and required.constraint is not None
    schema = json.loads(required.constraint.json or "")
    assert schema["minItems"] == 1 and schema["maxItems"] == 1
    named = plan_tools(
        [TOOL], {"type": "function", "function": {"name": "f"}}, None, auto_enabled=False
    )
    assert named is not None and named.function_name == "f"
    assert json.loads(named.constraint.json or "") == SCHEMA  # type: ignore[union-attr]


def test_required_moves_parameter_definitions_to_the_root() -> None:
    params = {
        "type": "object",
        "properties": {"p": {"$ref": "#/$defs/P"}},
        "$defs": {"P": {"type": "integer"}},
    }
    plan = plan_tools(
        [{"type": "function", "function": {"name": "g", "parameters": params}}],
        "required",
        True,
        auto_enabled=False,
    )
    assert plan is not None and plan.constraint is not None
    assert json.loads(plan.constraint.json or "")["$defs"] == {"P": {"type": "integer"}}


@pytest.mark.parametrize(
    ("tools", "choice", "match"),
    [
        ([TOOL], None, r"^tool_choice: 'auto' needs the server started with --enable-auto"),
        ([TOOL], {"type": "function", "function": {"name": "g"}}, r"^tool_choice: function 'g'"),
        ([TOOL], "sometimes", r"^tool_choice: must be"),
        (None, "required", r"^tool_choice: requires tools"),
        ("f", "none", r"^tools: must be an array"),
        ([{"type": "retrieval"}], "none", r"^tools\[0\]: must be"),
        ([{"function": {"name": "x y"}}], "none", r"^tools\[0\]\.function\.name:"),
        ([{"function": {"name": "x", "parameters": {"if": {}}}}], "none", r"^tools\[0\]\.function\.parameters: .*'if'"),
    ],
)  # fmt: skip
def test_bad_tools_name_the_field(tools: Any, choice: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        plan_tools(tools, choice, None, auto_enabled=False)


def test_hermes_parser_reads_calls_and_keeps_the_rest() -> None:
    text = 'Sure.\n<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>\n<tool_call>{"name": "g", "arguments": "{}"}</tool_call>'
    content, calls = HermesToolParser().extract(text)
    assert content == "Sure."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("f", {"a": 1}), ("g", {})]
    assert len({c.id for c in calls}) == 2
    # Not a call: stays content; an unfinished block too.
    content, calls = HermesToolParser().extract("<tool_call>oops</tool_call> <tool_call>{")
    assert calls == [] and content == "<tool_call>oops</tool_call> <tool_call>{"


@pytest.mark.parametrize("step", [1, 2, 5, 11])
def test_hermes_stream_gives_the_same_as_whole_text(step: int) -> None:
    text = 'Hi <tool_ca <tool_call>{"name": "f", "arguments": {"x": "<"}}</tool_call> bye <tool'
    stream = HermesToolParser().stream()
    content, names = "", []
    for i in range(0, len(text), step):
        delta, calls = stream.feed(text[i : i + step])
        content += delta
        names += [c.name for c in calls]
    rest, more = stream.finish()
    assert content + rest == "Hi <tool_ca  bye <tool" and names == ["f"] and more == []


def test_forced_outputs_parse() -> None:
    calls = parse_required('[{"name": "f", "arguments": {"a": 1}}]')
    assert calls is not None and calls[0].name == "f" and json.loads(calls[0].arguments) == {"a": 1}
    assert parse_required('[{"name": "f", "arguments": {"a": ') is None
    call = parse_named("f", '{"a": 1}')
    assert call is not None and call.arguments == '{"a": 1}'
    assert parse_named("f", "[1]") is None


def test_odd_values_are_value_errors_not_crashes() -> None:
    for schema in ({"type": {"a": 1}}, {"type": [[]]}, {"properties": []}, {"anyOf": {}}):
        with pytest.raises(ValueError, match=r"^guided_json: "):
            structured_params(guided_json=schema)


def test_tool_flags_name_the_flag() -> None:
    from shoal.config import ServerConfig
    from shoal.entrypoints.serve_args import make_serve_parser, server_config_from_args

    with pytest.raises(ValueError, match=r"^--enable-auto-tool-choice: needs --tool-call-parser"):
        ServerConfig(enable_auto_tool_choice=True)
    with pytest.raises(ValueError, match=r"^--tool-call-parser: must be one of"):
        ServerConfig(tool_call_parser="mistral")
    args = make_serve_parser().parse_args(
        ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
    )
    config = server_config_from_args(args)
    assert config.enable_auto_tool_choice and config.tool_call_parser == "hermes"


def test_the_spec_round_trips_on_the_wire() -> None:
    from shoal.protocol import EngineCoreRequest, encode
    from shoal.sampling_params import SamplingParams

    for spec in (
        StructuredOutputsParams(json={"type": "object"}),  # type: ignore[arg-type]
        StructuredOutputsParams(choice=["a", "b"]),
        StructuredOutputsParams(json_object=True),
    ):
        request = EngineCoreRequest("r", [1, 2], SamplingParams(structured_outputs=spec), 2, 0.0)
        decoded = msgspec.msgpack.decode(encode(request), type=EngineCoreRequest)
        assert decoded.sampling_params.structured_outputs == spec
    assert StructuredOutputsParams(json={"a": 1}).json == '{"a":1}'  # type: ignore[arg-type]
