"""A multi-byte character cut by max_tokens: the streamed text (DELTA) and the non-streamed
text (FINAL_ONLY, decoded once at the end) agree, with and without stop strings."""

from __future__ import annotations

import pytest

from shoal.processing.output_processor import OutputProcessor
from shoal.processing.outputs import RequestOutputKind
from shoal.processing.processor import InputProcessor
from shoal.processing.tokenizer import Tokenizer
from shoal.protocol import EngineCoreOutput, FinishReason
from shoal.sampling_params import SamplingParams


def _run(tok: Tokenizer, ids: list[int], kind: RequestOutputKind, stop: list[str]) -> str:
    proc = OutputProcessor(tok)
    params = SamplingParams(max_tokens=len(ids), stop=stop)
    proc.add_request(InputProcessor(tok, 4096).process("r", "Say:", params), kind)
    texts = []
    for i, token_id in enumerate(ids):
        finish = FinishReason.LENGTH if i == len(ids) - 1 else None
        outs, _ = proc.process_outputs([EngineCoreOutput("r", [token_id], finish_reason=finish)])
        texts += [o.text for r in outs for o in r.outputs]
    assert not proc.has_unfinished_requests()
    return "".join(texts)


@pytest.mark.parametrize("stop", [[], ["zzz"]])
@pytest.mark.parametrize("text", [" ok 🎉", " 你好", " héllo 👍🏽"])
def test_streamed_and_final_text_agree_when_max_tokens_cuts_a_character(
    default_tokenizer: Tokenizer, text: str, stop: list[str]
) -> None:
    tok = default_tokenizer
    ids = tok.encode(text, add_special_tokens=False)
    cut_any = False
    for n in range(1, len(ids) + 1):
        streamed = _run(tok, ids[:n], RequestOutputKind.DELTA, stop)
        final = _run(tok, ids[:n], RequestOutputKind.FINAL_ONLY, stop)
        assert streamed == final, (n, streamed, final)
        assert "\ufffd" not in final  # the cut character is left out, not shown broken
        assert text.startswith(final)
        cut_any |= final != tok.decode(ids[:n], skip_special_tokens=True)
    assert cut_any  # some prefix did end inside a character


def test_a_prompt_ending_inside_a_character_does_not_leak_into_the_output(
    default_tokenizer: Tokenizer,
) -> None:
    tok = default_tokenizer
    broken = tok.encode(" 你好", add_special_tokens=False)[:2]  # ' ' and half of 你
    prompt = tok.encode("Say", add_special_tokens=False) + broken
    assert tok.decode(prompt).endswith("\ufffd")
    out = tok.encode(" realm thickened", add_special_tokens=False)
    for kind in (RequestOutputKind.DELTA, RequestOutputKind.FINAL_ONLY):
        proc = OutputProcessor(tok)
        params = SamplingParams(max_tokens=len(out))
        proc.add_request(InputProcessor(tok, 4096).process("r", prompt, params), kind)
        texts = []
        for i, token_id in enumerate(out):
            finish = FinishReason.LENGTH if i == len(out) - 1 else None
            outs, _ = proc.process_outputs(
                [EngineCoreOutput("r", [token_id], finish_reason=finish)]
            )
            texts += [o.text for r in outs for o in r.outputs]
        assert "".join(texts) == " realm thickened", kind
