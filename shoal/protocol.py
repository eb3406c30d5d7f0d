"""Every message that crosses a process boundary, as msgspec Structs encoded with msgpack.

API server -> engine: a one-byte request type frame, then the encoded struct.
Engine -> API server: `EngineCoreOutputs` on that API server's own output socket
(`client_index`), or a dead notice: `ENGINE_CORE_DEAD` followed by `encode(EngineDead)` in one
frame (`engine_dead_frame`; the bare `ENGINE_CORE_DEAD` of older senders still means "an
engine died", which one unknown).
No pickle anywhere on these paths.
"""

from __future__ import annotations

import enum

import msgspec

from shoal.sampling_params import SamplingParams


class RequestType(bytes, enum.Enum):
    """First frame of every API server -> engine message. The bytes keep the seed's
    numbering; its 0x02 (START_DP_WAVE), 0x04 (EXECUTOR_FAILED) and 0x05 (WAKEUP) are not
    sent here, so an engine drops them as malformed."""

    ADD = b"\x00"
    ABORT = b"\x01"
    UTILITY = b"\x03"


# Prefix of the dead notice an engine (or the launcher on its behalf) sends on every output
# socket when the engine dies: `engine_dead_frame(k, reason)`. The bare prefix alone is the old
# form (no engine index). No encoded EngineCoreOutputs starts with it (those start with a
# msgpack array header, 0x90-0x9f / 0xdc / 0xdd).
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
    # The prompt is a [len(prompt_token_ids), hidden] tensor of input embeddings, sent
    # ahead on the engine's tensor queue (`shoal.runtime.tensor_queue`), not in this frame;
    # prompt_token_ids then holds placeholders (0) that only count the positions.
    has_prompt_embeds: bool = False


class TokenLogprobs(msgspec.Struct, array_like=True, gc=False):
    """Logprob of one sampled token and the top alternatives at that position."""

    token_id: int
    logprob: float
    # 1-based rank of the sampled token among the whole vocabulary.
    rank: int
    top_token_ids: list[int] = []
    top_logprobs: list[float] = []


class RequestPhaseTimes(msgspec.Struct, array_like=True, gc=False):
    """Seconds a finished request spent queued, in prefill (first scheduled to first token)
    and in decode (first to last token) in its engine (shoal.engine.stats)."""

    queue_s: float
    prefill_s: float
    decode_s: float


class EngineCoreOutput(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs] | None = None
    finish_reason: FinishReason | None = None
    # The stop token id that finished the request (None for EOS or other reasons).
    stop_reason: int | str | None = None
    # Prompt tokens served from the prefix cache (reported once, with the first output).
    num_cached_tokens: int = 0
    # Set on the final output: the request's phases in the engine (shoal.engine.stats).
    phase_times: RequestPhaseTimes | None = None
    # With the first output of a request that asked for them (`prompt_logprobs`): the
    # logprobs of prompt tokens 1..len-1 (the first has none).
    prompt_logprobs: list[TokenLogprobs] | None = None
    # An embedding request's pooled vector, float32 little-endian (with its final output).
    embedding: bytes = b""

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
    # Totals since the engine started (shoal.engine.stats says why cumulative): prefix-cache
    # tokens looked up and found, requests preempted, and steps by tokens scheduled
    # (counts per bucket of ITERATION_TOKENS_BUCKETS, +Inf last; and the tokens' sum).
    prefix_cache_queries_total: int = 0
    prefix_cache_hits_total: int = 0
    num_preemptions_total: int = 0
    iteration_tokens_counts: list[int] = []
    iteration_tokens_sum: int = 0


class KVCacheStatus(msgspec.Struct, array_like=True, gc=False):
    """A live engine's KV block pool: its counts and the result of its integrity check."""

    engine_index: int
    num_blocks: int
    num_free_blocks: int
    # "ok", or the failed invariant (the check's AssertionError message).
    integrity: str = "ok"


class UtilityRequest(msgspec.Struct, array_like=True, gc=False):
    """API server -> engine (`RequestType.UTILITY`): run `method` between two steps and answer
    with `EngineCoreOutputs.utility_output` on the sender's output socket. Methods:
    `kv_cache_status` (-> `KVCacheStatus`, running the block pool's `check_integrity()`)."""

    call_id: int
    method: str
    client_index: int = 0


