"""Importance matrices, read as ``llama-quantize --imatrix FILE`` reads them.

Both files that llama.cpp's ``tools/imatrix/imatrix.cpp`` writes:

- GGUF (current): for each weight tensor ``<name>.in_sum2`` (F32, ggml shape [n_per_row, n_mat],
  the sum of squared activations per column, one row per expert) and ``<name>.counts`` (F32,
  [1, n_mat], how many activations were summed), plus ``imatrix.datasets`` (string array),
  ``imatrix.chunk_count`` and ``imatrix.chunk_size`` (uint32).
- legacy ``.dat``: int32 n_entries, then per entry int32 name length, the name, int32 ncall,
  int32 nval, float32[nval] (already averaged and multiplied by ncall); then optionally int32
  last_call and an int32-length-prefixed dataset name.

Reading follows ``common_imatrix_load`` (common/imatrix-loader.cpp); the vector per tensor is
``load_imatrix`` in tools/quantize/quantize.cpp; how it is applied (the size check, one slice per
expert) is ``llama_model_quantize_impl`` in src/llama-quant.cpp.
"""

from __future__ import annotations

import mmap
import os
import secrets
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType, LlamaFileType

from ..errors import DestinationError, ModelFileError, TensorDataError
from .header import (
    GGUF_MAGIC,
    GGUFHeader,
    MetadataField,
    TensorEntry,
    parse_gguf_buffer,
)
from .recipes import _TOKEN_EMBD_NAMES, TensorPlan, ftype_name, requires_imatrix
from .writer import (
    TEMP_PREFIX,
    _GGUFWriter,
    check_free_space,
    planned_size,
    write_failed,
)

# keys llama-quantize writes into its output (quantize.cpp LLM_KV_QUANTIZE_IMATRIX_*)
KV_FILE = "quantize.imatrix.file"
KV_DATASET = "quantize.imatrix.dataset"
KV_N_ENTRIES = "quantize.imatrix.entries_count"
KV_N_CHUNKS = "quantize.imatrix.chunks_count"
# llama_model_kv_override::val_str is char[128]: strncpy(..., 127)
_KV_STR_MAX = 127

_SUM_SUFFIX = ".in_sum2"
_COUNT_SUFFIX = ".counts"
_META_KEYS = ("imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size")
# smallest legacy entry: name length, ncall, nval and one value
_MIN_LEGACY_ENTRY = 16


@dataclass
class Imatrix:
    """Per-tensor importance vectors (float32, n_per_row values per expert), as llama-quantize
    hands them to llama_model_quantize."""

    path: Path
    entries: dict[str, np.ndarray]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    format: str = "gguf"  # or "legacy"

    def for_tensor(self, name: str, n_per_row: int, n_expert: int = 1) -> np.ndarray | None:
        """The vector for tensor ``name`` (``n_per_row * n_expert`` values), or None when the file
        has none for it. A wrong length is an error, except for token_embd, which llama.cpp then
        quantizes without importance."""
        values = self.entries.get(name)
        if values is None:
            return None
        return check_importance(name, n_per_row, n_expert, values, origin=f"importance matrix {self.path}")

    def provenance(self, file: str | Path | None = None) -> dict[str, tuple[Any, GGUFValueType]]:
        """The output-file metadata llama-quantize records for this imatrix: key -> (value, type).
        ``file`` is the path as the user gave it (llama-quantize writes its argument verbatim)."""
        if not self.entries:
            return {}  # llama-quantize records nothing when no entry survives
        out: dict[str, tuple[Any, GGUFValueType]] = {
            KV_FILE: (_c_string(str(self.path if file is None else file)), GGUFValueType.STRING)
        }
        if self.datasets:  # only the first one ("TODO: list multiple datasets")
            out[KV_DATASET] = (_c_string(self.datasets[0]), GGUFValueType.STRING)
        # integer overrides are written as uint32 (llama-quant.cpp, llama.cpp PR #14182)
        out[KV_N_ENTRIES] = (len(self.entries), GGUFValueType.UINT32)
        if self.chunk_count > 0:
            out[KV_N_CHUNKS] = (self.chunk_count, GGUFValueType.UINT32)
        return out


def load_imatrix(path: str | Path) -> Imatrix:
    """Read a GGUF or legacy ``.dat`` imatrix, or raise ModelFileError naming what is wrong."""
    path = Path(path)
    if not path.exists():
        raise ModelFileError(path, "no such file")
    if path.is_dir():
        raise ModelFileError(path, "is a folder, expected an imatrix file (.gguf or .dat)")
    return _mapped(path, lambda buf: load_imatrix_buffer(buf, path))


