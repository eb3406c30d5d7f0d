"""`shoal serve` with no MODEL: the embedded SmolLM2-135M-Instruct GGUF, one API server, one
engine, answered through the official openai client; SIGTERM stops everything."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import openai
import pytest

from tests.serving.conftest import ServeProcess, start_serve

pytestmark = pytest.mark.slow


@pytest.fixture
def server() -> Iterator[ServeProcess]:
    server = start_serve(["--kv-cache-memory-bytes", str(64 << 20), "--max-model-len", "512"])
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
    assert server.stop(signal.SIGTERM, 60) == 0
    assert server.leftovers() == []
