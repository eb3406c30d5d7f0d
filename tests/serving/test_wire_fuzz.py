"""Hypothesis on every wire-message decoder the engine, the coordinator and the API servers use:
arbitrary bytes, arbitrary msgpack and mutated valid messages may only raise the documented
`WIRE_DECODE_ERRORS` (msgspec.DecodeError, ValidationError included, and UnicodeDecodeError for
a str that is not UTF-8); the engine's input path and the
coordinator's load table drop them without raising at all."""

from __future__ import annotations

import contextlib
import queue
from typing import Any

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shoal.engine.client import WIRE_DECODE_ERRORS
from shoal.engine.coordinator import _LoadTable
from shoal.engine.io_threads import EngineIO
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
    KVCacheStatus,
    RequestType,
    SchedulerStats,
    UtilityOutput,
    UtilityRequest,
    decode_engine_dead,
    decoder,
    encode,
    engine_dead_frame,
)
from shoal.sampling_params import SamplingParams

WIRE_TYPES = (
    EngineCoreRequest,
    AbortRequest,
    EngineCoreOutputs,
    EngineReady,
    EngineLoad,
    DPStats,
    EngineAddresses,
    UtilityRequest,
    EngineDead,
)
DECODERS = {t: decoder(t) for t in WIRE_TYPES}
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Any value msgpack can carry, nested a few levels.
_ints = st.integers(min_value=-(2**63), max_value=2**64 - 1)
_scalars = (
    st.none()
    | st.booleans()
    | _ints
    | st.floats(allow_nan=True)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
msgpack_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=6)
        | st.dictionaries(st.text(max_size=8) | _ints, inner, max_size=6)
    ),
    max_leaves=25,
)

VALID = [
    encode(
        EngineCoreRequest("r1", [1, 2, 3], SamplingParams(max_tokens=4, temperature=0.5), 2, 1.0, 1)
    ),
    encode(AbortRequest(["r1", "r2"])),
    encode(
        EngineCoreOutputs(
            1,
            [EngineCoreOutput("r1", [5], finish_reason=FinishReason.LENGTH, stop_reason="x")],
            SchedulerStats(num_running_reqs=1, kv_cache_usage=0.5),
            3.0,
        )
    ),
    encode(EngineReady(0, 256, 64, 16, "m")),
    encode(EngineLoad(1, 2, 3, 0.25)),
    encode(DPStats([(1, 2), (3, 4)], 1.0)),
    encode(EngineAddresses(["ipc:///a"], ["ipc:///b"])),
    encode(UtilityRequest(4, "kv_cache_status", 1)),
    encode(EngineDead(1, "EngineCore_1 died with exit code -9")),
    encode(
        EngineCoreOutputs(0, utility_output=UtilityOutput(4, KVCacheStatus(0, 64, 60, "ok"), "e"))
    ),
]


def _decode_all(frame: bytes) -> None:
    for dec in DECODERS.values():
        with contextlib.suppress(*WIRE_DECODE_ERRORS):
            dec.decode(frame)
    # The API server's dead-notice path: the prefix, then whatever follows.
    with contextlib.suppress(*WIRE_DECODE_ERRORS):
        decode_engine_dead(engine_dead_frame(0)[:16] + frame)


@FUZZ
@given(st.binary(max_size=200))
def test_arbitrary_bytes_raise_only_decode_errors(frame: bytes) -> None:
    _decode_all(frame)


@FUZZ
@given(msgpack_values)
def test_arbitrary_msgpack_raises_only_decode_errors(value: Any) -> None:
    _decode_all(msgspec.msgpack.encode(value))


@FUZZ
@given(st.sampled_from(VALID), st.data())
def test_mutated_valid_messages_raise_only_decode_errors(frame: bytes, data: st.DataObject) -> None:
    cut = data.draw(st.integers(0, len(frame)))
    patch = data.draw(st.binary(min_size=1, max_size=4))
    at = data.draw(st.integers(0, len(frame)))
    _decode_all(frame[:cut])
    _decode_all(frame[:at] + patch + frame[at + len(patch) :])


@FUZZ
@given(st.lists(msgpack_values, min_size=1, max_size=8))
def test_arrays_of_any_shape_raise_only_decode_errors(fields: list[Any]) -> None:
    # array_like structs: right container, any arity and field types.
    _decode_all(msgspec.msgpack.encode(fields))


class _Inbox:
    """Stands in for EngineIO: `_decode_input` only needs its input queue."""

    def __init__(self) -> None:
        self.input_queue: queue.Queue[Any] = queue.Queue()


_frame_type = st.sampled_from([t.value for t in RequestType]) | st.binary(max_size=3)
_payload = (
    st.binary(max_size=100) | st.sampled_from(VALID) | msgpack_values.map(msgspec.msgpack.encode)
)


@FUZZ
@given(st.lists(_frame_type | _payload, max_size=4))
def test_engine_input_path_never_raises(frames: list[bytes]) -> None:
    inbox = _Inbox()
    EngineIO._decode_input(
        inbox,  # type: ignore[arg-type]
        frames,
        DECODERS[EngineCoreRequest],
        DECODERS[AbortRequest],
        DECODERS[UtilityRequest],
    )
    while not inbox.input_queue.empty():
        item = inbox.input_queue.get()
        assert isinstance(item, EngineCoreRequest | AbortRequest | UtilityRequest)


@FUZZ
@given(msgpack_values.map(msgspec.msgpack.encode) | st.sampled_from(VALID))
def test_coordinator_load_path_raises_only_documented_errors(frame: bytes) -> None:
    table = _LoadTable(2)
    try:
        table.update(DECODERS[EngineLoad].decode(frame))
    except (*WIRE_DECODE_ERRORS, ValueError):
        pass
    assert len(table.loads) == 2


def test_every_valid_message_round_trips() -> None:
    for frame, type_ in zip(VALID, [*WIRE_TYPES, EngineCoreOutputs], strict=True):
        assert encode(DECODERS[type_].decode(frame)) == frame


@FUZZ
@given(
    st.binary(max_size=100) | st.sampled_from(VALID) | msgpack_values.map(msgspec.msgpack.encode)
)
def test_api_server_output_path_raises_only_decode_errors(payload: bytes) -> None:
    # What EngineClient._output_loop does with one frame: a dead notice, or outputs.
    for frame in (engine_dead_frame(0)[:16] + payload, payload):
        with contextlib.suppress(*WIRE_DECODE_ERRORS):
            if frame.startswith(b"ENGINE_CORE_DEAD"):
                notice = decode_engine_dead(frame)
                assert notice is None or isinstance(notice.engine_index, int)
            else:
                DECODERS[EngineCoreOutputs].decode(frame)
