"""shoal-wire (frontend-rs/wire) against msgspec: byte-identical encodings both ways, and a
decoder that answers every malformed frame with an error (docs/wire-protocol.md).

Drives `shoal-wire-tool` (frontend-rs/wire/src/bin/shoal-wire-tool.rs, whose header gives the
stdin/stdout framing) over one pipe per module; skips when the tool is not built
(tests/native_frontend/conftest.py::rust_binary).
"""

from __future__ import annotations

import json
import math
import random
import re
import struct
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
import pytest

from shoal import protocol as P
from shoal.sampling_params import SamplingParams
from shoal.structured.params import StructuredOutputsParams
from tests.native_frontend.conftest import rust_binary

I64_MIN, I64_MAX, U32_MAX = -(2**63), 2**63 - 1, 2**32 - 1
INSTANCES_PER_TYPE = 300
FUZZ_FRAMES_PER_TYPE = 400


class WireTool:
    """One running shoal-wire-tool: `call(mode, type_name, payload) -> (ok, body)`."""

    def __init__(self, path: str) -> None:
        names = subprocess.run([path, "--list-types"], capture_output=True, check=True, text=True)
        self.index = {name: i for i, name in enumerate(names.stdout.split())}
        self.proc = subprocess.Popen([path], stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def call(self, mode: bytes, type_name: str, payload: bytes) -> tuple[bool, bytes]:
        """One request; raises if the tool died or answered out of framing."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        header = mode + bytes([self.index[type_name]]) + struct.pack("<I", len(payload))
        self.proc.stdin.write(header + payload)
        self.proc.stdin.flush()
        head = self.proc.stdout.read(5)
        assert len(head) == 5, f"tool gave no reply (exit code {self.proc.poll()})"
        status, length = head[0], struct.unpack("<I", head[1:])[0]
        body = self.proc.stdout.read(length)
        assert len(body) == length and status in (0, 1)
        return status == 0, body

    def reencode(self, type_name: str, frame: bytes) -> tuple[bool, bytes]:
        return self.call(b"D", type_name, frame)

    def close(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        try:
            assert self.proc.wait(timeout=10) == 0, "tool exited non-zero at EOF"
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.proc.stdout.close()


@pytest.fixture(scope="module")
def tool() -> Iterator[WireTool]:
    wire_tool = WireTool(rust_binary("shoal-wire-tool"))
    yield wire_tool
    wire_tool.close()


# --- random instances ------------------------------------------------------------------------


class Gen:
    """Seeded random values biased to the edges of each msgpack form."""

    INT_EDGES = [0, 1, -1, 127, 128, 255, 256, -32, -33, -128, -129, 32767, 32768, -32768,
                 -32769, 65535, 65536, 2**31 - 1, -(2**31), -(2**31) - 1, U32_MAX, 2**32,
                 I64_MAX, I64_MIN]  # fmt: skip
    FLOAT_EDGES = [0.0, -0.0, 1.0, -1.5, math.inf, -math.inf, math.nan, 5e-324, 1.7976931348623157e308,
                   0.1, 1e-300, 123456789.0]  # fmt: skip
    ALPHABET = 'aZ09 _-\n\t"\\é߷日本語\u0000\U0001f600\U0010ffff'

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def i64(self) -> int:
        if self.rng.random() < 0.5:
            return self.rng.choice(self.INT_EDGES)
        return self.rng.randint(I64_MIN, I64_MAX) >> self.rng.randrange(64)

    def u32(self) -> int:
        if self.rng.random() < 0.5:
            return self.rng.choice([v for v in self.INT_EDGES if 0 <= v <= U32_MAX])
        return self.rng.randint(0, U32_MAX) >> self.rng.randrange(32)

    def f64(self) -> float:
        roll = self.rng.random()
        if roll < 0.4:
            return self.rng.choice(self.FLOAT_EDGES)
        if roll < 0.7:
            return struct.unpack("<d", self.rng.randbytes(8))[0]
        return self.rng.uniform(-1e6, 1e6)

    def string(self, nonempty: bool = False) -> str:
        roll = self.rng.random()
        if roll < 0.002:
            n = 70000  # a str32 header
        elif roll < 0.2:
            n = self.rng.choice([0, 1, 5, 31, 32, 255, 256, 300])
        else:
            n = self.rng.randrange(12)
        n = max(n, 1) if nonempty else n
        return "".join(self.rng.choice(self.ALPHABET) for _ in range(n))

    def size(self, big: int = 20) -> int:
        roll = self.rng.random()
        if roll < 0.05:
            return self.rng.choice([15, 16, 65535, 65536])
        return self.rng.randrange(big)

    def chance(self, p: float = 0.5) -> bool:
        return self.rng.random() < p

    def maybe(self, make: Callable[[], Any], p: float = 0.5) -> Any:
        return make() if self.chance(p) else None

    def list_of(self, make: Callable[[], Any], big: int = 8, huge: bool = False) -> list[Any]:
        """Mostly short lists; with `huge` (cheap scalar items) sometimes 15/16/65535/65536 long
        (each array header form)."""
        n = self.size() if huge and self.rng.random() < 0.1 else self.rng.randrange(big)
        return [make() for _ in range(n)]


def _structured(g: Gen) -> StructuredOutputsParams:
    kwargs: dict[str, Any] = {}
    for name in ("json", "regex", "grammar"):
        if g.chance(0.3):
            kwargs[name] = g.string()
    if g.chance(0.3):
        kwargs["choice"] = g.list_of(g.string)
    if g.chance(0.3):
        kwargs["json_object"] = True
    return StructuredOutputsParams(**kwargs)


def _logit_bias(g: Gen) -> dict[int, float]:
    """Sorted by token id: shoal-wire writes key order (Python: insertion order)."""
    r = g.rng
    bias = {r.randint(0, I64_MAX): r.uniform(-100, 100) for _ in range(r.randrange(5))}
    return dict(sorted(bias.items()))


def bits_equal(a: float, b: float) -> bool:
    return struct.pack("<d", a) == struct.pack("<d", b)


def _sampling(g: Gen) -> SamplingParams:
    """A valid SamplingParams (its __post_init__ checks ranges); a float equal to its default
    is left to the default object, as a Python caller that does not pass it gets (the
    documented float-identity difference)."""
    r = g.rng
    kw: dict[str, Any] = {
        "n": r.choice([1, 2, 128, 2**40]),
        "temperature": r.choice([1.0, 0.0, 0.7, 2.5, math.inf]),
        "top_p": r.choice([1.0, 0.5, 5e-324]),
        "top_k": r.choice([0, -1, 1, 50, 100000]),
        "min_p": r.choice([0.0, -0.0, 0.05, 1.0]),
        "seed": g.maybe(g.i64),
        "max_tokens": r.choice([16, None, 0, 1, 256, 2**31]),
        "stop": g.list_of(lambda: g.string(nonempty=True), 4),
        "stop_token_ids": g.list_of(g.i64, 4, huge=True),
        "ignore_eos": g.chance(),
        "logprobs": r.choice([None, 0, 5, 20]),
        "skip_special_tokens": g.chance(),
        "include_stop_str_in_output": g.chance(),
        "presence_penalty": r.choice([0.0, -2.0, 1.25]),
        "frequency_penalty": r.choice([0.0, 2.0, -0.5]),
        "repetition_penalty": r.choice([1.0, 1.1, 1e-9]),
        "logit_bias": g.maybe(lambda: _logit_bias(g)),
        "allowed_token_ids": g.maybe(
            lambda: [r.randint(0, I64_MAX) for _ in range(1 + r.randrange(4))]
        ),
        "bad_words": g.list_of(lambda: g.string(nonempty=True), 3),
        "bad_words_token_ids": g.list_of(lambda: g.list_of(g.i64, 4), 3),
        "prompt_logprobs": r.choice([None, 0, 20]),
        "normalize": g.chance(),
        "structured_outputs": g.maybe(lambda: _structured(g), 0.3),
    }
    kw["min_tokens"] = r.randint(0, kw["max_tokens"]) if kw["max_tokens"] is not None else 3
    if g.chance(0.1):
        kw.update(pooling=r.choice(["mean", "last"]), max_tokens=0, min_tokens=0)
    defaults = {f.name: f.default for f in msgspec.structs.fields(SamplingParams)}
    for name, value in list(kw.items()):
        if isinstance(value, float) and bits_equal(value, defaults[name]):
            del kw[name]
        elif name not in ("max_tokens", "min_tokens", "pooling") and g.chance(0.3):
            del kw[name]  # also leave some fields out altogether
    return SamplingParams(**kw)


def _logprobs(g: Gen) -> P.TokenLogprobs:
    n = g.rng.randrange(6)
    return P.TokenLogprobs(
        g.u32(), g.f64(), g.i64(), [g.u32() for _ in range(n)], [g.f64() for _ in range(n)]
    )


def _output(g: Gen) -> P.EngineCoreOutput:
    r = g.rng
    return P.EngineCoreOutput(
        request_id=g.string(),
        new_token_ids=g.list_of(g.u32, huge=True),
        new_logprobs=g.maybe(lambda: g.list_of(lambda: _logprobs(g), 4), 0.3),
        finish_reason=g.maybe(lambda: r.choice(list(P.FinishReason)), 0.3),
        stop_reason=r.choice([None, None, g.i64(), g.string()]),
        num_cached_tokens=g.i64() if g.chance(0.3) else 0,
        phase_times=g.maybe(lambda: P.RequestPhaseTimes(g.f64(), g.f64(), g.f64()), 0.3),
        prompt_logprobs=g.maybe(lambda: g.list_of(lambda: _logprobs(g), 4), 0.2),
        embedding=r.randbytes(g.size(300)) if g.chance(0.2) else b"",
    )


def _stats(g: Gen) -> P.SchedulerStats:
    ints = {f.name: g.i64() for f in msgspec.structs.fields(P.SchedulerStats) if f.type is int}
    return P.SchedulerStats(
        kv_cache_usage=g.f64(), iteration_tokens_counts=g.list_of(g.i64, huge=True), **ints
    )


def _kv(g: Gen) -> P.KVCacheStatus:
    return P.KVCacheStatus(g.i64(), g.i64(), g.i64(), g.rng.choice(["ok", g.string()]))


def _outputs(g: Gen) -> P.EngineCoreOutputs:
    return P.EngineCoreOutputs(
        engine_index=g.i64(),
        outputs=g.list_of(lambda: _output(g), 6),
        scheduler_stats=g.maybe(lambda: _stats(g), 0.3),
        timestamp=g.f64(),
        utility_output=g.maybe(lambda: _utility_output(g), 0.2),
    )


def _utility_output(g: Gen) -> P.UtilityOutput:
    return P.UtilityOutput(g.i64(), g.maybe(lambda: _kv(g)), g.string())


def _request(g: Gen) -> P.EngineCoreRequest:
    return P.EngineCoreRequest(
        g.string(),
        g.list_of(g.u32, 40, huge=True),
        _sampling(g),
        g.maybe(g.u32),
        g.f64(),
        g.i64(),
        g.chance(),
    )


GENERATORS: dict[str, Callable[[Gen], Any]] = {
    "EngineCoreRequest": _request,
    "SamplingParams": _sampling,
    "StructuredOutputsParams": _structured,
    "EngineCoreOutputs": _outputs,
    "EngineCoreOutput": _output,
    "TokenLogprobs": _logprobs,
    "RequestPhaseTimes": lambda g: P.RequestPhaseTimes(g.f64(), g.f64(), g.f64()),
    "SchedulerStats": _stats,
    "KVCacheStatus": _kv,
    "UtilityRequest": lambda g: P.UtilityRequest(g.i64(), g.string(), g.i64()),
    "UtilityOutput": _utility_output,
    "EngineDead": lambda g: P.EngineDead(g.i64(), g.string()),
    "EngineReady": lambda g: P.EngineReady(
        g.i64(), g.i64(), g.i64(), g.i64(), g.string(), g.i64(), g.i64()
    ),
    "AbortRequest": lambda g: P.AbortRequest(g.list_of(g.string)),
    "EngineLoad": lambda g: P.EngineLoad(g.i64(), g.i64(), g.i64(), g.f64()),
    "DPStats": lambda g: P.DPStats([(g.i64(), g.i64()) for _ in range(g.size(10))], g.f64()),
}
PY_TYPES: dict[str, type] = {
    "EngineCoreRequest": P.EngineCoreRequest,
    "SamplingParams": SamplingParams,
    "StructuredOutputsParams": StructuredOutputsParams,
    "EngineCoreOutputs": P.EngineCoreOutputs,
    "EngineCoreOutput": P.EngineCoreOutput,
    "TokenLogprobs": P.TokenLogprobs,
    "RequestPhaseTimes": P.RequestPhaseTimes,
    "SchedulerStats": P.SchedulerStats,
    "KVCacheStatus": P.KVCacheStatus,
    "UtilityRequest": P.UtilityRequest,
    "UtilityOutput": P.UtilityOutput,
    "EngineDead": P.EngineDead,
    "EngineReady": P.EngineReady,
    "AbortRequest": P.AbortRequest,
    "EngineLoad": P.EngineLoad,
    "DPStats": P.DPStats,
}
TYPE_NAMES = list(GENERATORS)


def short(value: Any) -> str:
    """A repr short enough for an assertion message."""
    text = repr(value)
    return text if len(text) < 400 else text[:400] + f"... ({len(text)} chars)"


def instances(type_name: str, count: int = INSTANCES_PER_TYPE) -> list[Any]:
    g = Gen(seed=sum(map(ord, type_name)))
    return [GENERATORS[type_name](g) for _ in range(count)]


def describe(value: Any) -> Any:
    """The tool's JSON description of a msgspec.to_builtins value (see the tool's header)."""
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return {"float": struct.pack(">d", value).hex()}
    if isinstance(value, bytes):
        return {"bin": value.hex()}
    if isinstance(value, (list, tuple)):
        return [describe(v) for v in value]
    if isinstance(value, dict):
        return {"map": [[describe(k), describe(v)] for k, v in value.items()]}
    raise TypeError(f"cannot describe {type(value).__name__}")


def same_value(a: Any, b: Any) -> bool:
    """Equality of two messages' contents, field by field, with NaN equal to NaN (and -0.0
    not equal to 0.0)."""
    if isinstance(a, msgspec.Struct):
        if type(a) is not type(b):
            return False
        return all(same_value(getattr(a, f), getattr(b, f)) for f in a.__struct_fields__)
    if isinstance(a, float) and isinstance(b, float):
        return bits_equal(a, b) or (math.isnan(a) and math.isnan(b))
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same_value, a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(same_value(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def canonical(value: Any) -> Any:
    """`value` as Rust re-encodes it: in every SamplingParams, a float field bit-equal to its
    default becomes the default object (msgspec omits by identity) and logit_bias is sorted."""
    if isinstance(value, SamplingParams):
        for field in msgspec.structs.fields(SamplingParams):
            current = getattr(value, field.name)
            is_float = isinstance(field.default, float) and isinstance(current, float)
            if is_float and bits_equal(current, field.default):
                setattr(value, field.name, field.default)
        if value.logit_bias is not None:
            value.logit_bias = dict(sorted(value.logit_bias.items()))
    elif isinstance(value, P.EngineCoreRequest):
        canonical(value.sampling_params)
    return value


# --- round trips -----------------------------------------------------------------------------


@pytest.mark.parametrize("type_name", TYPE_NAMES)
def test_python_encoded_frames_reencode_byte_identical(tool: WireTool, type_name: str) -> None:
    """msgspec encode -> Rust decode + encode -> the same bytes, for every instance."""
    for obj in instances(type_name):
        frame = msgspec.msgpack.encode(obj)
        ok, out = tool.reencode(type_name, frame)
        assert ok, f"Rust rejected a valid {type_name}: {out.decode()}\n{short(obj)}"
        assert out == frame, (
            f"{type_name} re-encoded differently:\n{short(obj)}\n{short(frame)}\n{short(out)}"
        )


@pytest.mark.parametrize("type_name", TYPE_NAMES)
def test_rust_encoded_frames_decode_equal_in_python(tool: WireTool, type_name: str) -> None:
    """JSON description -> (longest msgpack forms) -> Rust struct -> Rust encode: msgspec's
    bytes exactly, and msgspec decodes them to an equal object."""
    for obj in instances(type_name, INSTANCES_PER_TYPE // 2):
        desc = describe(msgspec.to_builtins(obj, builtin_types=(bytes,), str_keys=False))
        ok, out = tool.call(b"J", type_name, json.dumps(desc).encode())
        assert ok, f"Rust rejected {type_name} {short(obj)}: {out.decode()}"
        assert out == msgspec.msgpack.encode(obj), f"{type_name}: {short(obj)}"
        decoded: Any = msgspec.msgpack.decode(out, type=PY_TYPES[type_name])
        assert same_value(decoded, obj), f"{type_name}: {short(decoded)} != {short(obj)}"


@pytest.mark.parametrize("size", [0, 15, 16, 31, 32, 255, 256, 65535, 65536])
def test_every_header_form(tool: WireTool, size: int) -> None:
    """fixarray/array16/array32, fixstr/str8/16/32 and bin8/16/32 at each boundary, both ways."""
    obj = P.EngineCoreOutput(
        request_id="é" * (size // 2) + "a" * (size % 2),  # `size` bytes of UTF-8
        new_token_ids=[size] * size,
        stop_reason="s" * size,
        embedding=b"\xff" * size,
    )
    frame = msgspec.msgpack.encode(obj)
    assert tool.reencode("EngineCoreOutput", frame) == (True, frame)
    desc = describe(msgspec.to_builtins(obj, builtin_types=(bytes,)))
    assert tool.call(b"J", "EngineCoreOutput", json.dumps(desc).encode()) == (True, frame)


def test_python_edge_forms_decode(tool: WireTool) -> None:
    """Forms msgspec never writes but accepts: ints for floats, float32, missing trailing
    fields, extra trailing fields (skipped, whatever they hold), unknown and repeated map keys."""
    cases = [
        ("EngineLoad", msgspec.msgpack.encode([1, 2, 3, 4])),
        ("EngineLoad", msgspec.msgpack.encode([1, 2, 3, 2**64 - 1])),
        ("EngineLoad", msgspec.msgpack.encode([1, 2, 3])),
        ("RequestPhaseTimes", b"\x93\xca\x3f\x80\x00\x00\x01\x02"),
        ("EngineDead", msgspec.msgpack.encode([7])),
        ("EngineDead", b"\x94\x07\xa1x\xa1\xff\xd4\x01\x02"),
        ("EngineCoreOutputs", msgspec.msgpack.encode([])),
        ("EngineCoreOutput", msgspec.msgpack.encode(["r", [1, 2]])),
        ("SamplingParams", msgspec.msgpack.encode({"n": 2, "zz": [1, {"a": None}], "n ": 1})),
        ("SamplingParams", b"\x82\xa1n\x02\xa1n\x03"),
        ("SamplingParams", msgspec.msgpack.encode({"top_k": -1, "temperature": 1.0})),
        ("SamplingParams", msgspec.msgpack.encode({"logit_bias": {9: 1, 2: -3.5, 5: 0.0}})),
        ("TokenLogprobs", msgspec.msgpack.encode([1, 2.0, 3])),
    ]
    for type_name, frame in cases:
        ok, out = tool.reencode(type_name, frame)
        assert ok, f"{type_name} {frame!r}: {out.decode()}"
        expected = canonical(msgspec.msgpack.decode(frame, type=PY_TYPES[type_name]))
        assert out == msgspec.msgpack.encode(expected), f"{type_name} {short(frame)}"


CHECK_VALUES: dict[str, list[Any]] = {
    "n": [1, 0, -1, 5],
    "temperature": [0.0, -0.0, -1e-9, 0.7, math.nan, math.inf],
    "top_p": [1.0, 0.0, 1.0000001, 0.5, math.nan],
    "top_k": [-1, -2, 0, 40],
    "min_p": [0.0, 1.0, -0.1, 1.5, math.nan],
    "max_tokens": [None, -1, 0, 5, 16],
    "min_tokens": [0, -1, 3, 20],
    "stop": [[], ["a"], ["a", ""]],
    "logprobs": [None, -1, 0, 20, 21],
    "presence_penalty": [0.0, -2.0, 2.0, 2.5, math.nan],
    "frequency_penalty": [0.0, -2.1, 1.0],
    "repetition_penalty": [1.0, 0.0, -1.0, 1e-9],
    "logit_bias": [None, {}, {1: 100.0, 2: -100.0}, {1: 100.5}, {-1: 0.0}, {3: math.nan}],
    "allowed_token_ids": [None, [], [0, 5], [-1]],
    "bad_words": [[], ["x"], [""]],
    "prompt_logprobs": [None, 0, 20, 21, -1],
    "pooling": [None, "mean", "last", "max"],
}


def test_sampling_params_check_matches_post_init(tool: WireTool) -> None:
    """SamplingParams::check accepts what __post_init__ accepts and words its first failure
    the same way (a front end's 400 message)."""
    rng = random.Random(7)
    failures = 0
    for _ in range(3000):
        names = rng.sample(sorted(CHECK_VALUES), rng.randrange(1, 5))
        kwargs = {name: rng.choice(CHECK_VALUES[name]) for name in names}
        frame = msgspec.msgpack.encode(kwargs)
        py_ok, py = python_decode("SamplingParams", frame)
        ok, out = tool.call(b"V", "SamplingParams", frame)
        assert ok == py_ok, f"{kwargs}: Python {py!r}, Rust {out!r}"
        if not ok:
            failures += 1
            assert out.decode() == str(py), kwargs
    assert 500 < failures < 2500, failures  # both outcomes were exercised


def test_engine_dead_frames(tool: WireTool) -> None:
    for frame in (P.engine_dead_frame(3, "oom"), P.engine_dead_frame(0), P.ENGINE_CORE_DEAD):
        assert tool.reencode("EngineDeadFrame", frame) == (True, frame)
    for bad in (b"ENGINE_CORE_DEA", b"ENGINE_CORE_DEAD\x92", b"XNGINE_CORE_DEAD\x91\x00", b""):
        ok, _ = tool.reencode("EngineDeadFrame", bad)
        assert not ok, bad


def test_rust_is_stricter_on_int_ranges(tool: WireTool) -> None:
    """Python ints are unbounded; the Rust types are i64 / u32: out-of-range values are a
    DecodeError there (documented in docs/wire-protocol.md)."""
    for type_name, frame in [
        ("EngineDead", msgspec.msgpack.encode([2**64 - 1])),
        ("EngineCoreOutput", msgspec.msgpack.encode(["r", [-1]])),
        ("EngineCoreOutput", msgspec.msgpack.encode(["r", [2**32]])),
        ("EngineCoreOutput", msgspec.msgpack.encode(["r", [], None, None, 2**63])),
    ]:
        msgspec.msgpack.decode(frame, type=PY_TYPES[type_name])  # Python accepts it
        ok, out = tool.reencode(type_name, frame)
        assert not ok and b"out of range" in out, (type_name, frame, out)


# --- malformed frames ------------------------------------------------------------------------

# msgspec's own ValueErrors, as opposed to the value checks of SamplingParams.__post_init__
# (`name: must ...`), which the Rust decoder leaves to the engine.
POST_INIT_ERROR = re.compile(r"^\w+: (must|biases|negative)")
FORGED = [b"\xdd\xff\xff\xff\xff", b"\xdb\xff\xff\xff\xff", b"\xc6\xff\xff\xff\xff",
          b"\xdf\xff\xff\xff\xff", b"\xdc\xff\xff", b"\xc1", b"\xc0", b"\xd4\x00\x00"]  # fmt: skip


def mutate(rng: random.Random, frame: bytes) -> bytes:
    """One random corruption of `frame`."""
    data = bytearray(frame)
    op = rng.randrange(7)
    at = rng.randrange(len(data) + 1)
    if op == 0 and data:
        data[min(at, len(data) - 1)] = rng.randrange(256)
    elif op == 1:
        del data[at:]
    elif op == 2:
        data[at:at] = rng.randbytes(rng.randrange(1, 6))
    elif op == 3 and data:
        del data[at : at + rng.randrange(1, 6)]
    elif op == 4:
        data[at:at] = rng.choice(FORGED)
    elif op == 5 and data:
        data[min(at, len(data) - 1)] ^= 1 << rng.randrange(8)
    else:
        data = bytearray(rng.randbytes(rng.randrange(40)))
    return bytes(data)


def python_decode(type_name: str, frame: bytes) -> tuple[bool, Any]:
    try:
        return True, msgspec.msgpack.decode(frame, type=PY_TYPES[type_name])
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError, RecursionError) as e:
        return False, e


