"""Atomic, streaming GGUF writer.

Header, metadata and tensor infos are written first (all sizes are known from the plan), then
tensors one at a time in plan order, into a hidden temporary file in the destination folder.
``commit`` flushes, fsyncs and renames it over the destination; any exception (or interrupt)
before that removes the temporary file, so a destination is either absent or complete.
Serialisation is gguf-py's GGUFWriter.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import struct
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFEndian, GGUFValueType, GGUFWriter

from ..errors import DestinationError, DiskFullError
from .header import MetadataField
from .split import SPLIT_COUNT, SPLIT_KEYS, SPLIT_NO, SPLIT_TENSORS, part_paths

TEMP_PREFIX = ".llmquant-partial-"


_ARRAY_DTYPES = {
    GGUFValueType.UINT8: "<u1", GGUFValueType.INT8: "<i1", GGUFValueType.BOOL: "<u1",
    GGUFValueType.UINT16: "<u2", GGUFValueType.INT16: "<i2",
    GGUFValueType.UINT32: "<u4", GGUFValueType.INT32: "<i4", GGUFValueType.FLOAT32: "<f4",
    GGUFValueType.UINT64: "<u8", GGUFValueType.INT64: "<i8", GGUFValueType.FLOAT64: "<f8",
}


class _GGUFWriter(GGUFWriter):
    """gguf-py's writer with a fast path for typed arrays: packing a 49k-entry vocabulary one
    item at a time takes a third of a second, and gguf-py refuses empty arrays, which valid
    files contain (e.g. ``tokenizer.ggml.merges`` of a model without merges)."""

    def _pack_val(self, val, vtype, add_vtype, sub_type=None):
        if vtype != GGUFValueType.ARRAY or sub_type is None or self.endianess != GGUFEndian.LITTLE:
            return super()._pack_val(val, vtype, add_vtype, sub_type=sub_type)
        head = struct.pack("<I", vtype) if add_vtype else b""
        head += struct.pack("<IQ", sub_type, len(val))
        if sub_type == GGUFValueType.STRING:
            parts = [head]
            for item in val:
                b = item.encode("utf-8") if isinstance(item, str) else bytes(item)
                parts.append(struct.pack("<Q", len(b)))
                parts.append(b)
            return b"".join(parts)
        if sub_type in _ARRAY_DTYPES:
            return head + np.asarray(val, dtype=_ARRAY_DTYPES[sub_type]).tobytes()
        return super()._pack_val(val, vtype, add_vtype, sub_type=sub_type)


def check_destination(dst: str | Path, *, force: bool, src: str | Path | None = None) -> Path:
    """Fail early (before any work) when ``dst`` cannot be written."""
    dst = Path(dst)
    if dst.is_dir():
        raise DestinationError(dst, "is a folder; give a file name such as model-Q8_0.gguf")
    parent = dst.parent if str(dst.parent) else Path(".")
    if not parent.is_dir():
        raise DestinationError(dst, f"destination folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise DestinationError(dst, f"destination folder {parent} is not writable")
    if src is not None and dst.exists() and dst.resolve() == Path(src).resolve():
        raise DestinationError(dst, "is the source file; refusing to overwrite the source")
    if dst.exists() and not force:
        raise DestinationError(dst, "already exists; pass --force to overwrite it")
    return dst


_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def check_free_space(folder: str | Path, needed: int, *, what: str = "the output") -> None:
    """DiskFullError unless ``folder``'s filesystem has ``needed`` bytes free (rounded up to whole
    4 KiB blocks, as the file will occupy)."""
    folder = Path(folder)
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return  # cannot tell (e.g. a FUSE mount): the write itself will say
    blocks = -(-needed // 4096) * 4096
    if blocks > free:
        raise DiskFullError(folder, f"not enough disk space for {what}: it needs {_mib(blocks)}, "
                            f"{_mib(free)} are free", needed=blocks, free=free)


def write_failed(path: Path, exc: OSError, *, needed: int | None = None) -> DestinationError:
    """One line for an OSError met while writing ``path`` (disk full above all)."""
    try:
        free: int | None = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    # gguf-py and numpy's tofile report a short write without an errno
    # ("N requested and M written", "Not enough free space to write N bytes after offset M")
    text = str(exc).lower()
    short_write = exc.errno is None and ("requested and" in text or "free space" in text
                                         or (free is not None and free < 1 << 20))
    if exc.errno in _FULL or short_write:
        room = f" ({_mib(free)} free)" if free is not None else ""
        need = f"; the file needs {_mib(needed)}" if needed else ""
        return DiskFullError(path, f"the disk filled up while writing{need}{room}; the partial file was removed",
                             needed=needed, free=free)
    return DestinationError(path, f"cannot write: {exc.strerror or exc}; the partial file was removed")


def tensor_nbytes(shape: tuple[int, ...], qtype: GGMLQuantizationType) -> int:
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    n = int(np.prod(shape))
    return n // block_size * type_size


def planned_size(g: GGUFWriter, tensor_bytes: list[int] | None = None) -> int:
    """The exact size of the file gguf-py's writer ``g`` will write (header, metadata, tensor
    infos, padded data), before anything is written; ``tensor_bytes`` defaults to its tensors'."""
    align = g.data_alignment
    n = 4 + 4 + 8 + 8  # magic, version, tensor count, metadata count
    for key, val in g.kv_data[0].items():
        n += len(g._pack_val(key, GGUFValueType.STRING, add_vtype=False))
        n += len(g._pack_val(val.value, val.type, add_vtype=True, sub_type=val.sub_type))
    for name, ti in g.tensors[0].items():
        n += len(g._pack_val(name, GGUFValueType.STRING, add_vtype=False)) + 4 + 8 * len(ti.shape) + 4 + 8
    n = GGUFWriter.ggml_pad(n, align)
    if tensor_bytes is None:
        tensor_bytes = [ti.nbytes for ti in g.tensors[0].values()]
    return n + sum(GGUFWriter.ggml_pad(nbytes, align) for nbytes in tensor_bytes)


