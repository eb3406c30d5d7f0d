"""Sampling controls, prompt scoring, best_of and /v1/embeddings over HTTP with the official
openai client: `shoal serve` on a tiny random checkpoint, against references computed here
with transformers on the same weights. On both frontends (`[python]`, `[rust]`); what the
native frontend answers 400 to (logit_bias, allowed_token_ids, bad_words, echo,
prompt_logprobs, best_of, /v1/embeddings) is python_only."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import torch

from shoal.processing.tokenizer import Tokenizer
from tests.helpers import make_tiny_hf_checkpoint
from tests.serving.api_helpers import TIMEOUT_S, running_server
from tests.serving.conftest import ServeProcess

PROMPT = [504, 3458, 314, 253, 1345, 28, 357, 2104, 253, 504, 3458, 30]
MAX_TOKENS = 10
NO_EOS = {"ignore_eos": True}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_tiny_hf_checkpoint(str(tmp_path_factory.mktemp("tiny-hf")), seed=4)


@pytest.fixture(scope="module")
def hf(checkpoint: str):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(checkpoint, torch_dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer(checkpoint: str) -> Tokenizer:
    return Tokenizer.from_model(checkpoint)


@pytest.fixture(scope="module")
def server(checkpoint: str, frontend: str) -> Iterator[ServeProcess]:
    """The server runs the checkpoint's weights (no dummy load), on either frontend."""
    flags = ["--num-blocks", "256", "--max-model-len", "256"]
    with running_server(checkpoint, *flags, tiny=False, frontend=frontend) as server:
        yield server


def reference(hf, prompt: list[int], control=None, max_tokens: int = MAX_TOKENS) -> list[int]:
    """Greedy tokens over transformers' float32 logits, `control(logits, prompt, outputs)`
    applied by hand at each step."""
    outputs: list[int] = []
    with torch.no_grad():
        for _ in range(max_tokens):
            logits = hf(torch.tensor([prompt + outputs])).logits[0, -1].float()
            if control is not None:
                logits = control(logits, prompt, outputs)
            outputs.append(int(logits.argmax()))
    return outputs


def _counts(tokens: list[int], vocab: int) -> torch.Tensor:
    return torch.bincount(torch.tensor(tokens, dtype=torch.int64), minlength=vocab).float()


def _complete(client: openai.OpenAI, model: str, **kwargs: Any):
    extra = {**NO_EOS, **kwargs.pop("extra_body", {})}
    fields = {"max_tokens": MAX_TOKENS, "temperature": 0, **kwargs}
    return client.completions.create(model=model, prompt=PROMPT, extra_body=extra, **fields)


@pytest.mark.python_only("reads the penalties through logit_bias: 400 on the native frontend")
def test_penalties_equal_the_hand_applied_reference(client, model, hf, tokenizer) -> None:
    """A random model rarely repeats itself: a logit bias makes one token win every step
    (a prompt token for the repetition penalty), and the penalties must break that."""
    vocab = hf.config.vocab_size

    def bias(table: dict[int, float]):
        def apply(logits, prompt, outputs):
            for token, value in table.items():
                logits[token] += value
            return logits

        return apply

    def freq_presence(logits, prompt, outputs):
        counts = _counts(outputs, vocab)
        logits = bias({1781: 1.5})(logits, prompt, outputs)
        return logits - 0.4 * counts - 0.3 * (counts > 0).float()

    def repetition(logits, prompt, outputs):
        logits = bias({504: 1.0})(logits, prompt, outputs)
        seen = _counts(prompt + outputs, vocab) > 0
        return torch.where(seen, torch.where(logits > 0, logits / 3.0, logits * 3.0), logits)

    assert _complete(client, model).choices[0].text == tokenizer.decode(reference(hf, PROMPT))
    repeated = tokenizer.decode(reference(hf, PROMPT, bias({1781: 1.5})))
    assert _complete(client, model, logit_bias={"1781": 1.5}).choices[0].text == repeated
    expected = tokenizer.decode(reference(hf, PROMPT, freq_presence))
    got = _complete(
        client, model, logit_bias={"1781": 1.5}, frequency_penalty=0.4, presence_penalty=0.3
    )
    assert got.choices[0].text == expected != repeated
    repeated = tokenizer.decode(reference(hf, PROMPT, bias({504: 1.0})))
    expected = tokenizer.decode(reference(hf, PROMPT, repetition))
    got = _complete(client, model, logit_bias={"504": 1.0}, extra_body={"repetition_penalty": 3})
    assert got.choices[0].text == expected != repeated
    # Chat takes the same fields.
    chat = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=4,
        temperature=0,
        logit_bias={"1781": 50},
        extra_body=NO_EOS,
    )
    assert chat.choices[0].message.content == tokenizer.decode([1781] * 4)


