"""`StructuredOutputsParams`: the one grammar a request's output must match (wire type)."""

from __future__ import annotations

import json as _json

import msgspec

# Prefix of `stop_reason` on the engine's error output for a spec that did not compile (or an
# output that broke its grammar): the API server answers 400 with the text after it.
GRAMMAR_ERROR_PREFIX = "grammar: "


class StructuredOutputsParams(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Exactly one constraint is set (the API server's `structured_params` checks that).

    `json` is the JSON schema as compact JSON text, so the same schema sent twice makes the
    same cache key in the engine."""

    json: str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    # xgrammar's EBNF (GBNF-style: `root ::= ...`).
    grammar: str | None = None
    # Any JSON object (response_format json_object).
    json_object: bool = False

    def __post_init__(self) -> None:
        # Offline callers may pass the schema as a dict, as vLLM's `StructuredOutputsParams`
        # takes it: kept as compact JSON text.
        if self.json is not None and not isinstance(self.json, str):
            self.json = _json.dumps(self.json, separators=(",", ":"), ensure_ascii=False)

    @property
    def kind(self) -> str:
        """Which constraint is set: json, regex, choice, grammar or json_object."""
        for name in ("json", "regex", "choice", "grammar"):
            if getattr(self, name) is not None:
                return name
        return "json_object"

    def cache_key(self) -> tuple[str, str]:
        """(kind, spec text): equal keys compile to the same grammar."""
        kind = self.kind
        if kind == "choice":
            return kind, "\x00".join(self.choice or [])
        if kind == "json_object":
            return kind, ""
        value = getattr(self, kind)
        assert isinstance(value, str)
        return kind, value
