"""OutputProcessor: incremental text, stop strings, logprobs, n > 1 fan-in, output kinds.

Engine outputs are built by hand here (the engine itself is tested in tests/core)."""

from __future__ import annotations

import pytest

from shoal.processing.output_processor import OutputProcessor
from shoal.processing.outputs import RequestOutput, RequestOutputKind
from shoal.processing.processor import InputProcessor
from shoal.processing.tokenizer import Tokenizer
from shoal.protocol import EngineCoreOutput, FinishReason, TokenLogprobs
from shoal.sampling_params import SamplingParams

DELTA, CUMULATIVE, FINAL = (
    RequestOutputKind.DELTA,
    RequestOutputKind.CUMULATIVE,
    RequestOutputKind.FINAL_ONLY,
)


@pytest.fixture
def tok(default_tokenizer: Tokenizer) -> Tokenizer:
    return default_tokenizer


def _start(
    tok: Tokenizer, params: SamplingParams, kind: RequestOutputKind, request_id: str = "r"
) -> OutputProcessor:
    proc = OutputProcessor(tok)
    proc.add_request(InputProcessor(tok, 4096).process(request_id, "Say:", params), kind)
    return proc


def _feed(
    proc: OutputProcessor,
    engine_id: str,
    token_ids: list[int],
    last: FinishReason | None = FinishReason.LENGTH,
) -> tuple[list[RequestOutput], list[str]]:
    """One engine output per token, the last one finished with `last`."""
    results, aborts = [], []
    for i, token_id in enumerate(token_ids):
        finish = last if i == len(token_ids) - 1 else None
        outs, ids = proc.process_outputs(
            [EngineCoreOutput(engine_id, [token_id], finish_reason=finish)]
        )
        results += outs
        aborts += ids
    return results, aborts


def _text(results: list[RequestOutput], index: int = 0) -> str:
    return "".join(o.text for r in results for o in r.outputs if o.index == index)


def test_delta_text_is_exact_across_multibyte_characters(tok: Tokenizer) -> None:
    text = " héllo 你好 🎉 👍🏽 done"
    ids = tok.encode(text)
    proc = _start(tok, SamplingParams(max_tokens=100), DELTA)
    results, aborts = _feed(proc, "r", ids)
    assert aborts == [] and _text(results) == text
    assert all("\ufffd" not in o.text for r in results for o in r.outputs)
    # A token that ends mid-character reports its id with no text yet.
    assert any(o.text == "" and o.token_ids for r in results for o in r.outputs)
    assert [t for r in results for o in r.outputs for t in o.token_ids] == ids
    final = results[-1]
    assert final.finished and final.outputs[0].finish_reason == "length"
    assert not proc.has_unfinished_requests()


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens_skipped_or_kept(tok: Tokenizer, skip: bool) -> None:
    ids = tok.encode("a<|im_end|>b<|im_start|>")
    for kind in (DELTA, FINAL):
        proc = _start(tok, SamplingParams(skip_special_tokens=skip), kind)
        results, _ = _feed(proc, "r", ids)
        text = _text(results) if kind == DELTA else results[-1].outputs[0].text
        assert text == ("ab" if skip else "a<|im_end|>b<|im_start|>")


def test_stop_string_ends_the_request_and_asks_for_abort(tok: Tokenizer) -> None:
    ids = tok.encode(" one two STOP three four")
    proc = _start(tok, SamplingParams(stop=["STOP"]), DELTA)
    results, aborts = _feed(proc, "r", ids, last=None)
    assert _text(results) == " one two "
    assert aborts == ["r"]
    last = results[-1]
    assert last.finished and last.outputs[0].finish_reason == "stop"
    assert last.outputs[0].stop_reason == "STOP"
    # Outputs still in flight for the stopped request are ignored.
    assert proc.process_outputs([EngineCoreOutput("r", [5])]) == ([], [])
    assert not proc.has_unfinished_requests()


def test_stop_string_included_on_request(tok: Tokenizer) -> None:
    ids = tok.encode("abc END xyz")
    proc = _start(tok, SamplingParams(stop=["END", "zz"], include_stop_str_in_output=True), FINAL)
    results, aborts = _feed(proc, "r", ids, last=None)
    assert aborts == ["r"] and len(results) == 1
    assert results[0].outputs[0].text == "abc END"
    assert results[0].outputs[0].token_ids == ids[: len(results[0].outputs[0].token_ids)]


def test_stop_string_spanning_tokens_and_earliest_match(tok: Tokenizer) -> None:
    ids = tok.encode("xx<<<stop>>>yy")
    proc = _start(tok, SamplingParams(stop=[">>>", "<<<stop"]), FINAL)
    results, _ = _feed(proc, "r", ids, last=None)
    assert results[0].outputs[0].text == "xx"
    assert results[0].outputs[0].stop_reason == "<<<stop"


