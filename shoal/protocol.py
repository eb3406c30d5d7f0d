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


# ---------------------------------------------------------------------------------------------
# Serving topology (see docs/serving.md):
#   API server i binds a ROUTER on input_address[i] and a PULL on output_address[i].
#   Engine k connects a DEALER (identity = engine_identity(k)) to every API server's input
#   address and a PUSH to every API server's output address (indexed by client_index).
#   Engine -> each API server, first message on the DEALER: EngineReady.
#   API server -> engine k on its ROUTER: [engine_identity(k), RequestType.ADD,
#   encode(EngineCoreRequest)] or [engine_identity(k), RequestType.ABORT, encode(AbortRequest)].
#   Engine -> API server: encode(EngineCoreOutputs) on PUSH[client_index], or ENGINE_CORE_DEAD.
#   DP coordinator (M > 1): engines PUSH EngineLoad to it; it PUBlishes DPStats on
#   stats_update_address; API servers SUBscribe.
#   (DPStats goes as one frame, encode(DPStats), no topic frame: subscribe to b"".)
# ---------------------------------------------------------------------------------------------


def engine_identity(engine_index: int) -> bytes:
    """ZMQ routing identity of engine `engine_index` on the API servers' ROUTER sockets."""
    return engine_index.to_bytes(2, "little")


class EngineReady(msgspec.Struct, array_like=True, gc=False):
    """An engine's first message to each API server (and to the launcher's handshake)."""

    engine_index: int
    max_model_len: int
    num_blocks: int
    block_size: int
    model_name: str = ""


class AbortRequest(msgspec.Struct, array_like=True, gc=False):
    request_ids: list[str]


class EngineLoad(msgspec.Struct, array_like=True, gc=False):
    """An engine's queue lengths, pushed to the DP coordinator after each step change."""

    engine_index: int
    num_waiting_reqs: int
    num_running_reqs: int
    kv_cache_usage: float = 0.0


class DPStats(msgspec.Struct, array_like=True, gc=False):
    """The coordinator's view of every engine, published to all API servers.

    `loads[k] = (num_waiting_reqs, num_running_reqs)` of engine k."""

    loads: list[tuple[int, int]]
    timestamp: float = 0.0


class EngineAddresses(msgspec.Struct, array_like=True, gc=False):
    """Launcher -> engine, over the engine's handshake pipe once the API servers have bound:
    where to connect (indexed by client_index). The engine answers with `EngineReady`."""

    input_addresses: list[str]
    output_addresses: list[str]