def _mapped(path: Path, read):
    """``read(buffer)`` over the whole file memory-mapped (an empty file: over b"")."""
    if path.stat().st_size == 0:
        return read(b"")
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        return read(mm)
    finally:
        try:
            mm.close()
        except BufferError:  # a view still alive (in a traceback): the mapping goes with it
            pass


def load_imatrix_buffer(buf, path: object = "<bytes>") -> Imatrix:
    """The same for a whole file held in ``buf`` (bytes or a memory map); ``path`` names it."""
    if buf[:4] == GGUF_MAGIC:
        return _load_gguf(path, parse_gguf_buffer(buf, path), buf)
    return _load_legacy(path, buf)


def check_importance(
    name: str, n_per_row: int, n_expert: int, values: np.ndarray, *, origin: str = "importance matrix"
) -> np.ndarray | None:
    """llama_model_quantize's rule: an entry has one value per column for each expert; token_embd
    with another size is skipped (None); any other size is an error."""
    values = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    expected = n_per_row * n_expert
    if values.size == expected:
        return values
    if name in _TOKEN_EMBD_NAMES:
        return None
    per = f"{n_per_row} columns x {n_expert} experts = {expected}" if n_expert > 1 else "one per column"
    raise TensorDataError(
        name, f"{origin} has {values.size} values for it, expected {expected} ({per}); "
        "was it computed for another model?"
    )


# -- GGUF (common_imatrix_load) -----------------------------------------------------------------------

def _load_gguf(path: Path, header: GGUFHeader, buf) -> Imatrix:
    raw = _read_gguf_raw(path, header, buf)
    entries = {
        name: _check_finite(path, name, _mean_per_expert(sums, counts)) for name, (sums, counts) in raw.entries.items()
    }
    return Imatrix(path, entries, raw.datasets, raw.chunk_count, raw.chunk_size, "gguf")


@dataclass
class RawImatrix:
    """An imatrix file as IMatrixCollector::load_imatrix merges it: per name the stored sums
    (float32, n_mat * n_per_row) and counts (float32 as stored for GGUF; ``[ncall]`` for legacy,
    whose sums are already ``mean * ncall``)."""

    path: Path
    entries: dict[str, tuple[np.ndarray, np.ndarray]]
    datasets: list[str]
    chunk_count: int
    chunk_size: int
    is_legacy: bool


def load_imatrix_raw(path: str | Path) -> RawImatrix:
    """common_imatrix_load: the raw sums and counts of a GGUF or legacy imatrix (for merging)."""
    path = Path(path)
    if not path.exists():
        raise ModelFileError(path, "no such file")
    if path.is_dir():
        raise ModelFileError(path, "is a folder, expected an imatrix file (.gguf or .dat)")
    return _mapped(path, lambda buf: _raw_from_buffer(buf, path))


def _raw_from_buffer(buf, path) -> RawImatrix:
    if buf[:4] == GGUF_MAGIC:
        return _read_gguf_raw(path, parse_gguf_buffer(buf, path), buf)
    im = _load_legacy(path, buf, raw=True)
    return RawImatrix(path, im.entries, im.datasets, im.chunk_count, 0, True)  # type: ignore[arg-type]