@pytest.mark.python_only("logit_bias, allowed_token_ids: 400 on the native frontend")
def test_logit_bias_and_allowed_token_ids(client, model, hf, tokenizer) -> None:
    bias = {"1781": 9.0, "260": 5.5}

    def biased(logits, prompt, outputs):
        for token, value in bias.items():
            logits[int(token)] += value
        return logits

    got = _complete(client, model, logit_bias=bias).choices[0].text
    assert got == tokenizer.decode(reference(hf, PROMPT, biased))
    allowed = [260, 1781, 3458, 504, 28]

    def only(logits, prompt, outputs):
        masked = torch.full_like(logits, float("-inf"))
        masked[allowed] = logits[allowed]
        return masked

    got = _complete(client, model, extra_body={"allowed_token_ids": allowed})
    assert got.choices[0].text == tokenizer.decode(reference(hf, PROMPT, only))
    # Sampled rows honour it too.
    sampled = _complete(
        client,
        model,
        temperature=1.0,
        seed=3,
        logprobs=0,
        extra_body={"allowed_token_ids": allowed},
    )
    texts = {tokenizer.decode([t]) for t in allowed}
    assert sampled.choices[0].logprobs is not None
    assert set(sampled.choices[0].logprobs.tokens or []) <= texts


@pytest.mark.python_only("bad_words: 400 on the native frontend")
def test_bad_words_are_not_generated(client, model, hf, tokenizer) -> None:
    first = reference(hf, PROMPT, max_tokens=1)[0]
    word = tokenizer.decode([first]).strip()
    assert word
    got = _complete(client, model, max_tokens=1, extra_body={"bad_words": [word]})
    assert got.choices[0].text.strip() != word


def _prompt_logprobs(hf, prompt: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([prompt])).logits[0].float().log_softmax(-1)


@pytest.mark.python_only("echo: 400 on the native frontend")
def test_echo_with_logprobs_scores_the_prompt(client, model, hf, tokenizer) -> None:
    """max_tokens 0 + echo + logprobs: OpenAI's way to score a prompt."""
    reference_lp = _prompt_logprobs(hf, PROMPT)
    scored = _complete(client, model, max_tokens=0, echo=True, logprobs=2)
    choice = scored.choices[0]
    assert choice.text == tokenizer.decode(PROMPT, skip_special_tokens=False)
    assert choice.finish_reason == "length"
    assert scored.usage is not None and scored.usage.completion_tokens == 0
    logprobs = choice.logprobs
    assert logprobs is not None and logprobs.token_logprobs is not None
    assert logprobs.tokens == [tokenizer.token_text(t) for t in PROMPT]
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs is not None
    assert logprobs.top_logprobs[0] is None
    for j, value in enumerate(logprobs.token_logprobs[1:]):
        assert value == pytest.approx(reference_lp[j, PROMPT[j + 1]].item(), abs=1e-4)
        assert len(logprobs.top_logprobs[j + 1]) == 2
    # With generated tokens after the prompt: the prompt's entries, then the new ones.
    both = _complete(client, model, max_tokens=3, echo=True, logprobs=0).choices[0].logprobs
    assert both is not None and both.tokens is not None
    assert len(both.tokens) == len(PROMPT) + 3 and both.tokens[: len(PROMPT)] == logprobs.tokens
    streamed = _complete(client, model, max_tokens=3, echo=True, logprobs=0, stream=True)
    tokens = [t for chunk in streamed for c in chunk.choices for t in (c.logprobs.tokens or [])]
    assert tokens == both.tokens
    # Streamed prompt scoring: one chunk, the echo and the prompt's logprobs; n = 2 both.
    chunks = list(_complete(client, model, max_tokens=0, echo=True, logprobs=0, n=2, stream=True))
    choices = sorted((c for chunk in chunks for c in chunk.choices), key=lambda c: c.index)
    assert [c.index for c in choices] == [0, 1]
    for c in choices:
        assert c.text == choice.text and c.finish_reason == "length"
        assert c.logprobs is not None and c.logprobs.token_logprobs is not None
        assert c.logprobs.token_logprobs[1:] == pytest.approx(logprobs.token_logprobs[1:], abs=1e-5)