@pytest.mark.parametrize("type_name", TYPE_NAMES)
def test_mutated_frames_agree_with_msgspec(tool: WireTool, type_name: str) -> None:
    """Thousands of corrupted frames: the tool answers each; Rust accepts exactly what msgspec
    accepts (bar the documented int-range and __post_init__ differences) and re-encodes
    what both accept to msgspec's bytes."""
    rng = random.Random(f"fuzz-{type_name}")
    valid = [msgspec.msgpack.encode(o) for o in instances(type_name, 60)]
    accepted = 0
    for _ in range(FUZZ_FRAMES_PER_TYPE):
        frame = mutate(rng, rng.choice(valid))
        if rng.random() < 0.3:
            frame = mutate(rng, frame)
        rust_ok, out = tool.reencode(type_name, frame)
        py_ok, py = python_decode(type_name, frame)
        if rust_ok and py_ok:
            accepted += 1
            assert out == msgspec.msgpack.encode(canonical(py)), f"{type_name} {short(frame)}"
        elif py_ok:
            assert b"out of range for" in out and b"(Rust)" in out, (
                f"Rust rejected {short(frame)}: {out.decode()}"
            )
        elif rust_ok:
            assert isinstance(py, RecursionError) or POST_INIT_ERROR.match(str(py)), (
                f"Rust accepted {type_name} {short(frame)} that msgspec rejects: {py}"
            )
    assert accepted > 0 or type_name == "RequestPhaseTimes", "the fuzz never made a valid frame"


