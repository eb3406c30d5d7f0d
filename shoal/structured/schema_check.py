"""Which JSON Schema keywords the grammar enforces; `check_json_schema` names the first one it
would not (the API server answers 400 rather than return output the schema does not hold)."""

from __future__ import annotations

from typing import Any

# Keywords whose value is one subschema, a map of subschemas, or a list of them.
_ONE_SCHEMA = ("additionalProperties", "items", "unevaluatedProperties", "unevaluatedItems")
_SCHEMA_MAPS = ("properties", "$defs", "definitions")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")

# Validation keywords the grammar would silently ignore: a 400 names them.
UNSUPPORTED_KEYWORDS = frozenset(
    {
        "not", "if", "then", "else", "uniqueItems", "contains", "minContains", "maxContains",
        "dependentRequired", "dependentSchemas", "dependencies", "patternProperties",
        "propertyNames", "multipleOf", "$dynamicRef", "$recursiveRef",
    }
)  # fmt: skip

_MAX_DEPTH = 64


def check_json_schema(schema: Any, field: str) -> None:
    """`ValueError` naming `field`, the keyword and where it sits (`$.properties.tags`) for a
    schema the grammar cannot enforce: not an object or boolean, an unsupported keyword
    (`UNSUPPORTED_KEYWORDS`), a `$ref` outside this document, or nesting deeper than 64.
    Annotations (title, description, default, examples, ...) and unknown keywords are
    ignored, as JSON Schema itself ignores them."""
    _walk(schema, field, "$", 0)


def _walk(schema: Any, field: str, path: str, depth: int) -> None:
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise ValueError(f"{field}: the schema at {path} must be an object or a boolean")
    if depth > _MAX_DEPTH:
        raise ValueError(f"{field}: the schema nests deeper than {_MAX_DEPTH} levels at {path}")
    for key, value in schema.items():
        where = f"{path}.{key}"
        if key in UNSUPPORTED_KEYWORDS:
            raise ValueError(
                f"{field}: JSON Schema keyword '{key}' (at {path}) is not supported by "
                "structured outputs"
            )
        if key == "$ref":
            if not isinstance(value, str) or not value.startswith("#"):
                raise ValueError(
                    f"{field}: only local '$ref's ('#/...') are supported, got {value!r} at {path}"
                )
        elif key == "type":
            _check_type(value, field, where)
        elif key in _ONE_SCHEMA:
            if key == "items" and isinstance(value, list):  # draft-04 tuple form
                for i, item in enumerate(value):
                    _walk(item, field, f"{where}[{i}]", depth + 1)
            else:
                _walk(value, field, where, depth + 1)
        elif key in _SCHEMA_MAPS:
            if not isinstance(value, dict):
                raise ValueError(f"{field}: '{key}' at {path} must be an object")
            for name, sub in value.items():
                _walk(sub, field, f"{where}.{name}", depth + 1)
        elif key in _SCHEMA_LISTS:
            if not isinstance(value, list) or not value:
                raise ValueError(f"{field}: '{key}' at {path} must be a non-empty array")
            for i, sub in enumerate(value):
                _walk(sub, field, f"{where}[{i}]", depth + 1)
        elif key == "required":
            if not isinstance(value, list) or not all(isinstance(n, str) for n in value):
                raise ValueError(f"{field}: 'required' at {path} must be an array of strings")
        elif key == "enum" and not isinstance(value, list):
            raise ValueError(f"{field}: 'enum' at {path} must be an array")


_TYPES = frozenset({"object", "array", "string", "number", "integer", "boolean", "null"})


def _check_type(value: Any, field: str, where: str) -> None:
    names = value if isinstance(value, list) else [value]
    for name in names:
        if not isinstance(name, str) or name not in _TYPES:
            raise ValueError(f"{field}: unknown type {name!r} at {where}")