@pytest.mark.python_only("prompt_logprobs: 400 on the native frontend")
def test_vllm_prompt_logprobs_field(url, model, hf) -> None:
    reference_lp = _prompt_logprobs(hf, PROMPT)
    body = {"model": model, "prompt": PROMPT, "max_tokens": 2, "prompt_logprobs": 1}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=TIMEOUT_S)
    assert response.status_code == 200, response.text
    entries = response.json()["choices"][0]["prompt_logprobs"]
    assert entries[0] is None and len(entries) == len(PROMPT)
    for j, entry in enumerate(entries[1:]):
        chosen = entry[str(PROMPT[j + 1])]
        assert chosen["logprob"] == pytest.approx(reference_lp[j, PROMPT[j + 1]].item(), abs=1e-4)
        assert chosen["rank"] >= 1
        assert 1 <= len(entry) <= 2


@pytest.mark.python_only("prompt_logprobs: 400 on the native frontend")
def test_chat_prompt_logprobs(client, model) -> None:
    chat = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=2,
        temperature=0,
        extra_body={"prompt_logprobs": 0},
    )
    entries = (chat.model_extra or {})["prompt_logprobs"]
    assert chat.usage is not None and len(entries) == chat.usage.prompt_tokens
    assert entries[0] is None and all(len(e) == 1 for e in entries[1:])


@pytest.mark.python_only("best_of: 400 on the native frontend")
def test_best_of_returns_the_most_likely(client, model) -> None:
    fields = {"max_tokens": 6, "temperature": 1.0, "seed": 11, "logprobs": 0}
    all_three = _complete(client, model, n=3, **fields).choices
    sums = [sum(c.logprobs.token_logprobs) for c in all_three]  # type: ignore[union-attr,arg-type]
    assert len({c.text for c in all_three}) > 1
    best = _complete(client, model, n=1, best_of=3, **fields)
    assert [c.text for c in best.choices] == [all_three[int(np.argmax(sums))].text]
    assert best.usage is not None and best.usage.completion_tokens == 18  # all three generated
    # Without logprobs in the request none are returned, though they ranked the sequences.
    two = _complete(client, model, n=2, best_of=3, **{**fields, "logprobs": None})
    order = sorted(range(3), key=lambda i: -sums[i])[:2]
    assert [c.text for c in two.choices] == [all_three[i].text for i in order]
    assert [c.index for c in two.choices] == [0, 1] and two.choices[0].logprobs is None
    # Chat takes best_of too (vLLM's extension).
    chat = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Hi"}],
        n=1,
        max_tokens=4,
        temperature=1.0,
        seed=2,
        extra_body={"best_of": 3, **NO_EOS},
    )
    assert len(chat.choices) == 1 and chat.choices[0].index == 0
    assert chat.usage is not None and chat.usage.completion_tokens == 12


def _reference_embedding(hf, prompt: list[int], pooling: str) -> np.ndarray:
    with torch.no_grad():
        hidden = hf.model(torch.tensor([prompt])).last_hidden_state[0].float()
    vector = hidden.mean(0) if pooling == "mean" else hidden[-1]
    return torch.nn.functional.normalize(vector, dim=-1).numpy()


@pytest.mark.python_only("/v1/embeddings: 400 on the native frontend")
def test_embeddings_equal_the_reference(client, model, hf, tokenizer) -> None:
    texts = ["The quick brown fox", "jumps over the lazy dog, twice."]
    response = client.embeddings.create(model=model, input=texts)
    assert [d.index for d in response.data] == [0, 1]
    ids = [tokenizer.encode(t) for t in texts]
    for data, prompt in zip(response.data, ids, strict=True):
        np.testing.assert_allclose(
            data.embedding, _reference_embedding(hf, prompt, "mean"), atol=1e-4
        )
        assert abs(np.linalg.norm(data.embedding) - 1.0) < 1e-4
    assert response.usage.prompt_tokens == sum(len(p) for p in ids)
    assert response.usage.total_tokens == response.usage.prompt_tokens
    last = client.embeddings.create(model=model, input=PROMPT, extra_body={"pooling": "last"})
    np.testing.assert_allclose(
        last.data[0].embedding, _reference_embedding(hf, PROMPT, "last"), atol=1e-4
    )
    # The client asks for base64 unless told otherwise and decodes it itself (above); the
    # float format gives the same float32 values.
    raw = client.embeddings.create(model=model, input=[PROMPT], encoding_format="float")
    encoded = client.embeddings.create(model=model, input=[PROMPT])
    np.testing.assert_array_equal(
        np.array(encoded.data[0].embedding, dtype="<f4"), np.array(raw.data[0].embedding, "<f4")
    )


