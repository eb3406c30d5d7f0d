"""`shoal serve --quantization int8`: the flag reaches the engine, which serves with int8
linears and, by default, a float16 KV cache (the engine's load log says both), and greedy
streaming equals non-streaming."""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx

from tests.serving.conftest import ServeProcess


def test_serve_with_int8_linears(serve: Callable[..., ServeProcess]) -> None:
    server = serve("--quantization", "int8")
    assert server.url is not None
    server.wait_for_log(r"EngineCore_0.*mode: int8 \(--quantization int8\)", timeout_s=30)
    server.wait_for_log(r"EngineCore_0.*\+ int8 linears", timeout_s=30)
    server.wait_for_log(r"EngineCore_0.*KV cache: .* MiB \(float16\)", timeout_s=30)
    model = httpx.get(f"{server.url}/v1/models", timeout=30).json()["data"][0]["id"]
    prompt = "The quick brown fox"
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": 12,
        "ignore_eos": True,
        "temperature": 0,
    }
    plain = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
    assert plain.status_code == 200, plain.text
    choice = plain.json()["choices"][0]
    assert choice["finish_reason"] == "length" and plain.json()["usage"]["completion_tokens"] == 12

    streamed = ""
    with httpx.stream(
        "POST", f"{server.url}/v1/completions", json={**body, "stream": True}, timeout=60
    ) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line.removeprefix("data: "))
                streamed += "".join(c["text"] for c in chunk["choices"])
    assert streamed == choice["text"]
