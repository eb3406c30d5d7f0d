"""`tools` + `tool_choice` + `parallel_tool_calls` -> a checked `ToolPlan`: what the chat
template sees, which grammar (if any) forces the call, and how the output is read back."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import msgspec

from shoal.sampling_params import SamplingParams
from shoal.structured.params import StructuredOutputsParams
from shoal.structured.requests import canonical_json
from shoal.structured.schema_check import check_json_schema

# OpenAI's rule for function names.
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
TOOL_CHOICE_MODES = ("none", "auto", "required", "named")


@dataclass(frozen=True)
class ToolPlan:
    """`mode`: none (no calls), auto (the tool parser reads calls out of free text),
    required (the grammar forces a JSON array of calls), named (the grammar forces the
    arguments of `function_name`)."""

    mode: str
    tools: list[dict[str, Any]]
    parallel: bool
    function_name: str | None = None
    constraint: StructuredOutputsParams | None = None


def plan_tools(
    tools: Any, tool_choice: Any, parallel_tool_calls: bool | None, *, auto_enabled: bool
) -> ToolPlan | None:
    """None when the request has no tools. `ValueError` naming the field for a malformed
    tool, an unknown named function, or `auto` on a server started without
    `--enable-auto-tool-choice`."""
    if not tools:
        if tool_choice not in (None, "none"):
            raise ValueError("tool_choice: requires tools")
        return None
    if not isinstance(tools, list):
        raise ValueError("tools: must be an array of {'type': 'function', 'function': ...}")
    checked = [_check_tool(i, tool) for i, tool in enumerate(tools)]
    parallel = True if parallel_tool_calls is None else bool(parallel_tool_calls)
    choice = "auto" if tool_choice is None else tool_choice
    if choice == "none":
        return ToolPlan("none", checked, parallel)
    if choice == "auto":
        if not auto_enabled:
            raise ValueError(
                "tool_choice: 'auto' needs the server started with --enable-auto-tool-choice "
                "and --tool-call-parser; use 'required', a named function or 'none'"
            )
        return ToolPlan("auto", checked, parallel)
    if choice == "required":
        schema = _calls_schema(checked, parallel)
        return ToolPlan("required", checked, parallel, None, _json(schema))
    name = _named_function(choice)
    by_name = {t["function"]["name"]: t["function"] for t in checked}
    if name not in by_name:
        raise ValueError(f"tool_choice: function {name!r} is not among the tools")
    return ToolPlan("named", checked, parallel, name, _json(_parameters(by_name[name])))


def _named_function(choice: Any) -> str:
    if isinstance(choice, dict) and choice.get("type") == "function":
        function = choice.get("function")
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            return function["name"]
    raise ValueError(
        "tool_choice: must be 'none', 'auto', 'required' or "
        "{'type': 'function', 'function': {'name': ...}}"
    )


def _check_tool(index: int, tool: Any) -> dict[str, Any]:
    where = f"tools[{index}]"
    if not isinstance(tool, dict) or tool.get("type", "function") != "function":
        raise ValueError(f"{where}: must be {{'type': 'function', 'function': {{...}}}}")
    function = tool.get("function")
    if not isinstance(function, dict):
        raise ValueError(f"{where}.function: must be an object with a 'name'")
    name = function.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"{where}.function.name: must be 1-64 letters, digits, '_' or '-'")
    description = function.get("description")
    if description is not None and not isinstance(description, str):
        raise ValueError(f"{where}.function.description: must be a string")
    parameters = function.get("parameters")
    if parameters is not None:
        check_json_schema(parameters, f"{where}.function.parameters")
    return {"type": "function", "function": dict(function)}


def _parameters(function: dict[str, Any]) -> Any:
    # A function without parameters takes an empty object (strict: no properties).
    parameters = function.get("parameters")
    return {"type": "object", "properties": {}} if parameters is None else parameters


def _calls_schema(tools: list[dict[str, Any]], parallel: bool) -> dict[str, Any]:
    """A JSON array of `{"name": ..., "arguments": {...}}`, at least one, one if not parallel."""
    calls: list[dict[str, Any]] = [
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "const": t["function"]["name"]},
                "arguments": _parameters(t["function"]),
            },
            "required": ["name", "arguments"],
        }
        for t in tools
    ]
    item = calls[0] if len(calls) == 1 else {"anyOf": calls}
    schema: dict[str, Any] = {"type": "array", "items": item, "minItems": 1}
    if not parallel:
        schema["maxItems"] = 1
    # Local refs ("#/$defs/X") resolve against the document root: the definitions of each
    # function's parameters move there (the same name in two functions: the last one wins).
    for key in ("$defs", "definitions"):
        merged: dict[str, Any] = {}
        for call in calls:
            arguments = call["properties"]["arguments"]
            if isinstance(arguments, dict) and isinstance(arguments.get(key), dict):
                merged.update(arguments[key])
        if merged:
            schema[key] = merged
    return schema


def _json(schema: Any) -> StructuredOutputsParams:
    return StructuredOutputsParams(json=canonical_json(schema))


def with_tool_constraint(params: SamplingParams, plan: ToolPlan) -> SamplingParams:
    """`params` with the plan's grammar (required / named); `ValueError` naming
    `tool_choice` when the request already constrains its output another way."""
    if plan.constraint is None:
        return params
    if params.structured_outputs is not None:
        raise ValueError(
            "tool_choice: a required or named tool choice cannot be combined with "
            "response_format or guided_* (both constrain the output)"
        )
    return msgspec.structs.replace(params, structured_outputs=plan.constraint)
