"""shoal's one GGUF reader: a file's metadata, its arrays on demand and its tensors' bytes.

Torch-free and numpy-free until a tensor is read: the API server builds its tokenizer from
`all_metadata()`, the model side reads `metadata`, `array_lengths`, `tensors` and `raw()`.

Why not gguf-py's `GGUFReader` (a dependency for its quantization constants and kernels):
on open it builds numpy views of every part of every field, about 100k strings for a
tokenizer, so opening the default model's file takes seconds against about 15 ms here
(docs/performance.md has the figures). This reader records where each array lies, decodes
one only when asked, and indexes the tensors when `tensors` is first read.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    from gguf.constants import GGMLQuantizationType

GGUF_MAGIC = b"GGUF"
_DEFAULT_ALIGNMENT = 32

# GGUF value type -> struct format of one scalar (8 = string and 9 = array handled apart).
_SCALARS: dict[int, str] = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i",
    6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d",
}  # fmt: skip
_STRING = 8
_ARRAY = 9
_U64 = struct.Struct("<Q")


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
        from gguf.constants import GGML_QUANT_SIZES

        block_size, type_size = GGML_QUANT_SIZES[self.qtype]
        return (*self.shape[:-1], self.shape[-1] // block_size * type_size)


@dataclass(frozen=True)
class _ArrayField:
    item_type: int
    count: int
    offset: int  # of the first item


class GGUFFile:
    """One GGUF file (version 2 or 3) over a read-only memory map.

    `metadata`: the scalar and string key-value pairs; `array_lengths`: the length of each
    array-valued key (the arrays themselves are decoded by `array` / `all_metadata`);
    `tensors`: name -> `GGUFTensorInfo` in file order. The map is released with the last
    reference to this object or to an array `raw()` returned. `ValueError` if the file is
    not GGUF or is malformed."""

    def __init__(self, path: str) -> None:
        self.path = path
        with open(path, "rb") as f:
            try:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except ValueError as e:  # an empty file cannot be mapped
                raise ValueError(f"{path!r} is not a GGUF file ({e})") from None
        if self._map[:4] != GGUF_MAGIC:
            raise ValueError(f"{path!r} is not a GGUF file (bad magic {self._map[:4]!r})")
        try:
            self._parse_header()
        except struct.error as e:
            raise ValueError(f"{path!r}: truncated GGUF header ({e})") from None

    @property
    def array_lengths(self) -> dict[str, int]:
        return {key: field.count for key, field in self._arrays.items()}

    def array(self, key: str) -> list[Any]:
        """The decoded items of array-valued `key` (`KeyError` if there is none)."""
        field = self._arrays[key]
        return self._decode_array(field.item_type, field.count, field.offset)[0]

    def all_metadata(self) -> dict[str, Any]:
        """Every key-value pair, arrays decoded, in file order (tens of milliseconds for a
        150k-string tokenizer; the tensors are not read)."""
        values = {**self.metadata, **{key: self.array(key) for key in self._arrays}}
        return {key: values[key] for key in self._keys}

    @cached_property
    def tensors(self) -> dict[str, GGUFTensorInfo]:
        try:
            return self._parse_tensors()
        except struct.error as e:
            raise ValueError(f"{self.path!r}: truncated GGUF tensor index ({e})") from None

    def raw(self, name: str) -> np.ndarray:
        """The data of tensor `name` without a copy: float32 / float16 shaped `shape`, any
        other type as uint8 shaped `byte_shape` (whole quant blocks)."""
        import numpy as np
        from gguf.constants import GGMLQuantizationType

        info = self.tensors[name]
        flat = np.frombuffer(self._map, dtype=np.uint8, count=info.nbytes, offset=info.offset)
        if info.qtype == GGMLQuantizationType.F32:
            return flat.view(np.float32).reshape(info.shape)
        if info.qtype == GGMLQuantizationType.F16:
            return flat.view(np.float16).reshape(info.shape)
        return flat.reshape(info.byte_shape)

    def _parse_tensors(self) -> dict[str, GGUFTensorInfo]:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        buf, pos = self._map, self._tensors_offset
        infos = []
        for _ in range(self._num_tensors):
            name, pos = _string(buf, pos)
            (n_dims,) = struct.unpack_from("<I", buf, pos)
            dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
            qtype, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
            pos += 4 + 8 * n_dims + 12
            infos.append((name, tuple(reversed(dims)), GGMLQuantizationType(qtype), offset))
        alignment = int(self.metadata.get("general.alignment", _DEFAULT_ALIGNMENT))
        data_start = -(-pos // alignment) * alignment  # the tensor data starts aligned
        tensors = {}
        for name, shape, qtype, offset in infos:
            block_size, type_size = GGML_QUANT_SIZES[qtype]
            nbytes = math.prod(shape) // block_size * type_size
            tensors[name] = GGUFTensorInfo(name, shape, qtype, data_start + offset, nbytes)
        return tensors

    def _parse_header(self) -> None:
        buf = self._map
        (version,) = struct.unpack_from("<I", buf, 4)
        if version not in (2, 3):
            raise ValueError(f"{self.path!r}: unsupported GGUF version {version}")
        self._num_tensors, num_kv = struct.unpack_from("<QQ", buf, 8)
        self.metadata: dict[str, Any] = {}
        self._arrays: dict[str, _ArrayField] = {}
        self._keys: list[str] = []
        pos = 24
        for _ in range(num_kv):
            key, pos = _string(buf, pos)
            (value_type,) = struct.unpack_from("<I", buf, pos)
            pos += 4
            self._keys.append(key)
            if value_type == _ARRAY:
                item_type, count = struct.unpack_from("<IQ", buf, pos)
                self._arrays[key] = _ArrayField(item_type, count, pos + 12)
                pos = _skip_array(buf, pos + 12, item_type, count)
            else:
                self.metadata[key], pos = self._decode_value(value_type, pos, key)
        self._tensors_offset = pos

    def _decode_value(self, value_type: int, pos: int, key: str) -> tuple[Any, int]:
        if value_type == _STRING:
            return _string(self._map, pos)
        if value_type == _ARRAY:
            item_type, count = struct.unpack_from("<IQ", self._map, pos)
            return self._decode_array(item_type, count, pos + 12)
        if value_type not in _SCALARS:
            raise ValueError(f"{self.path!r}: unknown GGUF value type {value_type} for {key!r}")
        fmt = _SCALARS[value_type]
        return struct.unpack_from(fmt, self._map, pos)[0], pos + struct.calcsize(fmt)

    def _decode_array(self, item_type: int, count: int, pos: int) -> tuple[list[Any], int]:
        if item_type == _STRING:
            return _strings(self._map, pos, count)
        if item_type in _SCALARS:
            fmt = _SCALARS[item_type]
            values = list(struct.unpack_from(f"<{count}{fmt[1]}", self._map, pos))
            return values, pos + count * struct.calcsize(fmt)
        items = []
        for _ in range(count):
            item, pos = self._decode_value(item_type, pos, "an array item")
            items.append(item)
        return items, pos


def _string(buf: mmap.mmap, pos: int) -> tuple[str, int]:
    (length,) = _U64.unpack_from(buf, pos)
    start = pos + 8
    return buf[start : start + length].decode("utf-8", errors="replace"), start + length


def _strings(buf: mmap.mmap, pos: int, count: int) -> tuple[list[str], int]:
    # The hot loop of a tokenizer: ~50k vocabulary entries and ~50k merges in a typical file.
    unpack = _U64.unpack_from
    out: list[str] = []
    append = out.append
    for _ in range(count):
        (length,) = unpack(buf, pos)
        pos += 8
        append(buf[pos : pos + length].decode("utf-8", errors="replace"))
        pos += length
    return out, pos


def _skip_array(buf: mmap.mmap, pos: int, item_type: int, count: int) -> int:
    if item_type in _SCALARS:
        return pos + count * struct.calcsize(_SCALARS[item_type])
    if item_type == _STRING:
        unpack = _U64.unpack_from
        for _ in range(count):
            pos += 8 + unpack(buf, pos)[0]
        return pos
    if item_type == _ARRAY:
        for _ in range(count):
            inner_type, inner_count = struct.unpack_from("<IQ", buf, pos)
            pos = _skip_array(buf, pos + 12, inner_type, inner_count)
        return pos
    raise ValueError(f"unknown GGUF array item type {item_type}")
