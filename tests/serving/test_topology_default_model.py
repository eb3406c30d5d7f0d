"""`shoal serve` with no MODEL: the embedded SmolLM2-135M-Instruct GGUF, one API server, one
engine, answered through the official openai client; SIGTERM stops everything. The exact
float32 path (`--quantization none`) answers the capital of France; with no flags at all the
engine runs gguf mode and says so."""

from __future__ import annotations

import re
import signal
from collections.abc import Iterator

import openai
import pytest

from tests.serving.conftest import ServeProcess, start_serve

pytestmark = pytest.mark.slow


SMALL = ["--kv-cache-memory-bytes", str(64 << 20), "--max-model-len", "512"]


@pytest.fixture
def server() -> Iterator[ServeProcess]:
    # The exact path, pinned: the answer below is float32's (gguf mode's differs).
    server = start_serve([*SMALL, "--quantization", "none"])
    yield server
    if server.proc.poll() is None:
        server.stop(signal.SIGTERM, 60)
    server.kill_everything()


def test_default_model_answers_a_chat(server: ServeProcess) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=120)
    (model,) = client.models.list().data
    assert model.id == "SmolLM2-135M-Instruct"
    reply = client.chat.completions.create(
        model=model.id,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=16,
        temperature=0.0,
    )
    text = reply.choices[0].message.content or ""
    assert reply.usage is not None and 0 < reply.usage.completion_tokens <= 16
    assert "paris" in text.lower(), text
    server.wait_for_log(r"EngineCore_0.*mode: float32 \(--quantization none", timeout_s=5)
    assert server.stop(signal.SIGTERM, 60) == 0
    assert server.leftovers() == []


def test_no_flags_run_gguf_mode_and_log_why() -> None:
    """The default a new user gets: gguf mode (the file's 4-bit weights, perplexity +0.44%
    vs float32), named with its reason in one engine log line."""
    server = start_serve(SMALL)
    try:
        line = server.wait_for_log(r"EngineCore_0.*mode: gguf \(auto: .*", timeout_s=5).group(0)
        assert "--quantization none" in line, line
        assert len(re.findall(r"mode: gguf \(auto", server.log)) == 1, server.log
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=120)
        reply = client.completions.create(
            model="SmolLM2-135M-Instruct", prompt="The quick brown fox", max_tokens=8
        )
        assert reply.usage is not None and reply.usage.completion_tokens == 8
        assert server.stop(signal.SIGTERM, 60) == 0
    finally:
        if server.proc.poll() is None:
            server.stop(signal.SIGTERM, 60)
        server.kill_everything()
