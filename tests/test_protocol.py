"""Round trip of every wire struct in shoal.protocol through msgpack (no pickle)."""

from __future__ import annotations

import inspect

import msgspec
import pytest

from shoal import protocol
from shoal.protocol import (
    AbortRequest,
    DPStats,
    EngineAddresses,
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
    EngineDead,
    EngineLoad,
    EngineReady,
    FinishReason,
    HeadlessHello,
    HeadlessNotice,
    HeadlessWelcome,
    KVCacheStatus,
    RequestPhaseTimes,
    RequestType,
    SchedulerStats,
    TensorHandle,
    TokenLogprobs,
    UtilityOutput,
    UtilityRequest,
    decode_engine_dead,
    decoder,
    encode,
    engine_dead_frame,
    engine_identity,
)
from shoal.sampling_params import SamplingParams

_LOGPROBS = TokenLogprobs(
    token_id=7, logprob=-0.25, rank=2, top_token_ids=[3, 7], top_logprobs=[-0.1, -0.25]
)
_STATS = SchedulerStats(
    num_running_reqs=3,
    num_waiting_reqs=2,
    kv_cache_usage=0.5,
    num_blocks_total=64,
    num_blocks_free=32,
    prefix_cache_queries=100,
    prefix_cache_hits=48,
    num_preemptions=1,
    num_ctx_requests=1,
    num_ctx_tokens=17,
    num_generation_requests=2,
    num_generation_tokens=2,
    prefix_cache_queries_total=1000,
    prefix_cache_hits_total=480,
    num_preemptions_total=4,
    iteration_tokens_counts=[0, 3, 1],
    iteration_tokens_sum=30,
)

# One example per struct, every field set away from its default.
EXAMPLES: list[msgspec.Struct] = [
    EngineCoreRequest(
        request_id="req-1",
        prompt_token_ids=[1, 2, 3],
        sampling_params=SamplingParams(
            n=1,
            temperature=0.7,
            top_p=0.9,
            top_k=5,
            min_p=0.1,
            seed=42,
            max_tokens=8,
            min_tokens=2,
            stop=["\n"],
            stop_token_ids=[9],
            ignore_eos=True,
            logprobs=2,
            skip_special_tokens=False,
            include_stop_str_in_output=True,
        ),
        eos_token_id=2,
        arrival_time=1234.5,
        client_index=3,
    ),
    _LOGPROBS,
    EngineCoreOutput(
        request_id="req-1",
        new_token_ids=[5, 6],
        new_logprobs=[_LOGPROBS],
        finish_reason=FinishReason.STOP,
        stop_reason=9,
        num_cached_tokens=16,
        phase_times=RequestPhaseTimes(queue_s=0.5, prefill_s=0.25, decode_s=2.0),
    ),
    RequestPhaseTimes(0.001, 0.002, 0.003),
    # Prompt work and logits controls (shoal/worker/prompt_pass.py, penalties.py).
    EngineCoreOutput(
        "req-2",
        [],
        finish_reason=FinishReason.LENGTH,
        prompt_logprobs=[_LOGPROBS],
        embedding=b"\x00\x00\x80?",
    ),
    EngineCoreRequest(
        "req-3",
        [4, 5],
        SamplingParams(
            max_tokens=0,
            presence_penalty=0.5,
            frequency_penalty=-0.5,
            repetition_penalty=1.2,
            logit_bias={7: -100.0},
            allowed_token_ids=[7, 8],
            bad_words=["x"],
            bad_words_token_ids=[[87]],
            prompt_logprobs=3,
            pooling="last",
            normalize=False,
        ),
        None,
        1.0,
    ),
    _STATS,
    EngineCoreOutputs(
        engine_index=1,
        outputs=[
            EngineCoreOutput("a", [1]),
            EngineCoreOutput("b", [], finish_reason=FinishReason.ABORT),
        ],
        scheduler_stats=_STATS,
        timestamp=99.5,
        utility_output=UtilityOutput(
            call_id=3, kv_cache=KVCacheStatus(1, 64, 60, "ok"), error="partial"
        ),
    ),
    KVCacheStatus(engine_index=1, num_blocks=64, num_free_blocks=12, integrity="free list wrong"),
    UtilityRequest(call_id=5, method="kv_cache_status", client_index=2),
    UtilityOutput(call_id=5, kv_cache=KVCacheStatus(0, 8, 8), error="x"),
    EngineDead(engine_index=3, reason="EngineCore_3 died with exit code -9"),
    EngineReady(
        engine_index=1, max_model_len=2048, num_blocks=512, block_size=16, model_name="tiny"
    ),
    # Prompt embeddings: the request's flag, the model's width, the tensor queue's handle.
    EngineCoreRequest("req-4", [0, 0], SamplingParams(), 2, 1.0, 1, has_prompt_embeds=True),
    EngineReady(1, 2048, 512, 16, "tiny", vocab_size=49152, hidden_size=576),
    TensorHandle("req-4", "shoal-tq-1-ab-cd", "bfloat16", [2, 576]),
    AbortRequest(request_ids=["a", "b"]),
    EngineLoad(engine_index=1, num_waiting_reqs=4, num_running_reqs=8, kv_cache_usage=0.75),
    DPStats(loads=[(0, 1), (2, 3)], timestamp=12.0),
    EngineAddresses(
        input_addresses=["ipc:///tmp/x/in0", "tcp://127.0.0.1:5555"],
        output_addresses=["ipc:///tmp/x/out0", "tcp://127.0.0.1:5556"],
    ),
    HeadlessHello(start_rank=2, num_engines=2, data_parallel_size=4, hostname="host-b"),
    HeadlessWelcome(["tcp://10.0.0.1:4000"], ["tcp://10.0.0.1:4001"], "tcp://10.0.0.1:4002"),
    HeadlessNotice("ready", engines=[EngineReady(3, 256, 64, 16, "m", 100)]),
]


