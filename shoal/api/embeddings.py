"""POST /v1/embeddings: OpenAI's request and response, computed by the engine as prompt-only
requests (the prompt's final hidden states pooled, then L2-normalized, as vLLM does)."""

from __future__ import annotations

import base64
from typing import Any

import msgspec

from shoal.api.asgi import Request, Response, json_response
from shoal.api.formatting import gather_or_cancel
from shoal.api.protocol import MAX_SEQUENCES_PER_REQUEST, UsageInfo, now_s
from shoal.api.routes import ServingContext, _final, _request_ids
from shoal.processing.outputs import RequestOutput
from shoal.sampling_params import POOLING_TYPES, SamplingParams

# Mean pooling by default: the default model is a chat model, not trained for embeddings,
# and the mean of its positions represents a text better than its last position.
DEFAULT_POOLING = "mean"


class EmbeddingRequest(msgspec.Struct, kw_only=True):
    # A string, a list of strings, a list of token ids or a list of token-id lists.
    input: str | list[Any]
    model: str | None = None
    encoding_format: str = "float"
    dimensions: int | None = None
    user: str | None = None
    # Extensions: how the positions are pooled ("mean" or "last"), and vLLM's `normalize`.
    pooling: str = DEFAULT_POOLING
    normalize: bool = True
    add_special_tokens: bool = True

    def inputs(self) -> list[str | list[int]]:
        """The texts or token-id lists to embed; `ValueError` naming the field."""
        if self.encoding_format not in ("float", "base64"):
            raise ValueError("encoding_format: must be 'float' or 'base64'")
        if self.dimensions is not None:
            raise ValueError("dimensions: not supported (the model's hidden size is returned)")
        if self.pooling not in POOLING_TYPES:
            raise ValueError(f"pooling: must be one of {', '.join(POOLING_TYPES)}")
        value = self.input
        if isinstance(value, str):
            items: list[Any] = [value]
        elif value and all(_is_token_id(t) for t in value):
            items = [list(value)]
        else:
            items = list(value)
        if not items:
            raise ValueError("input: must not be empty")
        if len(items) > MAX_SEQUENCES_PER_REQUEST:
            raise ValueError(f"input: at most {MAX_SEQUENCES_PER_REQUEST} inputs per request")
        for i, item in enumerate(items):
            if isinstance(item, str):
                if not item:
                    raise ValueError(f"input: input {i} is an empty string")
            elif not (isinstance(item, list) and item and all(_is_token_id(t) for t in item)):
                raise ValueError(
                    "input: must be a string, a list of strings, a list of token ids or a "
                    "list of token-id lists"
                )
        return items

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(max_tokens=0, pooling=self.pooling, normalize=self.normalize)


class EmbeddingData(msgspec.Struct):
    index: int
    # A list of floats, or (encoding_format "base64") the float32 little-endian bytes.
    embedding: list[float] | str
    object: str = "embedding"


class EmbeddingResponse(msgspec.Struct):
    id: str
    created: int
    model: str
    data: list[EmbeddingData]
    usage: UsageInfo
    object: str = "list"


async def create_embedding(ctx: ServingContext, request: Request) -> Response:
    """Embed every input in one engine request each (run concurrently)."""
    body: EmbeddingRequest = request.json(EmbeddingRequest)
    ctx.check_model(body.model)
    inputs = body.inputs()
    params = body.sampling_params()
    ids = _request_ids(request, "embd")
    try:
        processed = [
            ctx.engine.process(
                f"{ids.internal}-{i}", item, params, add_special_tokens=body.add_special_tokens
            )
            for i, item in enumerate(inputs)
        ]
    except ValueError as e:  # the processor names `prompt`: here the field is `input`
        _, sep, reason = str(e).partition(": ")
        raise ValueError(f"input: {reason if sep else e}") from None
    results = await gather_or_cancel([_final(ctx.engine, p) for p in processed])
    data = [
        EmbeddingData(i, _encode(result, body.encoding_format)) for i, result in enumerate(results)
    ]
    num_prompt = sum(len(r.prompt_token_ids) for r in results)
    usage = UsageInfo(num_prompt, 0, num_prompt)
    response = EmbeddingResponse(ids.public, now_s(), ctx.model_name, data, usage)
    return json_response(response, headers=ids.headers)


def _encode(result: RequestOutput, encoding_format: str) -> list[float] | str:
    raw = result.embedding
    if not raw:
        raise RuntimeError(f"request {result.request_id}: the engine returned no embedding")
    if encoding_format == "base64":
        return base64.b64encode(raw).decode("ascii")
    return result.embedding_values()


def _is_token_id(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
