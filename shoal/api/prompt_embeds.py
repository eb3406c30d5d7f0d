"""`prompt_embeds` of /v1/completions: vLLM's format (base64 of `torch.save` of a
[tokens, hidden] tensor) decoded and checked in the API server.

Torch is imported on the first request that carries embeddings, never before.
"""

from __future__ import annotations

import base64
import binascii
import io
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from shoal.api.async_engine import AsyncEngine
    from shoal.api.protocol import CompletionRequest
    from shoal.processing.processor import ProcessedRequest
    from shoal.sampling_params import SamplingParams

FIELD = "prompt_embeds"


def embeds_strings(value: str | list[str] | None) -> list[str]:
    """The field's prompts: one string, or a list of them (`ValueError` naming the field)."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not items:
        raise ValueError(f"{FIELD}: must not be empty")
    return items


def decode_prompt_embeds(data: str, hidden_size: int, max_tokens: int) -> torch.Tensor:
    """The float32 [tokens, hidden_size] tensor `data` encodes; `ValueError` naming the
    field when it is not base64, not a tensor saved by `torch.save`, not 2-D, not floating
    point, not finite, of another width, empty, or longer than `max_tokens` rows."""
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{FIELD}: not valid base64") from None
    import torch

    try:
        tensor = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for a corrupt file
        raise ValueError(
            f"{FIELD}: not a tensor saved with torch.save ({type(e).__name__})"
        ) from None
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{FIELD}: holds a {type(tensor).__name__}, not a tensor")
    if tensor.layout != torch.strided:
        tensor = tensor.to_dense()
    if tensor.dim() == 3 and tensor.shape[0] == 1:
        tensor = tensor[0]  # a batch of one, as some clients send
    shape = list(tensor.shape)
    if tensor.dim() != 2:
        raise ValueError(f"{FIELD}: expected a [tokens, hidden] tensor, got shape {shape}")
    if not tensor.is_floating_point():
        raise ValueError(f"{FIELD}: expected a floating-point tensor, got {tensor.dtype}")
    if hidden_size and shape[1] != hidden_size:
        raise ValueError(f"{FIELD}: the hidden size is {shape[1]}; this model's is {hidden_size}")
    if shape[0] == 0:
        raise ValueError(f"{FIELD}: the tensor has no rows")
    if shape[0] > max_tokens:
        raise ValueError(
            f"{FIELD}: {shape[0]} positions; this model's maximum context length leaves room "
            f"for at most {max_tokens} prompt positions"
        )
    tensor = tensor.to(torch.float32).contiguous()
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{FIELD}: the tensor holds NaN or infinite values")
    return tensor


def embeds_requests(
    engine: AsyncEngine,
    body: CompletionRequest,
    request_id: str,
    params: SamplingParams,
    start: int,
) -> list[ProcessedRequest]:
    """One `ProcessedRequest` per prompt of `body.prompt_embeds` (ids `<request_id>-<i>`
    from `start`); `ValueError` naming the field when embeddings are not enabled, combined
    with what needs prompt tokens, or malformed."""
    items = embeds_strings(body.prompt_embeds)
    if not items:
        return []
    if engine.tensor_queue is None:
        raise ValueError(
            f"{FIELD}: not enabled on this server (start it with --enable-prompt-embeds)"
        )
    if body.echo:
        raise ValueError("echo: not supported with prompt_embeds (there is no prompt text)")
    if params.prompt_logprobs is not None:
        raise ValueError("prompt_logprobs: not supported with prompt_embeds")
    hidden_size = engine.client.hidden_size
    max_tokens = engine.max_model_len - 1  # room for one generated token
    tensors = [decode_prompt_embeds(item, hidden_size, max_tokens) for item in items]
    return [
        engine.process_embeds(f"{request_id}-{start + i}", tensor, params)
        for i, tensor in enumerate(tensors)
    ]
