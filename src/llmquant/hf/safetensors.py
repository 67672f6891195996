"""Bounds-checked safetensors reader: tensors memory-mapped one at a time, no torch.

Layout (https://github.com/huggingface/safetensors): an 8-byte little-endian header length N, N
bytes of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``,
then the data; offsets are relative to the end of the header. Every value is checked against the
file size before use (STYLE.md rule 11). Each tensor is mapped only while it is read, so the
pages it touched leave the process with it: peak memory stays about one tensor.

A sharded checkpoint is ``model.safetensors.index.json`` (``{"weight_map": {name: file}}``) plus
the files it names; as convert_hf_to_gguf.py, the shards are read in sorted file order and the
tensors of each file in name order.
"""

from __future__ import annotations

import json
import math
import mmap
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ModelFileError

MAX_HEADER_BYTES = 100 << 20  # safetensors itself refuses headers above 100 MB

# dtype -> (bytes per element, numpy dtype of the stored bits)
DTYPES: dict[str, tuple[int, str]] = {
    "F64": (8, "<f8"), "F32": (4, "<f4"), "F16": (2, "<f2"), "BF16": (2, "<u2"),
    "I64": (8, "<i8"), "I32": (4, "<i4"), "I16": (2, "<i2"), "I8": (1, "i1"), "U8": (1, "u1"), "BOOL": (1, "u1"),
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


@dataclass(frozen=True)
class SafetensorsEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]  # numpy order, as stored
    path: Path
    offset: int  # absolute file offset
    n_bytes: int

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


def parse_safetensors(path: str | Path) -> list[SafetensorsEntry]:
    """The tensor table of one file, sorted by name, or ModelFileError naming what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(path, "no such file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        n = _header_length(path, f.read(8), size)
        raw = f.read(n)
    return _tensor_table(path, raw, size)


def parse_safetensors_buffer(buf: bytes, path: object = "<bytes>") -> list[SafetensorsEntry]:
    """The same for a whole file held in memory (``path`` names it in errors)."""
    size = len(buf)
    n = _header_length(path, bytes(buf[:8]), size)
    return _tensor_table(path, bytes(buf[8:8 + n]), size)


def _header_length(path, first: bytes, size: int) -> int:
    if size < 8:
        raise ModelFileError(path, f"not a safetensors file: only {size} bytes")
    n = int.from_bytes(first, "little")
    if n > size - 8:
        raise ModelFileError(path, f"corrupt safetensors header: it claims {n} bytes but the file has only {size - 8} after the length")
    if n > MAX_HEADER_BYTES:
        raise ModelFileError(path, f"corrupt safetensors header: {n} bytes is more than the {MAX_HEADER_BYTES} allowed")
    return n


def _tensor_table(path, raw: bytes, size: int) -> list[SafetensorsEntry]:
    try:
        header = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ModelFileError(path, f"corrupt safetensors header: not UTF-8 ({exc})") from None
    except RecursionError:  # json nests one Python frame per level
        raise ModelFileError(path, "corrupt safetensors header: JSON nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, or an integer of more than 4300 digits
        raise ModelFileError(path, f"corrupt safetensors header: not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ModelFileError(path, "corrupt safetensors header: expected a JSON object")
    data_start = 8 + len(raw)
    data_size = size - data_start
    entries = []
    spans = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        where = f"tensor {_short(name)}"
        if not isinstance(meta, dict):
            raise ModelFileError(path, f"corrupt safetensors header: {where} is not an object")
        dtype, shape, offsets = meta.get("dtype"), meta.get("shape"), meta.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            known = ", ".join(DTYPES)
            raise ModelFileError(path, f"{where} has dtype {_short(dtype)}; llmquant reads {known}")
        if not (isinstance(shape, list) and len(shape) <= 8
                and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 40 for d in shape)):
            raise ModelFileError(path, f"corrupt safetensors header: {where} has shape {_short(shape)}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise ModelFileError(path, f"corrupt safetensors header: {where} has data_offsets {_short(offsets)}")
        begin, end = offsets
        if not 0 <= begin <= end:
            raise ModelFileError(path, f"corrupt safetensors header: {where} has data_offsets {_short(offsets)}")
        if end > data_size:
            raise ModelFileError(path, f"truncated: {where} ends at data byte {end} but the file holds only {data_size} data bytes")
        expected = math.prod(shape) * DTYPES[dtype][0]  # exact (numpy's int64 product could wrap)
        if end - begin != expected:
            raise ModelFileError(
                path, f"corrupt safetensors header: {where} {dtype}{shape} needs {expected} bytes but data_offsets span {end - begin}"
            )
        spans.append((begin, end, name))
        entries.append(SafetensorsEntry(name, dtype, tuple(shape), path, data_start + begin, end - begin))
    spans.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise ModelFileError(path, f"corrupt safetensors header: tensors {n0!r} and {n1!r} overlap")
    return sorted(entries, key=lambda e: e.name)


def _short(value: object) -> str:
    """repr() cut to one readable line (a hostile header can put megabytes in one field)."""
    try:
        text = repr(value)
    except RecursionError:
        return f"<{type(value).__name__} nested too deeply>"
    return text if len(text) <= 80 else text[:77] + "..."


_SLICE_BYTES = 8 << 20  # source bytes mapped in at a time


def read_float32(entry: SafetensorsEntry, permute_heads: int | None = None) -> np.ndarray:
    """One tensor as float32 in its stored shape (BF16 widened by a 16-bit shift, exactly).

    ``permute_heads=n`` applies llama.cpp's rotary row order for ``n`` heads on the way (see
    ``hf_source.permute_qk``) so that the float32 copy is the only allocation. The source is
    memory-mapped and copied a slice at a time; each slice's pages are dropped from the mapping
    once copied, so they never add up to a second copy of the tensor in this process."""
    if entry.dtype not in FLOAT_DTYPES:
        raise ModelFileError(entry.path, f"tensor {entry.name!r} is {entry.dtype}, not a floating-point type")
    size, stored = DTYPES[entry.dtype]
    shape = entry.shape or (1,)
    out = np.empty(shape, dtype=np.uint32 if entry.dtype == "BF16" else np.float32)
    if entry.n_bytes == 0:
        return out.view(np.float32).reshape(entry.shape)
    # groups of rows that are contiguous in the file and map to contiguous output rows
    if permute_heads:
        n_groups = permute_heads
        dst = out.reshape(permute_heads, shape[0] // permute_heads // 2, 2, *shape[1:])
    else:
        n_groups = shape[0] if len(shape) > 1 else 1
        dst = out.reshape(n_groups, -1)
    group_bytes = entry.n_bytes // n_groups
    per_slice = max(1, _SLICE_BYTES // max(group_bytes, 1))
    start = entry.offset - entry.offset % mmap.ALLOCATIONGRANULARITY
    with open(entry.path, "rb") as f:
        mm = mmap.mmap(f.fileno(), entry.offset + entry.n_bytes - start, offset=start, access=mmap.ACCESS_READ)
    try:
        src = np.frombuffer(mm, dtype=stored, count=entry.n_elements, offset=entry.offset - start)
        if permute_heads:
            src = src.reshape(permute_heads, 2, shape[0] // permute_heads // 2, *shape[1:])
        else:
            src = src.reshape(n_groups, -1)
        for g in range(0, n_groups, per_slice):
            part = src[g:g + per_slice]
            dst[g:g + per_slice] = part.swapaxes(1, 2) if permute_heads else part
            lo = entry.offset - start + g * group_bytes
            hi = lo + part.shape[0] * group_bytes
            page = lo - lo % mmap.PAGESIZE
            if hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
                mm.madvise(mmap.MADV_DONTNEED, page, hi - page)
        del src, part
    finally:
        try:
            mm.close()
        except BufferError:  # a view still alive: the mapping goes with it
            pass
    if entry.dtype == "BF16":
        out <<= 16
    return out.view(np.float32).reshape(entry.shape)


@dataclass(frozen=True)
class Checkpoint:
    """All tensors of a model folder, in convert_hf_to_gguf's order."""

    files: list[Path]
    entries: list[SafetensorsEntry]


