"""Every message that crosses a process boundary, as msgspec Structs encoded with msgpack.

API server -> engine: a one-byte request type frame, then the encoded struct.
Engine -> API server: `EngineCoreOutputs` on that API server's own output socket
(`client_index`), or the single frame `ENGINE_CORE_DEAD`.
No pickle anywhere on these paths.
"""

from __future__ import annotations

import enum

import msgspec

from shoal.sampling_params import SamplingParams


class RequestType(bytes, enum.Enum):
    """First frame of every API server -> engine message."""

    ADD = b"\x00"
    ABORT = b"\x01"
    START_DP_WAVE = b"\x02"
    UTILITY = b"\x03"
    EXECUTOR_FAILED = b"\x04"
    WAKEUP = b"\x05"


# Single frame an engine sends on every output socket when it dies.
ENGINE_CORE_DEAD = b"ENGINE_CORE_DEAD"


class FinishReason(enum.IntEnum):
    STOP = 0  # EOS, a stop token id, or (front end) a stop string
    LENGTH = 1  # max_tokens or max_model_len reached
    ABORT = 2  # aborted by the client, a disconnect, or shutdown
    ERROR = 3  # the engine failed this request

    def __str__(self) -> str:
        return self.name.lower()


class EngineCoreRequest(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    # EOS of the model's tokenizer / generation config (None: the model has none).
    eos_token_id: int | None
    arrival_time: float
    # Which API server sent it: outputs go back on that server's output socket.
    client_index: int = 0


class TokenLogprobs(msgspec.Struct, array_like=True, gc=False):
    """Logprob of one sampled token and the top alternatives at that position."""

    token_id: int
    logprob: float
    # 1-based rank of the sampled token among the whole vocabulary.
    rank: int
    top_token_ids: list[int] = []
    top_logprobs: list[float] = []


class EngineCoreOutput(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs] | None = None
    finish_reason: FinishReason | None = None
    # The stop token id that finished the request (None for EOS or other reasons).
    stop_reason: int | str | None = None
    # Prompt tokens served from the prefix cache (reported once, with the first output).
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class SchedulerStats(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """Engine load and step figures (for /metrics and the DP coordinator)."""

    num_running_reqs: int = 0
    num_waiting_reqs: int = 0
    kv_cache_usage: float = 0.0  # fraction of KV blocks in use
    num_blocks_total: int = 0
    num_blocks_free: int = 0
    prefix_cache_queries: int = 0  # tokens looked up this step
    prefix_cache_hits: int = 0  # of which found cached
    num_preemptions: int = 0
    # compute_iteration_details of the last step
    num_ctx_requests: int = 0
    num_ctx_tokens: int = 0
    num_generation_requests: int = 0
    num_generation_tokens: int = 0


class EngineCoreOutputs(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    engine_index: int = 0
    outputs: list[EngineCoreOutput] = []
    scheduler_stats: SchedulerStats | None = None
    timestamp: float = 0.0


_encoder = msgspec.msgpack.Encoder()


def encode(msg: msgspec.Struct) -> bytes:
    return _encoder.encode(msg)


def decoder(type_: type) -> msgspec.msgpack.Decoder:
    """A reusable typed decoder (msgspec.DecodeError / ValidationError on bad frames)."""
    return msgspec.msgpack.Decoder(type_)
