"""Logits controls in the runner (penalties, logit bias, allowed token ids, bad words) on a
tiny transformers checkpoint: greedy tokens equal a reference computed here from
transformers' float32 logits with the control applied by hand (vLLM's semantics)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from shoal.sampling_params import SamplingParams
from shoal.worker.penalties import build_controls
from tests.model.tiny_hf import VOCAB, make_hf_model, save_hf_model
from tests.worker.runner_driver import RunnerDriver
from tests.worker.test_model_runner import make_runner

PROMPT = [5, 17, 301, 44, 9, 120, 77, 3, 250, 61, 18, 5, 17]
MAX_TOKENS = 12
Control = Callable[[torch.Tensor, list[int], list[int]], torch.Tensor]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory):
    hf = make_hf_model("llama", seed=11)
    return hf, save_hf_model(hf, str(tmp_path_factory.mktemp("tiny-llama")))


def reference_greedy(hf, prompt: list[int], control: Control, max_tokens: int) -> list[int]:
    """Greedy decoding over transformers' logits with `control(logits, prompt, outputs)`
    applied to each step's float32 logits row."""
    outputs: list[int] = []
    with torch.no_grad():
        for _ in range(max_tokens):
            logits = hf(torch.tensor([prompt + outputs])).logits[0, -1].float()
            outputs.append(int(control(logits.clone(), prompt, outputs).argmax()))
    return outputs


def _counts(tokens: list[int]) -> torch.Tensor:
    return torch.bincount(torch.tensor(tokens, dtype=torch.int64), minlength=VOCAB).float()


def repetition(r: float) -> Control:
    def apply(logits: torch.Tensor, prompt: list[int], outputs: list[int]) -> torch.Tensor:
        seen = _counts(prompt + outputs) > 0
        penalized = torch.where(logits > 0, logits / r, logits * r)
        return torch.where(seen, penalized, logits)

    return apply


def frequency_presence(f: float, p: float) -> Control:
    def apply(logits: torch.Tensor, prompt: list[int], outputs: list[int]) -> torch.Tensor:
        counts = _counts(outputs)
        return logits - f * counts - p * (counts > 0).float()

    return apply


def bias(table: dict[int, float]) -> Control:
    def apply(logits: torch.Tensor, prompt: list[int], outputs: list[int]) -> torch.Tensor:
        for token, value in table.items():
            logits[token] += value
        return logits

    return apply


def allowed(ids: list[int]) -> Control:
    def apply(logits: torch.Tensor, prompt: list[int], outputs: list[int]) -> torch.Tensor:
        masked = torch.full_like(logits, float("-inf"))
        masked[ids] = logits[ids]
        return masked

    return apply


def _shoal_greedy(path: str, chunk: int, **params) -> tuple[list[int], list[int]]:
    """The controlled request's tokens, run beside a plain greedy one (mixed batch)."""
    driver = RunnerDriver(make_runner(path), num_blocks=128, chunk=chunk)
    driver.add("plain", PROMPT[:5], temperature=0.0, max_tokens=MAX_TOKENS)
    driver.add("ctl", PROMPT, temperature=0.0, max_tokens=MAX_TOKENS, **params)
    done = driver.run()
    return done["ctl"].outputs, done["plain"].outputs


def _plain_reference(hf) -> list[int]:
    return reference_greedy(hf, PROMPT[:5], lambda logits, *_: logits, MAX_TOKENS)


@pytest.mark.parametrize(
    ("params", "control"),
    [
        ({"repetition_penalty": 1.8}, repetition(1.8)),
        ({"repetition_penalty": 0.5}, repetition(0.5)),
        ({"frequency_penalty": 1.5}, frequency_presence(1.5, 0.0)),
        ({"presence_penalty": 2.0}, frequency_presence(0.0, 2.0)),
        ({"frequency_penalty": -0.7, "presence_penalty": 0.9}, frequency_presence(-0.7, 0.9)),
    ],
)
def test_penalties_match_a_hand_applied_reference(checkpoint, params, control) -> None:
    hf, path = checkpoint
    expected = reference_greedy(hf, PROMPT, control, MAX_TOKENS)
    plain = reference_greedy(hf, PROMPT, lambda logits, *_: logits, MAX_TOKENS)
    assert expected != plain  # the penalty changes the greedy output here
    for chunk in (4, 64):
        got, other = _shoal_greedy(path, chunk, **params)
        assert got == expected, (params, chunk)
        assert other == _plain_reference(hf)  # the plain row in the same steps is untouched