@pytest.mark.python_only("/v1/embeddings: 400 on the native frontend")
def test_embeddings_base64_is_float32_little_endian(url, model) -> None:
    body = {"model": model, "input": "hello", "encoding_format": "base64"}
    data = httpx.post(f"{url}/v1/embeddings", json=body, timeout=TIMEOUT_S).json()["data"]
    vector = np.frombuffer(base64.b64decode(data[0]["embedding"]), dtype="<f4")
    body["encoding_format"] = "float"
    floats = httpx.post(f"{url}/v1/embeddings", json=body, timeout=TIMEOUT_S).json()["data"]
    np.testing.assert_array_equal(vector, np.array(floats[0]["embedding"], dtype="<f4"))


_NO_EMBEDDINGS = pytest.mark.python_only("/v1/embeddings: 400 on the native frontend")


@pytest.mark.parametrize(
    ("path", "fields", "param"),
    [
        ("/v1/completions", {"presence_penalty": 2.5}, "presence_penalty"),
        ("/v1/completions", {"frequency_penalty": -3}, "frequency_penalty"),
        ("/v1/completions", {"repetition_penalty": 0}, "repetition_penalty"),
        ("/v1/completions", {"logit_bias": {"12": 150}}, "logit_bias"),
        ("/v1/completions", {"logit_bias": {"x": 1}}, "logit_bias"),
        ("/v1/completions", {"logit_bias": {"99999999": 1}}, "logit_bias"),
        ("/v1/completions", {"allowed_token_ids": []}, "allowed_token_ids"),
        ("/v1/completions", {"allowed_token_ids": [10**8]}, "allowed_token_ids"),
        ("/v1/completions", {"bad_words": [""]}, "bad_words"),
        ("/v1/completions", {"prompt_logprobs": 21}, "prompt_logprobs"),
        ("/v1/completions", {"best_of": 1, "n": 2}, "best_of"),
        ("/v1/completions", {"best_of": 3, "stream": True}, "best_of"),
        ("/v1/completions", {"max_tokens": 0}, "max_tokens"),
        ("/v1/chat/completions", {"max_tokens": 0}, "max_tokens"),
        ("/v1/chat/completions", {"presence_penalty": 9}, "presence_penalty"),
        ("/v1/chat/completions", {"prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
        pytest.param("/v1/embeddings", {"input": ""}, "input", marks=_NO_EMBEDDINGS),
        pytest.param("/v1/embeddings", {"input": []}, "input", marks=_NO_EMBEDDINGS),
        pytest.param("/v1/embeddings", {"input": [[]]}, "input", marks=_NO_EMBEDDINGS),
        pytest.param("/v1/embeddings", {"input": [10**9]}, "input", marks=_NO_EMBEDDINGS),
        pytest.param(
            "/v1/embeddings",
            {"input": "x", "encoding_format": "hex"},
            "encoding_format",
            marks=_NO_EMBEDDINGS,
        ),
        pytest.param(
            "/v1/embeddings", {"input": "x", "dimensions": 8}, "dimensions", marks=_NO_EMBEDDINGS
        ),
        pytest.param(
            "/v1/embeddings", {"input": "x", "pooling": "max"}, "pooling", marks=_NO_EMBEDDINGS
        ),
        pytest.param("/v1/embeddings", {"input": 5}, "input", marks=_NO_EMBEDDINGS),
    ],
)
def test_bad_values_are_400_naming_the_field(url, model, path, fields, param) -> None:
    body: dict[str, Any] = {"model": model}
    if path == "/v1/completions":
        body["prompt"] = "Hi"
    elif path == "/v1/chat/completions":
        body["messages"] = [{"role": "user", "content": "Hi"}]
    body.update(fields)
    response = httpx.post(f"{url}{path}", json=body, timeout=TIMEOUT_S)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    assert error["type"] == "BadRequestError"