def test_stream_holds_back_a_possible_stop_prefix(tok: Tokenizer) -> None:
    proc = _start(tok, SamplingParams(stop=["STOP"]), DELTA)
    seen = []
    for piece in ["Hi", " ST", "O", "W", " ok"]:
        (token_id,) = tok.encode(piece)
        outs, _ = proc.process_outputs([EngineCoreOutput("r", [token_id])])
        seen.append(outs[0].outputs[0].text)
    # " ST" and "O" could begin "STOP": held until "W" shows they do not.
    assert seen == ["Hi", " ", "", "STOW", " ok"]


def test_length_finish_flushes_held_back_text(tok: Tokenizer) -> None:
    proc = _start(tok, SamplingParams(stop=["STOP"]), CUMULATIVE)
    results, _ = _feed(proc, "r", tok.encode("Hi ST"), last=None)
    results += proc.process_outputs([EngineCoreOutput("r", [], finish_reason=FinishReason.LENGTH)])[
        0
    ]
    assert [r.outputs[0].text for r in results] == ["Hi", "Hi ", "Hi ST"]


def test_stop_in_the_engines_last_output_needs_no_abort(tok: Tokenizer) -> None:
    proc = _start(tok, SamplingParams(stop=["end"]), FINAL)
    results, aborts = _feed(proc, "r", tok.encode("the end"), last=FinishReason.LENGTH)
    assert aborts == [] and results[0].outputs[0].finish_reason == "stop"


