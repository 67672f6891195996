"""GGUF source: metadata plus tensors streamed one at a time as float32.

The header is parsed with every count and offset checked (gguf_header.py); tensor data is
memory-mapped and dequantized lazily with gguf-py (which dequantizes every ggml type), so at
most one tensor's float32 copy exists at a time.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from gguf import GGMLQuantizationType, LlamaFileType
from gguf import quants as gguf_quants

from ..errors import ModelFileError
from ..formats import get_format, registered_types
from .header import GGUFHeader, MetadataField, parse_gguf
from .split import SPLIT_COUNT, SPLIT_NO, SPLIT_TENSORS, other_parts

FLOAT_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order: shape[0] is the row length (ne0)
    type: GGMLQuantizationType
    n_bytes: int

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape))

    @property
    def numpy_shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.shape))


class GGUFSource:
    """An opened GGUF model: ``fields``, ``tensors`` and ``read(name)`` (float32)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.header: GGUFHeader = parse_gguf(self.path)
        self.fields: dict[str, MetadataField] = self.header.fields
        # a split model (gguf-split's NAME-00001-of-0000N.gguf): the first part holds the metadata,
        # every part a run of the tensors; each part's header is parsed and checked the same way
        self.parts: list[Path] = [self.path]
        entries = [(0, t) for t in self.header.tensors]
        n_split = self.get(SPLIT_COUNT, 0)
        if isinstance(n_split, int) and n_split > 1:
            for i, part in enumerate(other_parts(self.path, n_split, int(self.get(SPLIT_NO, 0))), start=1):
                h = parse_gguf(part)
                no = h.fields.get(SPLIT_NO)
                if no is None or no.value != i:
                    raise ModelFileError(part, f"{SPLIT_NO} is {None if no is None else no.value}, expected {i}")
                self.parts.append(part)
                entries += [(i, t) for t in h.tensors]
            total = self.get(SPLIT_TENSORS)
            if total is not None and total != len(entries):
                raise ModelFileError(self.path, f"{SPLIT_TENSORS} is {total}, the {n_split} parts hold {len(entries)} tensors")
        self._entries = {t.name: t for _, t in entries}
        self._part_of = {t.name: i for i, t in entries}
        if len(self._entries) != len(entries):
            raise ModelFileError(self.path, "a tensor name appears in more than one part")
        self.tensors: list[TensorInfo] = [TensorInfo(t.name, t.shape, t.type, t.n_bytes) for _, t in entries]
        self._maps: dict[int, np.ndarray] = {}
        self._mmaps: dict[int, mmap.mmap] = {}
        arch = self.get("general.architecture")
        if not isinstance(arch, str):
            raise ModelFileError(self.path, "metadata general.architecture is missing")
        self.arch: str = arch

    # -- metadata ------------------------------------------------------------------------------
    def get(self, key: str, default: Any = None) -> Any:
        field = self.fields.get(key)
        return default if field is None else field.value

    def arch_get(self, suffix: str, default: Any = None) -> Any:
        """``{arch}.{suffix}``, e.g. ``block_count``."""
        return self.get(f"{self.arch}.{suffix}", default)

    @property
    def file_type(self) -> LlamaFileType | None:
        value = self.get("general.file_type")
        try:
            return LlamaFileType(value) if value is not None else None
        except ValueError:
            return None

    @property
    def file_bytes(self) -> int:
        """Bytes on disk, every part of a split model included."""
        return sum(p.stat().st_size for p in self.parts)

    @property
    def n_params(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    @property
    def tensor_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors)

    @property
    def is_quantized(self) -> bool:
        """True when any 2-D+ weight is stored in a quantized (non-float) type."""
        return any(t.type not in FLOAT_TYPES and len(t.shape) >= 2 for t in self.tensors)

    # -- tensors -------------------------------------------------------------------------------
    def info(self, name: str) -> TensorInfo:
        t = self._entries[name]
        return TensorInfo(t.name, t.shape, t.type, t.n_bytes)

    def raw(self, name: str) -> np.ndarray:
        """The stored bytes of one tensor (uint8, flat, memory-mapped: do not modify)."""
        t = self._entries[name]
        i = self._part_of[name]
        if i not in self._maps:
            with open(self.parts[i], "rb") as f:
                self._mmaps[i] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._maps[i] = np.frombuffer(self._mmaps[i], dtype=np.uint8)
        return self._maps[i][t.offset:t.offset + t.n_bytes]

    def release(self, name: str) -> None:
        """Drop one tensor's mapped pages from this process's resident set once it has been read
        (``madvise(MADV_DONTNEED)``; the pages stay in the page cache and a later read faults them
        back). Without it every page read so far counts in the peak RSS: a whole 16-bit source by
        the end of a quantization, on top of the output being made."""
        i = self._part_of[name]
        mm = self._mmaps.get(i)
        if mm is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        t = self._entries[name]
        start = t.offset - t.offset % mmap.PAGESIZE
        length = min(t.offset + t.n_bytes, len(mm)) - start
        if length > 0:
            try:
                mm.madvise(mmap.MADV_DONTNEED, start, length)
            except (OSError, ValueError):  # advice only: a kernel that refuses it costs memory, not bytes
                pass

    def read(self, name: str) -> np.ndarray:
        """One tensor as float32, numpy order (rows last): shape ``reversed(info.shape)``."""
        t = self._entries[name]
        shape = tuple(reversed(t.shape))
        data = self.raw(name)
        if t.type == GGMLQuantizationType.F32:
            values = np.array(data.view(np.float32))
        elif t.type == GGMLQuantizationType.F16:
            values = data.view(np.float16).astype(np.float32)
        elif t.type in registered_types():  # our numba dequantizers (checked against libggml)
            values = get_format(t.type).dequantize(data)
        else:
            try:
                values = gguf_quants.dequantize(np.asarray(data), t.type)
            except NotImplementedError:
                raise ModelFileError(self.path, f"tensor {name!r}: cannot dequantize type {t.type.name}") from None
        return np.asarray(values, dtype=np.float32).reshape(shape)

    def iter_tensors(self) -> Iterator[tuple[TensorInfo, np.ndarray]]:
        for info in self.tensors:
            yield info, self.read(info.name)

    def close(self) -> None:
        # drop the memory maps (Windows cannot replace a mapped file)
        self._maps = {}
        self._mmaps = {}

    def __enter__(self) -> "GGUFSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
