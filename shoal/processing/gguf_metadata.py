"""A fast reader of a GGUF file's key-value metadata (the header only, never the tensors)."""

from __future__ import annotations

import mmap
import struct
from typing import Any

GGUF_MAGIC = b"GGUF"

# GGUF value type -> struct format of one scalar (types 8 = string and 9 = array aside).
_SCALAR_FORMATS: dict[int, str] = {
    0: "<B",  # UINT8
    1: "<b",  # INT8
    2: "<H",  # UINT16
    3: "<h",  # INT16
    4: "<I",  # UINT32
    5: "<i",  # INT32
    6: "<f",  # FLOAT32
    7: "<?",  # BOOL
    10: "<Q",  # UINT64
    11: "<q",  # INT64
    12: "<d",  # FLOAT64
}
_STRING = 8
_ARRAY = 9


class _Cursor:
    """Sequential little-endian decoding over the mapped header."""

    def __init__(self, buf: mmap.mmap) -> None:
        self.buf = buf
        self.pos = 0

    def scalar(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        (length,) = struct.unpack_from("<Q", self.buf, self.pos)
        start = self.pos + 8
        self.pos = start + length
        return self.buf[start : self.pos].decode("utf-8", errors="replace")

    def strings(self, count: int) -> list[str]:
        # The hot loop: ~50k vocabulary entries and ~50k merges in a typical file.
        buf, pos = self.buf, self.pos
        out: list[str] = []
        unpack = struct.Struct("<Q").unpack_from
        append = out.append
        for _ in range(count):
            (length,) = unpack(buf, pos)
            pos += 8
            append(buf[pos : pos + length].decode("utf-8", errors="replace"))
            pos += length
        self.pos = pos
        return out

    def value(self, value_type: int) -> Any:
        if value_type == _STRING:
            return self.string()
        if value_type == _ARRAY:
            item_type = self.scalar("<I")
            count = self.scalar("<Q")
            if item_type == _STRING:
                return self.strings(count)
            if item_type in _SCALAR_FORMATS:
                fmt = _SCALAR_FORMATS[item_type]
                values = list(struct.unpack_from(f"<{count}{fmt[1]}", self.buf, self.pos))
                self.pos += count * struct.calcsize(fmt)
                return values
            return [self.value(item_type) for _ in range(count)]
        if value_type not in _SCALAR_FORMATS:
            raise ValueError(f"unknown GGUF value type {value_type} at offset {self.pos}")
        return self.scalar(_SCALAR_FORMATS[value_type])


def read_gguf_metadata(path: str) -> dict[str, Any]:
    """Every key-value pair of the GGUF file at `path` (tokenizer arrays included).

    Stops at the end of the key-value section, so it costs tens of milliseconds whatever the
    size of the weights. `ValueError` if the file is not GGUF (version 2 or 3)."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != GGUF_MAGIC:
            raise ValueError(f"{path!r} is not a GGUF file (bad magic {buf[:4]!r})")
        cursor = _Cursor(buf)
        cursor.pos = 4
        version = cursor.scalar("<I")
        if version not in (2, 3):
            raise ValueError(f"{path!r}: unsupported GGUF version {version}")
        cursor.scalar("<Q")  # tensor count: the tensors are not read here
        num_kv = cursor.scalar("<Q")
        metadata: dict[str, Any] = {}
        for _ in range(num_kv):
            key = cursor.string()
            metadata[key] = cursor.value(cursor.scalar("<I"))
        return metadata