class UtilityOutput(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """An engine's answer to one `UtilityRequest` (`error` set when the call failed)."""

    call_id: int
    kv_cache: KVCacheStatus | None = None
    error: str = ""


class EngineCoreOutputs(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    engine_index: int = 0
    outputs: list[EngineCoreOutput] = []
    scheduler_stats: SchedulerStats | None = None
    timestamp: float = 0.0
    # Set (with no outputs) on the answer to a UtilityRequest.
    utility_output: UtilityOutput | None = None


class EngineDead(msgspec.Struct, array_like=True, gc=False):
    """Engine `engine_index` died (`reason` for the logs). Sent by the dying engine itself and,
    once it has exited, by the launcher on its behalf (a SIGKILLed engine says nothing)."""

    engine_index: int
    reason: str = ""


_encoder = msgspec.msgpack.Encoder()


def encode(msg: msgspec.Struct) -> bytes:
    return _encoder.encode(msg)


def decoder(type_: type) -> msgspec.msgpack.Decoder:
    """A reusable typed decoder (msgspec.DecodeError / ValidationError on bad frames)."""
    return msgspec.msgpack.Decoder(type_)


def engine_dead_frame(engine_index: int, reason: str = "") -> bytes:
    """The one-frame dead notice of engine `engine_index`: ENGINE_CORE_DEAD + EngineDead."""
    return ENGINE_CORE_DEAD + encode(EngineDead(engine_index, reason))


_dead_decoder = msgspec.msgpack.Decoder(EngineDead)


def decode_engine_dead(frame: bytes) -> EngineDead | None:
    """The `EngineDead` of a dead-notice frame (starts with ENGINE_CORE_DEAD); None for the
    bare old form, which names no engine. msgspec.DecodeError if what follows the prefix is
    not an EngineDead."""
    payload = frame[len(ENGINE_CORE_DEAD) :]
    if not payload:
        return None
    message: EngineDead = _dead_decoder.decode(payload)
    return message


# ---------------------------------------------------------------------------------------------
# Serving topology (see docs/serving.md):
#   API server i binds a ROUTER on input_address[i] and a PULL on output_address[i].
#   Engine k connects a DEALER (identity = engine_identity(k)) to every API server's input
#   address and a PUSH to every API server's output address (indexed by client_index).
#   Engine -> each API server, first message on the DEALER: EngineReady.
#   API server -> engine k on its ROUTER: [engine_identity(k), RequestType.ADD,
#   encode(EngineCoreRequest)] or [engine_identity(k), RequestType.ABORT, encode(AbortRequest)].
#   [engine_identity(k), RequestType.UTILITY, encode(UtilityRequest)] (answered by an
#   EngineCoreOutputs carrying only utility_output).
#   Engine -> API server: encode(EngineCoreOutputs) on PUSH[client_index], or
#   engine_dead_frame(k) (also sent by the launcher for an engine that exited).
#   Engine k restarted (--restart-dead-engines): the new process sends EngineReady on its
#   DEALERs again; the ROUTERs (ZMQ_ROUTER_HANDOVER) accept the reused identity.
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
    # The model's vocabulary size (its embedding rows; 0: not reported). The API servers
    # check prompt ids against it as well as the tokenizer's: the two can differ.
    vocab_size: int = 0
    # The model's hidden size (0: not reported): the width `prompt_embeds` must have.
    hidden_size: int = 0


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


class TensorHandle(msgspec.Struct, array_like=True, gc=False):
    """API server -> engine k on the tensor queue (`shoal.runtime.tensor_queue`): where the
    bytes of request `request_id`'s tensor wait in shared memory. The engine copies them
    out and unlinks the segment at once."""

    request_id: str
    segment: str  # file name under the shared-memory directory
    dtype: str  # "float32", ...
    shape: list[int]


# ---------------------------------------------------------------------------------------------
# --headless hosts (shoal.engine.headless, docs/scale-out.md): a host's DEALER connects to the
# front end's ROUTER on --data-parallel-address:--data-parallel-rpc-port. Frames: [kind,
# payload], kind one of HEADLESS_HELLO / HEADLESS_WELCOME / HEADLESS_NOTICE.
#   host -> front end: HEADLESS_HELLO, HeadlessHello (which engines it runs)
#   front end -> host: HEADLESS_WELCOME, HeadlessWelcome (addresses, or why it is refused)
#   host -> front end: HEADLESS_NOTICE, HeadlessNotice("ready", engines=[EngineReady...]),
#   later ("dead", reason) when one of its engines died; front end -> host: ("stop", reason)
# ---------------------------------------------------------------------------------------------
HEADLESS_HELLO = b"HELLO"
HEADLESS_WELCOME = b"WELCOME"
HEADLESS_NOTICE = b"NOTICE"


class HeadlessHello(msgspec.Struct, array_like=True, gc=False):
    """A --headless host offers engines start_rank..start_rank + num_engines - 1."""

    start_rank: int
    num_engines: int
    data_parallel_size: int
    hostname: str = ""


class HeadlessWelcome(msgspec.Struct, array_like=True, gc=False):
    """The front end's answer: where its API servers and DP coordinator listen, or `error`
    (the host is refused and exits)."""

    input_addresses: list[str]
    output_addresses: list[str]
    coordinator_address: str | None = None
    error: str = ""


class HeadlessNotice(msgspec.Struct, array_like=True, gc=False):
    """`kind`: "ready" (host -> front end, with its engines' EngineReady), "dead" (one of the
    host's engines died: `reason`) or "stop" (front end -> host: shut down)."""

    kind: str
    reason: str = ""
    engines: list[EngineReady] = []
