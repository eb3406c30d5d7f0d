"""A fast GGUF index: metadata scalars, array lengths and tensor locations (no torch).

`gguf.GGUFReader` builds a numpy view for every element of the tokenizer arrays (about 150k
strings in a typical file), which costs seconds; the model loader needs none of those, so
this reader skips them and maps the tensor data lazily.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

GGUF_MAGIC = b"GGUF"
_DEFAULT_ALIGNMENT = 32

# GGUF value type -> struct format of one scalar (8 = string and 9 = array handled apart).
_SCALARS: dict[int, str] = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i",
    6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d",
}  # fmt: skip
_STRING = 8
_ARRAY = 9


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    # Row-major shape as numpy sees it: GGUF's `ne` reversed, e.g. [out_features, in_features].
    shape: tuple[int, ...]
    qtype: GGMLQuantizationType
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def byte_shape(self) -> tuple[int, ...]:
        """Shape of the raw bytes: the last dimension counts bytes of whole quant blocks."""
        block_size, type_size = GGML_QUANT_SIZES[self.qtype]
        return (*self.shape[:-1], self.shape[-1] // block_size * type_size)


class GGUFFile:
    """One GGUF file: `metadata` (scalars and strings), `array_lengths` (arrays are skipped,
    only their lengths kept) and `tensors` (name -> `GGUFTensorInfo`), in file order.

    `raw(name)` returns the tensor's bytes as a read-only uint8 array over a memory map."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._data = np.memmap(path, dtype=np.uint8, mode="r")
        if bytes(self._data[:4]) != GGUF_MAGIC:
            raise ValueError(f"{path!r} is not a GGUF file (bad magic {bytes(self._data[:4])!r})")
        self.metadata: dict[str, Any] = {}
        self.array_lengths: dict[str, int] = {}
        self.tensors: dict[str, GGUFTensorInfo] = {}
        self._parse(memoryview(self._data))  # type: ignore[arg-type]

    def raw(self, name: str) -> np.ndarray:
        """The bytes of tensor `name`, shaped `byte_shape` (a view into the memory map)."""
        info = self.tensors[name]
        flat = self._data[info.offset : info.offset + info.nbytes]
        if info.qtype == GGMLQuantizationType.F32:
            return flat.view(np.float32).reshape(info.shape)
        if info.qtype == GGMLQuantizationType.F16:
            return flat.view(np.float16).reshape(info.shape)
        return flat.reshape(info.byte_shape)

    def _parse(self, buf: memoryview) -> None:
        pos = 4
        (version,) = struct.unpack_from("<I", buf, pos)
        if version not in (2, 3):
            raise ValueError(f"{self.path!r}: unsupported GGUF version {version}")
        num_tensors, num_kv = struct.unpack_from("<QQ", buf, pos + 4)
        pos += 20
        for _ in range(num_kv):
            key, pos = _string(buf, pos)
            (value_type,) = struct.unpack_from("<I", buf, pos)
            pos = self._read_value(buf, pos + 4, key, value_type)
        infos = []
        for _ in range(num_tensors):
            name, pos = _string(buf, pos)
            (n_dims,) = struct.unpack_from("<I", buf, pos)
            dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
            qtype, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
            pos += 4 + 8 * n_dims + 12
            infos.append((name, tuple(reversed(dims)), GGMLQuantizationType(qtype), offset))
        alignment = int(self.metadata.get("general.alignment", _DEFAULT_ALIGNMENT))
        data_start = -(-pos // alignment) * alignment
        for name, shape, qtype, offset in infos:
            block_size, type_size = GGML_QUANT_SIZES[qtype]
            nbytes = int(np.prod(shape)) // block_size * type_size
            self.tensors[name] = GGUFTensorInfo(name, shape, qtype, data_start + offset, nbytes)

    def _read_value(self, buf: memoryview, pos: int, key: str, value_type: int) -> int:
        if value_type == _STRING:
            self.metadata[key], pos = _string(buf, pos)
            return pos
        if value_type == _ARRAY:
            item_type, count = struct.unpack_from("<IQ", buf, pos)
            self.array_lengths[key] = count
            return _skip_array(buf, pos + 12, item_type, count)
        if value_type not in _SCALARS:
            raise ValueError(f"{self.path!r}: unknown GGUF value type {value_type} for {key!r}")
        (self.metadata[key],) = struct.unpack_from(_SCALARS[value_type], buf, pos)
        return pos + struct.calcsize(_SCALARS[value_type])


def _string(buf: memoryview, pos: int) -> tuple[str, int]:
    (length,) = struct.unpack_from("<Q", buf, pos)
    start = pos + 8
    return bytes(buf[start : start + length]).decode("utf-8", errors="replace"), start + length


def _skip_array(buf: memoryview, pos: int, item_type: int, count: int) -> int:
    if item_type in _SCALARS:
        return pos + count * struct.calcsize(_SCALARS[item_type])
    if item_type == _STRING:
        unpack = struct.Struct("<Q").unpack_from
        for _ in range(count):
            pos += 8 + unpack(buf, pos)[0]
        return pos
    if item_type == _ARRAY:
        for _ in range(count):
            inner_type, inner_count = struct.unpack_from("<IQ", buf, pos)
            pos = _skip_array(buf, pos + 12, inner_type, inner_count)
        return pos
    raise ValueError(f"unknown GGUF array item type {item_type}")