class AtomicGGUFWriter:
    """``with AtomicGGUFWriter(dst, arch) as w: w.add_field(...); w.add_tensor_info(...); w.start();
    w.write_tensor(...); w.commit()``; leaving the block without ``commit`` discards everything."""

    def __init__(self, dst: str | Path, arch: str, *, force: bool = False, alignment: int | None = None,
                 split_max_size: int = 0):
        self.dst = Path(dst)
        self.force = force
        self.tmp = self.dst.parent / f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}-{self.dst.name}"
        # split_max_size > 0: llama.cpp's split files (gguf-py's sharding, as convert_hf_to_gguf.py
        # --split-max-size and gguf-split write them; split.py has the layout)
        self._gguf = _GGUFWriter(None, arch, split_max_size=split_max_size)
        if alignment is not None and alignment != self._gguf.data_alignment:
            self._gguf.data_alignment = alignment
            self._gguf.add_custom_alignment(alignment)
        self._order: list[tuple[str, int]] = []
        self._next = 0
        self._started = False
        self._done = False
        self._size: int | None = None

    # -- metadata ------------------------------------------------------------------------------
    def add_field(self, field: MetadataField) -> None:
        if field.key in ("general.architecture", "general.alignment") or field.key in SPLIT_KEYS:
            return  # GGUFWriter writes these itself (the split keys of a split source describe its parts)
        self._gguf.add_key_value(field.key, field.value, field.type, sub_type=field.sub_type)

    def set(self, key: str, value, vtype: GGUFValueType, sub_type: GGUFValueType | None = None) -> None:
        kv = self._gguf.kv_data[0]
        kv.pop(key, None)
        self._gguf.add_key_value(key, value, vtype, sub_type=sub_type)

    # -- tensors -------------------------------------------------------------------------------
    def add_tensor_info(self, name: str, shape: tuple[int, ...], qtype: GGMLQuantizationType) -> int:
        """``shape`` in ggml order (ne0 first). Returns the byte size the data must have."""
        nbytes = tensor_nbytes(shape, qtype)
        self._gguf.add_tensor_info(name, tuple(reversed(shape)), np.dtype(np.float32), nbytes, raw_dtype=qtype)
        self._order.append((name, nbytes))
        return nbytes

    @property
    def destinations(self) -> list[Path]:
        """The files ``commit`` produces: ``dst``, or its parts NAME-0000i-of-0000N.gguf."""
        return part_paths(self.dst, len(self._gguf.tensors))

    def planned_file_size(self) -> int:
        """The exact size the file (all parts together) will have, computed before writing
        anything (for --dry-run and the free-space check)."""
        return sum(self.planned_part_sizes())

    def planned_part_sizes(self) -> list[int]:
        g = self._gguf
        align = g.data_alignment
        n_parts = len(g.tensors)
        split_kv = {SPLIT_NO: (0, GGUFValueType.UINT16), SPLIT_COUNT: (n_parts, GGUFValueType.UINT16),
                    SPLIT_TENSORS: (len(self._order), GGUFValueType.INT32)} if n_parts > 1 else {}
        sizes = []
        for i, tensors in enumerate(g.tensors):
            n = 4 + 4 + 8 + 8  # magic, version, tensor count, metadata count
            kv = [(k, v.value, v.type, v.sub_type) for k, v in g.kv_data[0].items()] if i == 0 else []
            kv += [(k, val, t, None) for k, (val, t) in split_kv.items()]
            for key, value, vtype, sub_type in kv:
                n += len(g._pack_val(key, GGUFValueType.STRING, add_vtype=False))
                n += len(g._pack_val(value, vtype, add_vtype=True, sub_type=sub_type))
            for name, ti in tensors.items():
                n += len(g._pack_val(name, GGUFValueType.STRING, add_vtype=False)) + 4 + 8 * len(ti.shape) + 4 + 8
            n = GGUFWriter.ggml_pad(n, align)
            sizes.append(n + sum(GGUFWriter.ggml_pad(ti.nbytes, align) for ti in tensors.values()))
        return sizes

    def _tmp_parts(self) -> list[Path]:
        return self._gguf.format_shard_names(self.tmp)

    def start(self) -> None:
        """Check the free space against the exact planned size, then write the header."""
        for dst in self.destinations:
            if dst.exists() and not self.force:
                raise DestinationError(dst, "already exists; pass --force to overwrite it")
        self._size = self.planned_file_size()
        check_free_space(self.dst.parent, self._size, what=self.dst.name)
        try:
            self._gguf.write_header_to_file(self.tmp)
            self._started = True
            self._gguf.write_kv_data_to_file()
            self._gguf.write_ti_data_to_file()
        except OSError as exc:
            raise write_failed(self.dst, exc, needed=self._size) from None

    def write_tensor(self, name: str, data: np.ndarray) -> None:
        if not self._started:
            raise RuntimeError("start() must be called before write_tensor()")
        expected_name, nbytes = self._order[self._next]
        if name != expected_name:
            raise RuntimeError(f"tensor {name!r} written out of order; expected {expected_name!r}")
        data = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
        if data.nbytes != nbytes:
            raise RuntimeError(f"tensor {name!r}: {data.nbytes} bytes, expected {nbytes}")
        try:
            self._gguf.write_tensor_data(data)
        except OSError as exc:
            raise write_failed(self.dst, exc, needed=self._size) from None
        self._next += 1

    def commit(self) -> Path:
        if self._next != len(self._order):
            raise RuntimeError(f"commit after {self._next} of {len(self._order)} tensors")
        if not self._started:
            self.start()
        fouts = self._gguf.fout or []
        try:
            for f in fouts:
                f.flush()
                os.fsync(f.fileno())
            self._gguf.close()
        except OSError as exc:
            raise write_failed(self.dst, exc, needed=self._size) from None
        pairs = list(zip(self._tmp_parts(), self.destinations))
        for _, dst in pairs:
            if dst.exists() and not self.force:
                raise DestinationError(dst, "appeared while writing; pass --force to overwrite it")
        # the first part last: llama.cpp loads a split model from it, so until it is in place no
        # incomplete set of parts can be loaded
        for tmp, dst in pairs[1:] + pairs[:1]:
            os.replace(tmp, dst)
        self._done = True
        try:  # make the rename itself durable
            fd = os.open(self.dst.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            pass
        return self.dst

    def abort(self) -> None:
        try:
            self._gguf.close()
        except OSError:  # flushing into a full disk fails again: the file goes anyway
            for f in self._gguf.fout or []:
                try:
                    f.close()
                except OSError:
                    pass
        finally:
            if not self._done:
                for tmp in {self.tmp, *self._tmp_parts()}:
                    try:
                        tmp.unlink()
                    except FileNotFoundError:
                        pass

    def __enter__(self) -> "AtomicGGUFWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._done:
            self.abort()
