"""Structured outputs in the engine (offline `LLM`, tiny random-weight model): hypothesis
draws random JSON schemas, a batch of them runs in the same steps beside an unconstrained
request, and every output the grammar finished validates against its schema (`jsonschema`).

Random weights ramble: every string has a maxLength, every integer bounds, arrays maxItems,
so a grammar-led output ends well within max_tokens; an output cut by max_tokens is only
counted, and most must finish."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shoal import LLM, SamplingParams
from shoal.structured.requests import structured_params
from tests.helpers import make_tiny_model_dir

NAMES = st.text(alphabet="abcdefgh_", min_size=1, max_size=6)


def _string() -> st.SearchStrategy[dict[str, Any]]:
    bounded = st.integers(0, 6).map(lambda n: {"type": "string", "maxLength": n})
    enum = st.lists(st.text(alphabet="xyz ", max_size=4), min_size=1, max_size=3, unique=True)
    return st.one_of(
        bounded,
        st.builds(lambda lo, n: {"type": "string", "minLength": lo, "maxLength": lo + n},
                  st.integers(0, 3), st.integers(0, 3)),
        enum.map(lambda values: {"enum": values}),
        st.just({"type": "string", "pattern": "^[a-c]{1,3}$"}),
    )  # fmt: skip


def _leaf() -> st.SearchStrategy[dict[str, Any]]:
    integer = st.builds(
        lambda lo, n: {"type": "integer", "minimum": lo, "maximum": lo + n},
        st.integers(-50, 50),
        st.integers(0, 100),
    )
    return st.one_of(
        _string(),
        integer,
        st.just({"type": "boolean"}),
        st.just({"type": "null"}),
        st.sampled_from([1, "a", True, None]).map(lambda v: {"const": v}),
    )


def _object(children: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    def build(props: dict[str, Any], num_required: int) -> dict[str, Any]:
        return {
            "type": "object",
            "properties": props,
            "required": list(props)[:num_required],
            "additionalProperties": False,
        }

    props = st.dictionaries(NAMES, children, min_size=1, max_size=3)
    return st.builds(build, props, st.integers(0, 3))


def _composite(children: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    array = st.builds(
        lambda items, n: {"type": "array", "items": items, "maxItems": n},
        children,
        st.integers(0, 3),
    )
    any_of = st.lists(children, min_size=2, max_size=2).map(lambda s: {"anyOf": s})
    return st.one_of(_object(children), array, any_of)


SCHEMAS = st.recursive(_leaf(), _composite, max_leaves=6).map(
    lambda s: s if s.get("type") == "object" else {"type": "object", "properties": {"v": s}, "required": ["v"]}
)  # fmt: skip


@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory) -> LLM:
    path = make_tiny_model_dir(str(tmp_path_factory.mktemp("tiny-so")))
    return LLM(path, load_format="dummy", num_blocks=512, max_num_seqs=16, max_model_len=512)


FINISHED: list[bool] = []


@settings(
    max_examples=8,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(schemas=st.lists(SCHEMAS, min_size=6, max_size=6))
def test_random_schemas_validate_when_finished(llm: LLM, schemas: list[dict[str, Any]]) -> None:
    params = [
        SamplingParams(
            temperature=1.0, seed=i, max_tokens=160,
            structured_outputs=structured_params(guided_json=schema),
        )
        for i, schema in enumerate(schemas)
    ]  # fmt: skip
    plain = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    outputs = llm.generate(["Data:"] * len(schemas) + ["Plain:"], [*params, plain], use_tqdm=False)
    for schema, output in zip(schemas, outputs, strict=False):
        sequence = output.outputs[0]
        assert sequence.finish_reason in ("stop", "length"), sequence
        FINISHED.append(sequence.finish_reason == "stop")
        if sequence.finish_reason == "stop":
            try:
                value = json.loads(sequence.text)
            except ValueError as e:
                raise AssertionError(f"{sequence.text!r} {sequence.token_ids} {schema}") from e
            jsonschema.validate(value, schema)
    assert outputs[-1].outputs[0].text == _plain_alone(llm)


def _plain_alone(llm: LLM) -> str:
    plain = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    return llm.generate(["Plain:"], plain, use_tqdm=False)[0].outputs[0].text


def test_most_random_schemas_finish() -> None:
    # Runs after the property test (file order): the schemas are meaningful only if the
    # grammar usually ends the output.
    assert len(FINISHED) >= 24
    assert sum(FINISHED) >= 0.6 * len(FINISHED), FINISHED


def test_a_cached_grammar_and_a_bad_one(llm: LLM) -> None:
    spec = structured_params(guided_choice=["red", "green"])
    params = SamplingParams(temperature=0.0, max_tokens=5, structured_outputs=spec)
    first = llm.generate(["Color:"], params, use_tqdm=False)[0].outputs[0]
    again = llm.generate(["Color:"], params, use_tqdm=False)[0].outputs[0]
    assert first.text in ("red", "green") and again.text == first.text
    bad = SamplingParams(
        max_tokens=5, structured_outputs=structured_params(guided_grammar="root ::= x")
    )
    out = llm.generate(["Color:"], bad, use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "error" and "x" in str(out.stop_reason)
    # The engine goes on serving.
    assert llm.generate(["Color:"], params, use_tqdm=False)[0].outputs[0].text == first.text


@pytest.mark.slow
def test_the_default_model_answers_in_the_schema() -> None:
    """SmolLM2 (real weights) under a bounded schema: the grammar ends the answer, greedy."""
    # float32, pinned (the answer below was checked on it; no flags run gguf mode).
    llm = LLM(max_model_len=1024, num_blocks=128, max_num_seqs=8, quantization="none")
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 30},
            "population": {"type": "integer", "minimum": 0, "maximum": 10**8},
        },
        "required": ["name", "population"],
    }
    prompt = (
        "<|im_start|>user\nGive the capital of France and its population as JSON.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    spec = structured_params(guided_json=schema)
    params = SamplingParams(temperature=0, max_tokens=60, structured_outputs=spec)
    output = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    assert output.finish_reason == "stop", output
    jsonschema.validate(json.loads(output.text), schema)