def _protocol_structs() -> set[type]:
    return {
        obj
        for _, obj in inspect.getmembers(protocol, inspect.isclass)
        if issubclass(obj, msgspec.Struct) and obj.__module__ == protocol.__name__
    }


def test_every_protocol_struct_has_an_example() -> None:
    assert _protocol_structs() == {type(m) for m in EXAMPLES}


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(message: msgspec.Struct) -> None:
    wire = encode(message)
    assert not wire.startswith(b"\x80")  # a pickle stream starts with PROTO (0x80)
    assert decoder(type(message)).decode(wire) == message


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: type(m).__name__)
def test_default_instances_round_trip(message: msgspec.Struct) -> None:
    # Required fields from the example, every optional field left at its default.
    cls = type(message)
    required = {
        f: getattr(message, f)
        for f in cls.__struct_fields__[: len(cls.__struct_fields__) - len(cls.__struct_defaults__)]
    }
    minimal = cls(**required)
    assert decoder(cls).decode(encode(minimal)) == minimal


def test_decoded_enums_keep_their_types() -> None:
    out = decoder(EngineCoreOutput).decode(encode(EXAMPLES[2]))
    assert out.finish_reason is FinishReason.STOP and out.finished
    assert str(FinishReason.LENGTH) == "length"
    req = decoder(EngineCoreRequest).decode(encode(EXAMPLES[0]))
    assert isinstance(req.sampling_params, SamplingParams)


def test_typed_decoder_rejects_the_wrong_message() -> None:
    with pytest.raises(msgspec.ValidationError):
        decoder(EngineCoreRequest).decode(encode(AbortRequest(["x"])))
    with pytest.raises(msgspec.DecodeError):
        decoder(AbortRequest).decode(b"\xc1 not msgpack")


def test_invalid_sampling_params_fail_decoding() -> None:
    bad = msgspec.msgpack.encode(["r", [1], {"temperature": -1.0}, None, 0.0])
    with pytest.raises(msgspec.ValidationError, match="temperature"):
        decoder(EngineCoreRequest).decode(bad)


def test_request_types_and_identities() -> None:
    assert [t.value for t in RequestType] == [b"\x00", b"\x01", b"\x03"]
    assert RequestType(b"\x01") is RequestType.ABORT
    identities = {engine_identity(k) for k in range(300)}
    assert len(identities) == 300 and all(len(i) == 2 for i in identities)
    assert protocol.ENGINE_CORE_DEAD == b"ENGINE_CORE_DEAD"


def test_dead_notice_names_the_engine_and_keeps_the_old_form() -> None:
    frame = engine_dead_frame(2, "EngineCore_2 died with exit code -9")
    assert frame.startswith(protocol.ENGINE_CORE_DEAD)
    assert decode_engine_dead(frame) == EngineDead(2, "EngineCore_2 died with exit code -9")
    # The bare frame of older senders: an engine died, which one unknown.
    assert decode_engine_dead(protocol.ENGINE_CORE_DEAD) is None
    with pytest.raises(msgspec.DecodeError):
        decode_engine_dead(protocol.ENGINE_CORE_DEAD + b"\xc1")
    # No encoded EngineCoreOutputs can be mistaken for a dead notice.
    for message in (EngineCoreOutputs(), EXAMPLES[4]):
        assert not encode(message).startswith(protocol.ENGINE_CORE_DEAD[:1])