def test_engine_finish_reasons(tok: Tokenizer) -> None:
    proc = _start(tok, SamplingParams(), FINAL)
    results, _ = _feed(proc, "r", [tok.encode("a")[0], 2], last=FinishReason.STOP)
    out = results[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason is None and out.text == "a"
    proc = _start(tok, SamplingParams(), FINAL)
    outs, _ = proc.process_outputs(
        [EngineCoreOutput("r", [], finish_reason=FinishReason.ABORT, num_cached_tokens=16)]
    )
    assert outs[0].outputs[0].finish_reason == "abort" and outs[0].num_cached_tokens == 16
    proc = _start(tok, SamplingParams(stop_token_ids=[7]), FINAL)
    outs, _ = proc.process_outputs(
        [EngineCoreOutput("r", [7], finish_reason=FinishReason.STOP, stop_reason=7)]
    )
    assert outs[0].outputs[0].stop_reason == 7


def test_logprobs_map_to_token_strings(tok: Tokenizer) -> None:
    a, b, c = tok.encode(" cat")[0], tok.encode(" dog")[0], tok.encode(" cow")[0]
    proc = _start(tok, SamplingParams(logprobs=2), DELTA)
    lp1 = TokenLogprobs(a, -0.5, 2, [b, a], [-0.25, -0.5])
    lp2 = TokenLogprobs(c, -2.0, 7, [a, b], [-0.1, -0.2])
    out1, _ = proc.process_outputs([EngineCoreOutput("r", [a], new_logprobs=[lp1])])
    out2, _ = proc.process_outputs(
        [EngineCoreOutput("r", [c], new_logprobs=[lp2], finish_reason=FinishReason.LENGTH)]
    )
    first, second = out1[0].outputs[0], out2[0].outputs[0]
    assert first.logprobs is not None and second.logprobs is not None
    (pos1,) = first.logprobs
    assert list(pos1) == [a, b]  # sampled first, then the top-k not already listed
    assert pos1[a].logprob == -0.5 and pos1[a].rank == 2 and pos1[a].decoded_token == " cat"
    assert pos1[b].rank == 1 and pos1[b].decoded_token == " dog"
    (pos2,) = second.logprobs
    assert list(pos2) == [c, a, b] and pos2[c].rank == 7
    assert second.cumulative_logprob == pytest.approx(-2.5)


def test_no_logprobs_unless_asked(tok: Tokenizer) -> None:
    proc = _start(tok, SamplingParams(), FINAL)
    results, _ = _feed(proc, "r", tok.encode("ab"))
    assert results[0].outputs[0].logprobs is None
    assert results[0].outputs[0].cumulative_logprob is None


def test_n_children_fan_in_final(tok: Tokenizer) -> None:
    proc = _start(tok, SamplingParams(n=2, seed=1), FINAL, request_id="p")
    r1, _ = _feed(proc, "p-1", tok.encode(" second"), last=FinishReason.STOP)
    assert r1 == [] and proc.has_unfinished_requests()
    r0, _ = _feed(proc, "p-0", tok.encode(" first"))
    (result,) = r0
    assert result.request_id == "p" and result.finished and result.prompt == "Say:"
    assert [(o.index, o.text, o.finish_reason) for o in result.outputs] == [
        (0, " first", "length"),
        (1, " second", "stop"),
    ]
    assert not proc.has_unfinished_requests()


def test_n_children_delta_reports_only_news(tok: Tokenizer) -> None:
    proc = _start(tok, SamplingParams(n=3), DELTA, request_id="p")
    x, y = tok.encode("x")[0], tok.encode("y")[0]
    outs, _ = proc.process_outputs([EngineCoreOutput("p-0", [x]), EngineCoreOutput("p-2", [y])])
    (result,) = outs
    assert [(o.index, o.text) for o in result.outputs] == [(0, "x"), (2, "y")]
    assert not result.finished
    outs, _ = proc.process_outputs(
        [EngineCoreOutput(f"p-{i}", [x], finish_reason=FinishReason.LENGTH) for i in range(3)]
    )
    assert outs[0].finished and [o.index for o in outs[0].outputs] == [0, 1, 2]
    assert [o.token_ids for o in outs[0].outputs] == [[x], [x], [x]]


def test_cumulative_outputs_grow(tok: Tokenizer) -> None:
    proc = _start(tok, SamplingParams(), CUMULATIVE)
    results, _ = _feed(proc, "r", tok.encode(" a b c"))
    assert [r.outputs[0].text for r in results] == [" a", " a b", " a b c"]
    assert [len(r.outputs[0].token_ids) for r in results] == [1, 2, 3]
    assert [r.finished for r in results] == [False, False, True]


def test_abort_requests_returns_unfinished_engine_ids(tok: Tokenizer) -> None:
    proc = _start(tok, SamplingParams(n=2), DELTA, request_id="p")
    proc.process_outputs([EngineCoreOutput("p-0", [5], finish_reason=FinishReason.LENGTH)])
    assert proc.get_num_unfinished_requests() == 1
    assert proc.abort_requests(["p", "unknown"]) == ["p-1"]
    assert not proc.has_unfinished_requests()
    assert proc.process_outputs([EngineCoreOutput("p-1", [5])]) == ([], [])


def test_duplicate_request_id_rejected(tok: Tokenizer) -> None:
    proc = _start(tok, SamplingParams(), DELTA)
    with pytest.raises(ValueError, match="^request_id: 'r' is already in flight"):
        proc.add_request(InputProcessor(tok, 100).process("r", "x"))


# ----------------------------------------------------------------------------- stream interval


def _start_interval(
    tok: Tokenizer, params: SamplingParams, interval: int, request_id: str = "r"
) -> OutputProcessor:
    proc = OutputProcessor(tok, stream_interval=interval)
    proc.add_request(InputProcessor(tok, 4096).process(request_id, "Say:", params), DELTA)
    return proc


def test_stream_interval_groups_tokens_after_the_first(tok: Tokenizer) -> None:
    ids = tok.encode(" one two three four five six seven eight nine ten")
    assert len(ids) == 10
    proc = _start_interval(tok, SamplingParams(max_tokens=100), 4)
    results, aborts = _feed(proc, "r", ids)
    # The first token at once, then a chunk per 4 tokens; the end flushes the remainder.
    assert [len(r.outputs[0].token_ids) for r in results] == [1, 4, 4, 1]
    assert [r.finished for r in results] == [False, False, False, True]
    assert aborts == [] and _text(results) == " one two three four five six seven eight nine ten"
    assert [t for r in results for o in r.outputs for t in o.token_ids] == ids


def test_stream_interval_one_reports_every_token(tok: Tokenizer) -> None:
    ids = tok.encode(" a b c d e")
    results, _ = _feed(_start_interval(tok, SamplingParams(), 1), "r", ids)
    assert [len(r.outputs[0].token_ids) for r in results] == [1] * len(ids)


def test_stream_interval_does_not_delay_a_stop_string(tok: Tokenizer) -> None:
    ids = tok.encode(" one two STOP three four")
    proc = _start_interval(tok, SamplingParams(stop=["STOP"]), 8)
    results, aborts = _feed(proc, "r", ids, last=None)
    # Fewer than 8 tokens after the first, but the stop string ends the sequence: flushed.
    assert len(results) == 2 and results[-1].finished
    assert _text(results) == " one two " and aborts == ["r"]
    assert results[-1].outputs[0].finish_reason == "stop"


def test_stream_interval_applies_per_sequence_with_n(tok: Tokenizer) -> None:
    params = SamplingParams(n=2, max_tokens=100)
    proc = OutputProcessor(tok, stream_interval=3)
    proc.add_request(InputProcessor(tok, 4096).process("r", "Say:", params), DELTA)
    seen: list[tuple[int, int]] = []  # (sequence index, tokens in its chunk)
    # Sequence 0 gets a token every step, sequence 1 only every other step.
    for step in range(7):
        outputs = [EngineCoreOutput("r-0", [100 + step])]
        if step % 2 == 0:
            outputs.append(EngineCoreOutput("r-1", [200 + step]))
        for r in proc.process_outputs(outputs)[0]:
            seen += [(o.index, len(o.token_ids)) for o in r.outputs]
    assert seen == [(0, 1), (1, 1), (0, 3), (0, 3), (1, 3)]


def test_stream_interval_must_be_positive(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match="stream_interval"):
        OutputProcessor(tok, stream_interval=0)