def _read_gguf_raw(path: Path, header: GGUFHeader, buf) -> RawImatrix:
    fields = header.fields
    missing = [k for k in _META_KEYS if k not in fields]
    if missing:
        what = next((f" ({k} is {fields[k].value!r})" for k in ("general.type", "general.architecture") if k in fields), "")
        raise ModelFileError(path, f"not an imatrix: GGUF without the metadata {', '.join(missing)}{what}")
    datasets: list[str] = []
    ds = fields["imatrix.datasets"]
    if ds.type == GGUFValueType.ARRAY and ds.sub_type == GGUFValueType.STRING:
        datasets = list(ds.value)
    chunk_count, chunk_size = (_u32(path, fields[k]) for k in _META_KEYS[1:])

    pairs: dict[str, list[TensorEntry | None]] = {}
    for t in header.tensors:
        for slot, suffix in enumerate((_SUM_SUFFIX, _COUNT_SUFFIX)):
            if t.name.endswith(suffix):
                pairs.setdefault(t.name[: -len(suffix)], [None, None])[slot] = t
    if not pairs:
        raise ModelFileError(path, f"not an imatrix: no '<tensor>{_SUM_SUFFIX}' / '<tensor>{_COUNT_SUFFIX}' tensors")

    entries: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    data = np.frombuffer(buf, dtype=np.uint8)
    try:
        for name in sorted(pairs):
            sums_t, counts_t = pairs[name]
            if sums_t is None or counts_t is None:
                have = _SUM_SUFFIX if counts_t is None else _COUNT_SUFFIX
                raise ModelFileError(path, f"imatrix entry {name!r} has {name}{have} but not its partner tensor")
            for t in (sums_t, counts_t):
                if t.type != GGMLQuantizationType.F32:
                    raise ModelFileError(path, f"imatrix tensor {t.name!r} is {t.type.name}, expected F32")
            sums = np.array(data[sums_t.offset:sums_t.offset + sums_t.n_bytes].view("<f4"))
            counts = np.array(data[counts_t.offset:counts_t.offset + counts_t.n_bytes].view("<f4"))
            if counts.size == 0 or sums.size % counts.size:
                raise ModelFileError(
                    path, f"imatrix entry {name!r} has {sums.size} sums, not a multiple of its {counts.size} counts"
                )
            entries[name] = (sums, counts)
    finally:
        del data
    return RawImatrix(path, entries, datasets, chunk_count, chunk_size, False)


def _u32(path: Path, f: MetadataField) -> int:
    # gguf_get_val_u32 asserts the type
    if f.type != GGUFValueType.UINT32:
        raise ModelFileError(path, f"imatrix metadata {f.key} is {f.type.name}, expected UINT32")
    return int(f.value)


