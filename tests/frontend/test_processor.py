"""InputProcessor: prompt forms, validation naming the field, max_tokens, n > 1 fan-out."""

from __future__ import annotations

import pytest

from shoal.processing.processor import InputProcessor
from shoal.processing.tokenizer import Tokenizer
from shoal.sampling_params import SamplingParams


@pytest.fixture
def processor(default_tokenizer: Tokenizer) -> InputProcessor:
    return InputProcessor(default_tokenizer, max_model_len=64)


def test_text_prompt(processor: InputProcessor, default_tokenizer: Tokenizer) -> None:
    req = processor.process(
        "r1", "Hello world", SamplingParams(max_tokens=5), arrival_time=1.0, client_index=3
    )
    ids = default_tokenizer.encode("Hello world")
    assert req.prompt == "Hello world" and req.prompt_token_ids == ids
    (engine_req,) = req.engine_requests
    assert engine_req.request_id == "r1" and engine_req.prompt_token_ids == ids
    assert engine_req.eos_token_id == 2 and engine_req.arrival_time == 1.0
    assert engine_req.client_index == 3 and engine_req.sampling_params.max_tokens == 5


@pytest.mark.parametrize("prompt", [[5, 6, 7], {"prompt_token_ids": [5, 6, 7]}])
def test_token_id_prompts(processor: InputProcessor, prompt: object) -> None:
    req = processor.process("r", prompt)  # type: ignore[arg-type]
    assert req.prompt is None and req.prompt_token_ids == [5, 6, 7]


def test_mapping_with_text(processor: InputProcessor) -> None:
    assert processor.process("r", {"prompt": "hi"}).prompt == "hi"


def test_max_tokens_none_fills_the_context(processor: InputProcessor) -> None:
    req = processor.process("r", [1, 2, 3, 4], SamplingParams(max_tokens=None))
    assert req.sampling_params.max_tokens == 60
    assert req.engine_requests[0].sampling_params.max_tokens == 60


def test_n_fans_out_into_children(processor: InputProcessor) -> None:
    req = processor.process("p", "abc", SamplingParams(n=3, seed=10, temperature=0.8))
    ids = [r.request_id for r in req.engine_requests]
    assert ids == ["p-0", "p-1", "p-2"]
    assert [r.sampling_params.seed for r in req.engine_requests] == [10, 11, 12]
    assert all(r.sampling_params.n == 1 for r in req.engine_requests)
    assert all(r.prompt_token_ids == req.prompt_token_ids for r in req.engine_requests)
    unseeded = processor.process("q", "abc", SamplingParams(n=2))
    assert [r.sampling_params.seed for r in unseeded.engine_requests] == [None, None]


@pytest.mark.parametrize(
    ("prompt", "params", "match"),
    [
        ("", None, r"^prompt: must not be empty"),
        ([], None, r"^prompt_token_ids: must not be empty"),
        ({"prompt_token_ids": []}, None, r"^prompt_token_ids: must not be empty"),
        ([1, 49152], None, r"^prompt_token_ids: token id 49152 at position 1 is not in"),
        ([1, -1], None, r"^prompt_token_ids: token id -1"),
        ([1, "a"], None, r"^prompt_token_ids: token id 'a'"),
        (b"bytes", None, r"^prompt: must be a string or a list"),
        (3, None, r"^prompt: must be a string or a list"),
        ({"text": "x"}, None, r"^prompt: a mapping needs"),
        ({"prompt": 5}, None, r"^prompt: must be a string"),
        (
            [1] * 64,
            None,
            r"^prompt_token_ids: the prompt has 64 tokens; .* maximum context "
            r"length is 64",
        ),
        ("word " * 80, None, r"^prompt: the prompt has \d+ tokens"),
        (
            [1] * 60,
            SamplingParams(max_tokens=5),
            r"^max_tokens: this model's maximum context "
            r"length is 64 tokens; you requested 65 tokens "
            r"\(60 in the prompt, 5 for max_tokens\)",
        ),
    ],
)
def test_invalid_inputs_name_the_field(
    processor: InputProcessor, prompt: object, params: SamplingParams | None, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        processor.process("r", prompt, params)  # type: ignore[arg-type]


def test_prompt_exactly_filling_the_room(processor: InputProcessor) -> None:
    req = processor.process("r", [1] * 60, SamplingParams(max_tokens=4))
    assert req.sampling_params.max_tokens == 4


def test_bad_max_model_len(default_tokenizer: Tokenizer) -> None:
    with pytest.raises(ValueError, match="^max_model_len"):
        InputProcessor(default_tokenizer, 0)