def test_repetition_penalty_equals_transformers_generate(checkpoint) -> None:
    hf, path = checkpoint
    expected = hf.generate(
        torch.tensor([PROMPT]), max_new_tokens=MAX_TOKENS, do_sample=False, repetition_penalty=1.3
    )[0, len(PROMPT) :].tolist()
    assert _shoal_greedy(path, 5, repetition_penalty=1.3)[0] == expected


def test_logit_bias_and_allowed_token_ids(checkpoint) -> None:
    hf, path = checkpoint
    table = {7: 6.0, 300: 4.5, 11: -100.0}
    expected = reference_greedy(hf, PROMPT, bias(table), MAX_TOKENS)
    assert _shoal_greedy(path, 4, logit_bias=table)[0] == expected
    ids = [3, 40, 41, 250, 500]
    expected = reference_greedy(hf, PROMPT, allowed(ids), MAX_TOKENS)
    got = _shoal_greedy(path, 64, allowed_token_ids=ids)[0]
    assert got == expected and set(got) <= set(ids)


def test_bad_words_never_complete(checkpoint) -> None:
    hf, path = checkpoint
    plain = reference_greedy(hf, PROMPT, lambda logits, *_: logits, MAX_TOKENS)
    single, pair = plain[2], plain[3:5]
    got = _shoal_greedy(path, 8, bad_words_token_ids=[[single], pair])[0]
    assert single not in got
    assert all(got[i : i + 2] != pair for i in range(len(got) - 1))
    assert got[:2] == plain[:2]  # unchanged until a bad word could appear


def test_controls_cost_nothing_when_unused() -> None:
    """No row flagged: nothing is built (the per-step cost of the feature is one flag read)."""
    assert build_controls([], []) is None
    assert build_controls([object(), object()], [False, False]) is None  # type: ignore[list-item]
    assert SamplingParams().has_logits_controls is False
    assert SamplingParams(presence_penalty=0.1).has_logits_controls


@pytest.mark.parametrize(
    ("fields", "name"),
    [
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3.0}, "frequency_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"logit_bias": {5: 101.0}}, "logit_bias"),
        ({"logit_bias": {-1: 1.0}}, "logit_bias"),
        ({"allowed_token_ids": []}, "allowed_token_ids"),
        ({"bad_words": [""]}, "bad_words"),
        ({"prompt_logprobs": 21}, "prompt_logprobs"),
        ({"pooling": "max", "max_tokens": 0}, "pooling"),
        ({"pooling": "mean", "max_tokens": 3}, "max_tokens"),
    ],
)
def test_bad_values_name_the_field(fields, name) -> None:
    with pytest.raises(ValueError, match=f"^{name}:"):
        SamplingParams(**fields)


def test_plain_rows_keep_the_native_greedy_path(checkpoint, monkeypatch) -> None:
    """Steps of plain greedy rows never compute logits nor apply controls; one controlled
    row sends its steps through the logits, its controls applied to its row only."""
    from shoal.worker.penalties import LogitsControls

    _, path = checkpoint
    runner = make_runner(path)
    calls = {"logits": 0, "controls": 0}
    compute_logits, apply = runner.model.compute_logits, LogitsControls.apply

    def counted_logits(hidden):
        calls["logits"] += 1
        return compute_logits(hidden)

    def counted_apply(self, logits):
        calls["controls"] += 1
        assert len(self.rows) == 1  # only the controlled row
        return apply(self, logits)

    monkeypatch.setattr(runner.model, "compute_logits", counted_logits)
    monkeypatch.setattr(LogitsControls, "apply", counted_apply)
    driver = RunnerDriver(runner, num_blocks=128, chunk=8)
    driver.add("p", PROMPT, temperature=0.0, max_tokens=4)
    driver.run()
    assert calls == {"logits": 0, "controls": 0}
    driver = RunnerDriver(runner, num_blocks=128, chunk=8)
    driver.add("p", PROMPT, temperature=0.0, max_tokens=4)
    driver.add("c", PROMPT[:4], temperature=0.0, max_tokens=4, presence_penalty=0.5)
    driver.run()
    assert calls["logits"] >= 4 and calls["controls"] == calls["logits"]
