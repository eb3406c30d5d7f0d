"""The API server's side: OpenAI's `response_format`, vLLM's `guided_*` fields and its
`structured_outputs` object -> one checked `StructuredOutputsParams` (torch-free)."""

from __future__ import annotations

import json
import re
from typing import Any

from shoal.structured.params import StructuredOutputsParams
from shoal.structured.schema_check import check_json_schema

# vLLM's names for the grammar library; shoal has one.
_BACKENDS = (None, "auto", "xgrammar")
# Fields of vLLM's `structured_outputs` object that shoal takes as given (its grammars are
# already strict and whitespace-free) or ignores (there is no other backend to fall back to).
_ACCEPTED_FLAGS = ("disable_fallback", "disable_any_whitespace", "disable_additional_properties")


def canonical_json(value: Any) -> str:
    """Compact JSON, keys in the client's order (the grammar keeps the order of
    `properties`): the same schema sent twice gives the same text (the engine's cache key)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def structured_params(
    *,
    response_format: dict[str, Any] | None = None,
    guided_json: Any = None,
    guided_regex: str | None = None,
    guided_choice: list[str] | None = None,
    guided_grammar: str | None = None,
    guided_decoding_backend: str | None = None,
    guided_whitespace_pattern: str | None = None,
    structured_outputs: dict[str, Any] | None = None,
) -> StructuredOutputsParams | None:
    """The request's one output constraint, or None. `ValueError` naming the field for a
    malformed spec, an unsupported JSON Schema keyword, an invalid regex or grammar, or two
    constraints at once."""
    if guided_decoding_backend not in _BACKENDS:
        raise ValueError(
            f"guided_decoding_backend: only 'xgrammar' is available, got {guided_decoding_backend!r}"
        )
    if guided_whitespace_pattern is not None:
        raise ValueError("guided_whitespace_pattern: not supported (output JSON has no spare "
                         "whitespace)")  # fmt: skip
    found: list[tuple[str, StructuredOutputsParams]] = []
    if response_format is not None:
        params = _from_response_format(response_format)
        if params is not None:
            found.append(("response_format", params))
    guided = {
        "json": guided_json,
        "regex": guided_regex,
        "choice": guided_choice,
        "grammar": guided_grammar,
    }
    for kind, value in guided.items():
        if value is not None:
            found.append((f"guided_{kind}", _build(kind, value, f"guided_{kind}")))
    if structured_outputs is not None:
        found.append(("structured_outputs", _from_object(structured_outputs)))
    if len(found) > 1:
        names = ", ".join(name for name, _ in found)
        raise ValueError(f"{found[1][0]}: only one output constraint per request, got {names}")
    return found[0][1] if found else None


def _from_response_format(fmt: Any) -> StructuredOutputsParams | None:
    if not isinstance(fmt, dict):
        raise ValueError("response_format: must be an object with a 'type'")
    kind = fmt.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if kind != "json_schema":
        raise ValueError(
            f"response_format.type: must be 'text', 'json_object' or 'json_schema', got {kind!r}"
        )
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict):
        raise ValueError("response_format.json_schema: must be an object with 'name' and 'schema'")
    name = spec.get("name")
    if name is not None and not isinstance(name, str):
        raise ValueError("response_format.json_schema.name: must be a string")
    schema = spec.get("schema")
    if schema is None:
        return StructuredOutputsParams(json_object=True)
    return _build("json", schema, "response_format.json_schema.schema")


def _from_object(obj: Any) -> StructuredOutputsParams:
    if not isinstance(obj, dict):
        raise ValueError("structured_outputs: must be an object")
    found = []
    for key, value in obj.items():
        if value is None or key in _ACCEPTED_FLAGS:
            continue
        if key == "json_object":
            if value is not True and value is not False:
                raise ValueError("structured_outputs.json_object: must be a boolean")
            if value:
                found.append(StructuredOutputsParams(json_object=True))
        elif key in ("json", "regex", "choice", "grammar"):
            found.append(_build(key, value, f"structured_outputs.{key}"))
        else:
            raise ValueError(f"structured_outputs.{key}: not supported")
    if len(found) != 1:
        raise ValueError(
            "structured_outputs: set exactly one of 'json', 'regex', 'choice', 'grammar', "
            f"'json_object', got {len(found)}"
        )
    return found[0]


def _build(kind: str, value: Any, field: str) -> StructuredOutputsParams:
    if kind == "json":
        return StructuredOutputsParams(json=json_schema_text(value, field))
    if kind == "regex":
        return StructuredOutputsParams(regex=check_regex(value, field))
    if kind == "choice":
        return StructuredOutputsParams(choice=_check_choice(value, field))
    return StructuredOutputsParams(grammar=_check_grammar(value, field))


def json_schema_text(schema: Any, field: str) -> str:
    """A checked schema (an object, or JSON text of one) as canonical JSON text."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise ValueError(f"{field}: not valid JSON: {e}") from e
    check_json_schema(schema, field)
    return canonical_json(schema)


# ECMAScript's named group (xgrammar's regex syntax) in Python's spelling, for the check only.
_JS_NAMED_GROUP = re.compile(r"\(\?<(?=[A-Za-z_])")


def check_regex(pattern: Any, field: str) -> str:
    """`ValueError` naming `field` when `pattern` is not a string or does not compile."""
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"{field}: must be a non-empty string")
    try:
        re.compile(_JS_NAMED_GROUP.sub("(?P<", pattern))
    except re.error as e:
        raise ValueError(f"{field}: invalid regular expression: {e}") from e
    return pattern


def _check_choice(choices: Any, field: str) -> list[str]:
    if not isinstance(choices, list) or not choices:
        raise ValueError(f"{field}: must be a non-empty array of strings")
    if not all(isinstance(c, str) and c for c in choices):
        raise ValueError(f"{field}: every choice must be a non-empty string")
    return list(choices)


_ROOT_RULE = re.compile(r"^\s*root\s*::=", re.MULTILINE)


def _check_grammar(grammar: Any, field: str) -> str:
    if not isinstance(grammar, str) or not grammar.strip():
        raise ValueError(f"{field}: must be a non-empty EBNF grammar string")
    if not _ROOT_RULE.search(grammar):
        raise ValueError(f"{field}: the EBNF grammar must define a 'root ::= ...' rule")
    return grammar
