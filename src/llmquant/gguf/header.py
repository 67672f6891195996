"""Bounds-checked GGUF header parser.

gguf-py's GGUFReader believes the counts and lengths it reads (a corrupt header with an absurd
array count makes it loop or allocate without end) and takes ~2 s on a 49k-token vocabulary.
This parser checks every count, length, type, dimension and offset against the file size before
using it (STYLE.md rule 11), raising a ModelFileError that names the offending value, and returns
the metadata and tensor table; tensor data is then memory-mapped. Value and type enums are
gguf-py's. Layout: ggml ``gguf.cpp`` / gguf-py ``gguf_reader.py``.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from ..errors import ModelFileError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
MAX_DIMS = 4
DEFAULT_ALIGNMENT = 32

_SCALAR_SIZES = {
    GGUFValueType.UINT8: 1, GGUFValueType.INT8: 1, GGUFValueType.BOOL: 1,
    GGUFValueType.UINT16: 2, GGUFValueType.INT16: 2,
    GGUFValueType.UINT32: 4, GGUFValueType.INT32: 4, GGUFValueType.FLOAT32: 4,
    GGUFValueType.UINT64: 8, GGUFValueType.INT64: 8, GGUFValueType.FLOAT64: 8,
}
_VALUE_TYPES = {int(t) for t in GGUFValueType}
_NUMPY_TYPES = {
    GGUFValueType.UINT8: "<u1", GGUFValueType.INT8: "<i1", GGUFValueType.BOOL: "<u1",
    GGUFValueType.UINT16: "<u2", GGUFValueType.INT16: "<i2",
    GGUFValueType.UINT32: "<u4", GGUFValueType.INT32: "<i4", GGUFValueType.FLOAT32: "<f4",
    GGUFValueType.UINT64: "<u8", GGUFValueType.INT64: "<i8", GGUFValueType.FLOAT64: "<f8",
}


@dataclass(frozen=True)
class MetadataField:
    key: str
    value: Any
    type: GGUFValueType
    sub_type: GGUFValueType | None = None


@dataclass(frozen=True)
class TensorEntry:
    name: str
    shape: tuple[int, ...]  # ggml order (ne0 first)
    type: GGMLQuantizationType
    n_bytes: int
    offset: int  # absolute file offset of the data


@dataclass(frozen=True)
class GGUFHeader:
    version: int
    alignment: int
    data_start: int
    file_size: int
    fields: dict[str, MetadataField]
    tensors: list[TensorEntry]


class _Cursor:
    def __init__(self, path: Path, buf, size: int):
        self.path, self.buf, self.size, self.pos = path, buf, size, 0

    def fail(self, problem: str) -> ModelFileError:
        return ModelFileError(self.path, f"{problem} (at byte {self.pos}; file has {self.size} bytes)")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"truncated: {what} needs {n} bytes")

    def u32(self, what: str) -> int:
        self.need(4, what)
        (v,) = struct.unpack_from("<I", self.buf, self.pos)
        self.pos += 4
        return v

    def u64(self, what: str) -> int:
        self.need(8, what)
        (v,) = struct.unpack_from("<Q", self.buf, self.pos)
        self.pos += 8
        return v

    def string(self, what: str) -> bytes:
        n = self.u64(f"length of {what}")
        if n > self.size - self.pos:
            raise self.fail(f"{what} claims length {n}, more than the {self.size - self.pos} bytes left")
        s = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return s


def _read_value(cur: _Cursor, vtype: int, key: str, depth: int = 0) -> tuple[Any, GGUFValueType | None]:
    """Returns (python value, array element type or None)."""
    if vtype not in _VALUE_TYPES:
        raise cur.fail(f"metadata {key!r} has unknown value type {vtype}")
    t = GGUFValueType(vtype)
    if t in _SCALAR_SIZES:
        size = _SCALAR_SIZES[t]
        cur.need(size, f"value of {key!r}")
        value = np.frombuffer(cur.buf, dtype=_NUMPY_TYPES[t], count=1, offset=cur.pos)[0].item()
        cur.pos += size
        return (bool(value) if t == GGUFValueType.BOOL else value), None
    if t == GGUFValueType.STRING:
        return cur.string(f"string value of {key!r}").decode("utf-8", "replace"), None
    # array
    if depth > 0:
        raise cur.fail(f"metadata {key!r} is a nested array, which GGUF readers do not support")
    sub = cur.u32(f"array type of {key!r}")
    count = cur.u64(f"array length of {key!r}")
    left = cur.size - cur.pos
    if sub not in _VALUE_TYPES:
        raise cur.fail(f"metadata {key!r} is an array of unknown type {sub}")
    st = GGUFValueType(sub)
    min_size = _SCALAR_SIZES.get(st, 8)  # a string or array element takes at least 8 bytes
    if count * min_size > left:
        raise cur.fail(f"metadata {key!r} claims {count} array elements, more than the {left} bytes left can hold")
    if st in _SCALAR_SIZES:
        values = np.frombuffer(cur.buf, dtype=_NUMPY_TYPES[st], count=count, offset=cur.pos).tolist()
        cur.pos += count * min_size
        if st == GGUFValueType.BOOL:
            values = [bool(v) for v in values]
        return values, st
    if st == GGUFValueType.STRING:
        out = []
        buf, size = cur.buf, cur.size
        unpack = struct.Struct("<Q").unpack_from
        pos = cur.pos
        for _ in range(count):
            if pos + 8 > size:
                cur.pos = pos
                raise cur.fail(f"truncated: string array {key!r}")
            (n,) = unpack(buf, pos)
            pos += 8
            if n > size - pos:
                cur.pos = pos
                raise cur.fail(f"string in array {key!r} claims length {n}, more than the {size - pos} bytes left")
            out.append(bytes(buf[pos:pos + n]).decode("utf-8", "replace"))
            pos += n
        cur.pos = pos
        return out, st
    return [_read_value(cur, sub, key, depth + 1)[0] for _ in range(count)], st


def parse_gguf(path: Path) -> GGUFHeader:
    """Parse and validate the header of ``path``, or raise ModelFileError."""
    path = Path(path)
    if not path.exists():
        raise ModelFileError(path, "no such file")
    if path.is_dir():
        raise ModelFileError(path, "is a folder, expected a .gguf file")
    size = path.stat().st_size
    if size < 24:
        raise ModelFileError(path, f"not a GGUF file: only {size} bytes")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        return parse_gguf_buffer(mm, path)


def parse_gguf_buffer(buf, path: object = "<bytes>") -> GGUFHeader:
    """Parse and validate a GGUF held in ``buf`` (bytes, or a memory map of the whole file);
    ``path`` names it in errors. Raises ModelFileError."""
    size = len(buf)
    if size < 24:
        raise ModelFileError(path, f"not a GGUF file: only {size} bytes")
    if buf[:4] != GGUF_MAGIC:
        raise ModelFileError(path, f"not a GGUF file: magic is {bytes(buf[:4])!r}, expected b'GGUF'")
    cur = _Cursor(path, buf, size)
    cur.pos = 4
    version = cur.u32("version")
    if version not in SUPPORTED_VERSIONS:
        raise ModelFileError(path, f"unsupported GGUF version {version} (supported: 2, 3)")
    n_tensors = cur.u64("tensor count")
    n_kv = cur.u64("metadata count")
    left = size - cur.pos
    # each metadata pair takes >= 8 (key length) + 4 (type) + 1 bytes; each tensor info >= 32
    if n_kv * 13 > left:
        raise ModelFileError(path, f"header claims {n_kv} metadata entries, more than the {left} bytes can hold")
    if n_tensors * 32 > left:
        raise ModelFileError(path, f"header claims {n_tensors} tensors, more than the {left} bytes can hold")
    alignment = DEFAULT_ALIGNMENT
    fields: dict[str, MetadataField] = {}
    for _ in range(n_kv):
        key = cur.string("metadata key").decode("utf-8", "replace")
        vtype = cur.u32(f"value type of {key!r}")
        value, sub = _read_value(cur, vtype, key)
        fields[key] = MetadataField(key, value, GGUFValueType(vtype), sub)
        if key == "general.alignment":
            if vtype != GGUFValueType.UINT32:
                raise ModelFileError(path, "general.alignment must be a uint32")
            alignment = value
            if alignment == 0 or alignment & (alignment - 1):
                raise ModelFileError(path, f"general.alignment is {alignment}, expected a power of two")
    infos = []
    names = set()
    for i in range(n_tensors):
        name = cur.string(f"name of tensor #{i}").decode("utf-8", "replace")
        if name in names:
            raise ModelFileError(path, f"tensor {name!r} appears twice")
        names.add(name)
        n_dims = cur.u32(f"dimension count of {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise ModelFileError(path, f"tensor {name!r} has {n_dims} dimensions, expected 1 to {MAX_DIMS}")
        dims = [cur.u64(f"dimension of {name!r}") for _ in range(n_dims)]
        ttype = cur.u32(f"type of {name!r}")
        offset = cur.u64(f"offset of {name!r}")
        try:
            qtype = GGMLQuantizationType(ttype)
            block_size, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise ModelFileError(path, f"tensor {name!r} has unknown ggml type {ttype}") from None
        n_elements = 1
        for d in dims:
            if d == 0 or d > 1 << 40:
                raise ModelFileError(path, f"tensor {name!r} has absurd dimension {d} in {dims}")
            n_elements *= d
        if n_elements > size * 64:
            raise ModelFileError(path, f"tensor {name!r} claims {n_elements} elements, impossible for a {size}-byte file")
        if dims[0] % block_size:
            raise ModelFileError(path, f"tensor {name!r} row length {dims[0]} is not a multiple of the {qtype.name} block size {block_size}")
        if offset % alignment:
            raise ModelFileError(path, f"tensor {name!r} offset {offset} is not aligned to {alignment}")
        infos.append((name, tuple(dims), qtype, n_elements // block_size * type_size, offset))
    data_start = (cur.pos + alignment - 1) // alignment * alignment
    tensors = []
    for name, dims, qtype, nbytes, offset in infos:
        end = data_start + offset + nbytes
        if end > size:
            raise ModelFileError(
                path, f"truncated: tensor {name!r} ends at byte {end} but the file has only {size} bytes"
            )
        tensors.append(TensorEntry(name, dims, qtype, nbytes, data_start + offset))
    return GGUFHeader(version, alignment, data_start, size, fields, tensors)