def test_random_garbage_and_forged_lengths_get_error_replies(tool: WireTool) -> None:
    rng = random.Random(20)
    for i in range(3000):
        type_name = TYPE_NAMES[i % len(TYPE_NAMES)]
        frame = rng.choice(FORGED) + rng.randbytes(rng.randrange(30))
        ok, out = tool.reencode(type_name, frame)
        assert ok == python_decode(type_name, frame)[0] or b"out of range" in out, frame
    # 4-GB claims where such a value belongs: an error, and nothing of that size allocated.
    for type_name, frame in [
        ("EngineCoreOutputs", b"\x95\x00\xdd\xff\xff\xff\xff\x92\xa0\x90"),
        ("EngineDead", b"\x92\x01\xdb\xff\xff\xff\xffabc"),
        ("EngineCoreOutput", b"\x99\xa0\x90\xc0\xc0\xc0\x00\xc0\xc0\xc6\xff\xff\xff\xff"),
        ("SamplingParams", b"\x81\xaalogit_bias\xdf\xff\xff\xff\xff\x01"),
        ("EngineDead", b"\xdd\xff\xff\xff\xff\x01\xa0\xdd\xff\xff\xff\xff"),
    ]:
        ok, out = tool.reencode(type_name, frame)
        assert not ok and b"truncated" in out, (type_name, out)
    assert tool.call(b"X", "EngineDead", b"") == (False, b"unknown mode 0x58")
    ok, _ = tool.call(b"J", "EngineDead", b"{not json")
    assert not ok
    # A payload over the tool's 64-MiB limit is skipped, not buffered, and answered.
    ok, out = tool.reencode("EngineDead", bytes(64 * 2**20 + 1))
    assert (ok, out) == (False, b"payload of 67108865 bytes is over the limit")
    # still answering
    assert tool.reencode("EngineDead", b"\x92\x01\xa0") == (True, b"\x92\x01\xa0")