INDEX_NAME = "model.safetensors.index.json"


def open_checkpoint(folder: Path) -> Checkpoint:
    """``model*.safetensors`` in ``folder`` (through the index when there is one), checked."""
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
            raise ModelFileError(index, f"not a valid index: {exc}") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ModelFileError(index, "has no 'weight_map' object of tensor name -> file name")
        names = sorted(set(weight_map.values()))
        for name in names:
            if Path(name).name != name:
                raise ModelFileError(index, f"names shard {name!r} outside the model folder")
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            tensors = sorted(t for t, f in weight_map.items() if f in missing)
            more = f" and {len(tensors) - 3} more" if len(tensors) > 3 else ""
            raise ModelFileError(
                folder, f"missing shard(s) {', '.join(missing)} listed in {INDEX_NAME} (tensors {', '.join(tensors[:3])}{more})"
            )
        files = [folder / n for n in names]
    else:
        files = sorted(p for p in folder.glob("model*.safetensors") if p.is_file())
        weight_map = None
    entries: list[SafetensorsEntry] = []
    seen: dict[str, Path] = {}
    for f in files:
        for e in parse_safetensors(f):
            if e.name in seen:
                raise ModelFileError(folder, f"tensor {e.name!r} is in both {seen[e.name].name} and {f.name}")
            seen[e.name] = f
            entries.append(e)
    if weight_map is not None:
        absent = sorted(set(weight_map) - set(seen))
        if absent:
            raise ModelFileError(folder, f"{INDEX_NAME} lists tensors that no shard holds: {', '.join(absent[:5])}")
        misplaced = sorted(n for n, f in seen.items() if n in weight_map and weight_map[n] != f.name)
        if misplaced:
            raise ModelFileError(folder, f"{INDEX_NAME} places {misplaced[0]!r} in {weight_map[misplaced[0]]}, but it is in {seen[misplaced[0]].name}")
    return Checkpoint(files, entries)