def _lround(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """C ``lround`` of float32 counts: (rounded value, whether it is a valid positive long).
    NaN, Inf and values beyond int64 give LONG_MIN on x86-64 glibc, i.e. not positive."""
    x = x.astype(np.float64)
    ok = np.isfinite(x) & (np.abs(x) < 2.0**63)
    x = np.where(ok, x, 0.0)
    r = np.trunc(x)
    r += np.where(np.abs(x - r) >= 0.5, np.sign(x), 0.0)  # halves away from zero
    return r, ok & (r > 0)


def _mean_per_expert(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """quantize.cpp load_imatrix, GGUF branch: e[j*ne0 + i] = sums[j*ne0 + i] / (float)counts[j]
    for count > 0 (counts read with lround), else 1."""
    ne0 = sums.size // counts.size
    rounded, positive = _lround(counts)
    # float(int64) of an lround'ed float32 is exact: either < 2**24 or already an integer
    divisor = rounded.astype(np.float32)
    out = np.ones((counts.size, ne0), dtype=np.float32)
    sums = sums.reshape(counts.size, ne0)
    with np.errstate(all="ignore"):  # non-finite results are refused by _check_finite
        np.divide(sums, divisor[:, None], out=out, where=positive[:, None])
    return out.reshape(-1)


def _check_finite(path: Path, name: str, values: np.ndarray) -> np.ndarray:
    # llama_model_quantize refuses any non-finite value in any entry ("imatrix contains non-finite value")
    bad = ~np.isfinite(values)
    if bad.any():
        i = int(np.argmax(bad))
        raise ModelFileError(
            path, f"imatrix entry {name!r} has {int(bad.sum())} non-finite values (first: {values[i]} at index {i}); "
            "llama.cpp refuses it"
        )
    return values


# -- legacy .dat (common_imatrix_load_legacy) -----------------------------------------------------------

class _Reader:
    """Bounds-checked little-endian reads over a memory map."""

    def __init__(self, path: Path, buf, size: int):
        self.path, self.buf, self.size, self.pos = path, buf, size, 0

    @property
    def left(self) -> int:
        return self.size - self.pos

    def fail(self, problem: str) -> ModelFileError:
        return ModelFileError(self.path, f"{problem} (at byte {self.pos}; file has {self.size} bytes)")

    def i32(self, what: str) -> int:
        if self.left < 4:
            raise self.fail(f"truncated legacy imatrix: {what} needs 4 bytes, {self.left} left")
        (v,) = struct.unpack_from("<i", self.buf, self.pos)
        self.pos += 4
        return v

    def take(self, n: int, what: str) -> bytes:
        if n > self.left:
            raise self.fail(f"truncated legacy imatrix: {what} needs {n} bytes, {self.left} left")
        out = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return out

    def c_string(self, n: int, what: str) -> str:
        # std::string{data()} stops at the first NUL
        return self.take(n, what).split(b"\0", 1)[0].decode("utf-8", "replace")


def _load_legacy(path: Path, buf, raw: bool = False) -> Imatrix:
    size = len(buf)
    if size < 4:
        raise ModelFileError(path, f"not an imatrix: only {size} bytes (neither GGUF nor a legacy .dat imatrix)")
    r = _Reader(path, buf, size)
    n_entries = r.i32("entry count")
    if n_entries < 1 or n_entries * _MIN_LEGACY_ENTRY > r.left:
        raise ModelFileError(
            path, f"not an imatrix: not GGUF, and as a legacy .dat imatrix it claims {n_entries} entries, "
            f"which its {size} bytes cannot hold"
        )
    entries: dict[str, np.ndarray] = {}
    for i in range(n_entries):
        n = r.i32(f"name length of entry #{i}")
        if n < 0 or n > r.left:
            raise r.fail(f"not an imatrix: legacy entry #{i} claims a name of {n} bytes ({r.left} left)")
        name = r.c_string(n, f"name of entry #{i}")
        ncall = r.i32(f"ncall of {name!r}")
        nval = r.i32(f"value count of {name!r}")
        if nval < 1:
            raise r.fail(f"legacy imatrix entry {name!r} claims {nval} values, expected at least 1")
        if nval * 4 > r.left:
            raise r.fail(f"truncated legacy imatrix: entry {name!r} claims {nval} values ({nval * 4} bytes), "
                         f"{r.left} bytes left")
        sums = np.frombuffer(r.take(nval * 4, f"values of {name!r}"), dtype="<f4")
        if raw:  # common_imatrix_load_legacy: sums as stored, counts = {ncall}
            entries[name] = (sums.copy(), np.array([ncall], dtype=np.float32))  # type: ignore[assignment]
            continue
        # quantize.cpp: sums hold (raw / count) * ncall; divide by ncall when it is positive
        with np.errstate(all="ignore"):  # non-finite results are refused by _check_finite
            values = sums / np.float32(ncall) if ncall > 0 else sums.copy()
        entries[name] = _check_finite(path, name, values.astype(np.float32, copy=False))  # a repeated name: the last wins
    chunk_count, datasets = 0, []
    if r.left:  # optional trailer: last_call, then the dataset name
        chunk_count = r.i32("chunk count after the entries")
        if r.left >= 4:
            n = r.i32("dataset name length")
            if n > 0:
                datasets.append(r.c_string(n, "dataset name"))
    return Imatrix(path, dict(sorted(entries.items())), datasets, chunk_count, 0, "legacy")


def _c_string(s: str) -> str:
    """strncpy(val_str, s, 127): at most 127 bytes (a cut UTF-8 character is dropped)."""
    return s.encode("utf-8", "surrogateescape")[:_KV_STR_MAX].decode("utf-8", "ignore")


def importance_for_plans(
    plans: list[TensorPlan], importance: Mapping[str, np.ndarray] | None, ftype: LlamaFileType
) -> dict[str, np.ndarray]:
    """The importance vector each tensor is quantized with, checked as llama_model_quantize checks:
    every value of every entry finite; an entry for a converted tensor holds ne0 * ne2 values (one
    slice per expert; token_embd with another size is skipped); a tensor whose type needs an
    imatrix (Q2_K in Q2_K_S, IQ types) has an entry. Only tensors whose format is importance-
    weighted are returned."""
    if not importance:
        return {}
    from ..formats import (
        get_format,  # the block formats (numba) only where quantizing, not collecting
    )

    for name, values in importance.items():
        bad = ~np.isfinite(np.asarray(values, dtype=np.float32))
        if bad.any():
            raise TensorDataError(name, f"the importance matrix has {int(bad.sum())} non-finite values for it")
    out: dict[str, np.ndarray] = {}
    for p in plans:
        if not p.converts:
            continue
        values = importance.get(p.name)
        if values is not None:
            values = check_importance(p.name, p.shape[0], p.shape[2] if len(p.shape) > 2 else 1, values)
        if values is None and requires_imatrix(p.name, p.type, ftype):
            raise TensorDataError(
                p.name, f"no importance matrix entry, and {p.type.name} in {ftype_name(ftype)} needs one"
            )
        if values is not None and get_format(p.type).uses_importance:
            out[p.name] = values
    return out


# -- writing (IMatrixCollector::save_imatrix / save_imatrix_legacy) -----------------------------------

def save_imatrix(
    path: str | Path,
    entries: Mapping[str, tuple[np.ndarray, np.ndarray]],
    *,
    datasets: list[str],
    chunk_count: int,
    chunk_size: int,
    output_format: str = "gguf",
) -> Path:
    """Write ``entries`` (name -> (sums (n_mat, n_per_row), counts (n_mat,))) as llama-imatrix
    does, atomically (temporary name in the destination folder, fsync, rename; nothing at the
    destination on failure). ``output_format`` "gguf" (``<name>.in_sum2`` / ``<name>.counts``,
    ``general.type`` and the ``imatrix.*`` keys) or "dat" (the legacy layout)."""
    path = Path(path)
    if output_format not in ("gguf", "dat"):
        raise ValueError(f"output format {output_format!r}; expected 'gguf' or 'dat'")
    if path.is_dir():
        raise DestinationError(path, "is a folder; give a file name such as imatrix.gguf")
    if not path.parent.is_dir():
        raise DestinationError(path, f"folder {path.parent} does not exist")
    tmp = path.parent / f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}-{path.name}"
    try:
        if output_format == "gguf":
            _write_gguf(tmp, entries, datasets=datasets, chunk_count=chunk_count, chunk_size=chunk_size)
        else:
            data = _legacy_bytes(entries, datasets=datasets, chunk_count=chunk_count, chunk_size=chunk_size)
            check_free_space(path.parent, len(data), what=path.name)
            tmp.write_bytes(data)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:  # disk full (or another write error): one line, no temporary file
        raise write_failed(path, exc) from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _sorted_entries(entries: Mapping[str, tuple[np.ndarray, np.ndarray]]):
    for name in sorted(entries):  # "deterministic tensor name order"
        sums, counts = entries[name]
        counts = np.asarray(counts).reshape(-1)
        sums = np.asarray(sums, dtype=np.float32).reshape(counts.size, -1)
        yield name, sums, counts


def _write_gguf(tmp: Path, entries, *, datasets, chunk_count, chunk_size) -> None:
    w = _GGUFWriter(str(tmp), "imatrix")  # gguf-py's writer, which also packs an empty datasets array
    w.kv_data[0].pop("general.architecture")  # imatrix.cpp writes no architecture
    w.add_string("general.type", "imatrix")
    w.add_key_value("imatrix.datasets", list(datasets), GGUFValueType.ARRAY, sub_type=GGUFValueType.STRING)
    w.add_uint32("imatrix.chunk_count", int(chunk_count))
    w.add_uint32("imatrix.chunk_size", int(chunk_size))
    for name, sums, counts in _sorted_entries(entries):
        if sums.size == 0 or counts.size == 0:
            continue
        # numpy (n_mat, n_per_row) = ggml [n_per_row, n_mat]; gguf_write_to_file records
        # ggml_n_dims dimensions (trailing 1s dropped): [n_per_row] and [1] for a dense weight
        c = counts.astype(np.float32).reshape(-1, 1)
        w.add_tensor(f"{name}{_SUM_SUFFIX}", sums.reshape(-1) if counts.size == 1 else sums)
        w.add_tensor(f"{name}{_COUNT_SUFFIX}", c.reshape(-1) if counts.size == 1 else c)
    check_free_space(tmp.parent, planned_size(w), what=tmp.name.removeprefix(TEMP_PREFIX).split("-", 2)[2])  # exact
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _legacy_bytes(entries, *, datasets, chunk_count, chunk_size) -> bytes:
    out: list[bytes] = []
    stored = []
    for name, sums, counts in _sorted_entries(entries):
        if counts.size == 0 or not (counts != 0).any():
            continue  # "entry has no data - skipping"
        stored.append((name, sums, counts))
    out.append(struct.pack("<i", len(stored)))
    for name, sums, counts in stored:
        b = name.encode("utf-8")
        ncall = int((int(counts.max()) + chunk_size - 1) // chunk_size)  # ceiling division
        count = np.repeat(counts.astype(np.float32), sums.shape[1])
        value = sums.reshape(-1).astype(np.float32)
        zero = count == 0
        value = np.where(zero, np.float32(1), value)  # "store 1 for partial data"
        count = np.where(zero, np.float32(1), count)
        tmp = ((value / count) * np.float32(ncall)).astype("<f4")
        out.append(struct.pack("<i", len(b)) + b + struct.pack("<ii", ncall, tmp.size) + tmp.tobytes())
    out.append(struct.pack("<i", int(chunk_count)))
    ds = (datasets[-1] if datasets else "").encode("utf-8")
    out.append(struct.pack("<i", len(ds)) + ds)
    return b"".join(out)
