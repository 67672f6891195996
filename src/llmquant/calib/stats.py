"""Activation statistics: llama-imatrix's importance matrix (sum of x² per input column, and the
number of activations summed) collected from a model's own forward pass.

Follows ``IMatrixCollector::collect_imatrix`` and ``compute_imatrix`` of tools/imatrix/imatrix.cpp
(llama.cpp vendored in llama-cpp-python 0.3.36): every MUL_MAT whose weight is ``blk.*`` (and
``output.weight`` with ``process_output``) on batches of at least 16 tokens, every MUL_MAT_ID with
one row of sums per expert; the text tokenized with BOS as the vocabulary asks, cut into chunks of
``n_ctx`` tokens whose first token becomes BOS, at least two chunks.

The forward pass itself is the runtime's (dependency injection, calib imports no runtime): a
*tap* with ``select`` / ``sink`` attributes, ``tokenize``, ``add_bos``, ``bos``, ``n_seq`` and
``decode_chunks`` (``llmquant.runtime.llama.MatmulTap``). Sums are float32 added one token at a
time in imatrix.cpp's order and rounding (``acc[j] += x[j] * x[j]``), so the file holds
llama-imatrix's own numbers, bit for bit.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CalibrationError

# imatrix.cpp: "why are small batches ignored (<16 tokens)?"
MIN_ROWS = 16


def _add_squares(acc: np.ndarray, rows: np.ndarray) -> None:
    """acc[j] += x[j] * x[j] for each row x in order, in float32 with a rounding after the
    product and after the sum (no fused multiply-add): bit-identical to llama-imatrix's loop as
    built from the vendored source (checked on all 210 entries of the default model).

    numpy reduces a C-ordered array over its first axis row after row (pairwise summation is only
    used along the contiguous axis), so stacking acc above the squares and reducing is exactly
    that loop. Not numba: its import alone is ~70 MB of resident memory that llama-imatrix does
    not carry, and on a whole collection the two measured the same (bench/RESULTS.md)."""
    n = rows.shape[0]
    if n == 0:
        return
    buf = np.empty((n + 1, acc.shape[0]), dtype=np.float32)
    buf[0] = acc
    np.multiply(rows, rows, out=buf[1:])
    np.add.reduce(buf, axis=0, out=acc)


@dataclass
class Entry:
    """One weight's statistics: ``sums`` (n_mat, n_per_row) of x², ``counts`` (n_mat,) activations."""

    sums: np.ndarray
    counts: np.ndarray

    @property
    def n_per_row(self) -> int:
        return int(self.sums.shape[1])

    def means(self) -> np.ndarray:
        """E[x²] per column (1 for a matrix that saw nothing), as llama-quantize divides."""
        out = np.ones(self.sums.shape, dtype=np.float64)
        np.divide(self.sums, self.counts[:, None], out=out, where=self.counts[:, None] > 0)
        return out


@dataclass
class ImatrixStats:
    """What llama-imatrix accumulates: name -> Entry, the datasets read, the chunk size."""

    chunk_size: int = 512
    process_output: bool = False
    entries: dict[str, Entry] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    # imatrix.cpp's m_last_chunk and its periodic saves: on_chunk(last_chunk, step) each time a
    # tensor's count passes a new whole chunk, right after that tensor's sums are added
    last_chunk: int = 0
    on_chunk: Callable[[int, int], None] | None = None
    # (source node, sums before, sums after, rows shape) of the last dense matmul (_add_shared)
    _shared: tuple | None = field(default=None, repr=False)

    @property
    def chunk_count(self) -> int:
        """imatrix.cpp's m_last_chunk: the largest count over all entries / chunk size."""
        top = max((int(e.counts.max()) for e in self.entries.values() if e.counts.size), default=0)
        return top // self.chunk_size if self.chunk_size > 0 else 0

    def wants(self, name: str) -> bool:
        return name.startswith("blk.") or (self.process_output and name == "output.weight")

    # -- the runtime's sink --------------------------------------------------------------------
    def add(self, inp: Any) -> None:
        """Accumulate one matmul input (``MatmulInput``: name, op, x (ne3, ne2, ne1, ne0) float32,
        weight_ne, ids)."""
        if inp.op == "MUL_MAT_ID":
            self._add_indirect(inp.name, inp.x, inp.ids, int(inp.weight_ne[2]))
        else:
            self._add_dense(inp.name, inp.x, inp.weight_ne, getattr(inp, "source", 0))

    def _entry(self, name: str, n_mat: int, ne0: int, n_counts: int) -> Entry:
        e = self.entries.get(name)
        if e is None:
            e = self.entries[name] = Entry(np.zeros((n_mat, ne0), dtype=np.float32), np.zeros(n_counts, dtype=np.int64))
        elif e.sums.size != n_mat * ne0:
            raise CalibrationError(
                f"tensor {name!r}: {e.sums.size} sums collected (or merged) so far, but the model gives "
                f"{n_mat} x {ne0}; were the merged imatrix files made for another model?"
            )
        else:
            e.sums = e.sums.reshape(n_mat, ne0)
        return e

    def _add_dense(self, name: str, x: np.ndarray, wne: tuple[int, ...], source: int = 0) -> None:
        ne3, ne2, ne1, ne0 = x.shape
        w2, w3 = int(wne[2]), int(wne[3])
        n_mat = w2 * w3
        e = self._entry(name, n_mat, ne0, 1)
        if e.counts.size > 1 and (e.counts == e.counts[0]).all():
            e.counts = e.counts[:1].copy()  # one count per dense tensor (merging older 3-D files)
        if n_mat == 1 and ne2 == ne3 == 1 and source:
            self._add_shared(source, e.sums[0], x[0, 0])
        else:
            self._shared = None
            for i3 in range(ne3):
                for i2 in range(ne2):
                    m = (i3 % w3) * w2 + (i2 % w2)
                    _add_squares(e.sums[m], x[i3, i2])
        _check_finite(name, e.sums)
        e.counts += (ne1 * ne2 * ne3) // n_mat
        self._passed_chunks(e.counts)

    def _add_shared(self, source: int, acc: np.ndarray, rows: np.ndarray) -> None:
        """Add the squares of ``rows`` to ``acc``, reusing the previous matmul's result when it read
        the same graph node (q / k / v, gate / up: one input, several weights; a node's data stays
        put until its last reader has run) and its sums started from the same values: the same
        float32 additions in the same order give the same bits, so the copy is what adding again
        would give, at a third of the work for a llama layer."""
        prev = self._shared
        if prev is not None and prev[0] == source and prev[3] == rows.shape and np.array_equal(prev[1], acc):
            acc[:] = prev[2]
            return
        before = acc.copy()
        _add_squares(acc, rows)
        self._shared = (source, before, acc.copy(), rows.shape)

    def _passed_chunks(self, counts: np.ndarray) -> None:
        for c in counts:
            n_chunk = int(c) // self.chunk_size if self.chunk_size > 0 else 0
            if n_chunk > self.last_chunk:
                step = n_chunk - self.last_chunk
                self.last_chunk = n_chunk
                if self.on_chunk is not None:
                    self.on_chunk(n_chunk, step)

    def _add_indirect(self, name: str, x: np.ndarray, ids: np.ndarray, n_as: int) -> None:
        # src1 [ne0, ne1 (1 or n_expert_used), n_tokens]; ids [n_expert_used, n_tokens]
        _, _, ne1, ne0 = x.shape
        e = self.entries.get(name)
        if e is not None and e.counts.size == 1 and n_as > 1:  # broadcast, when loading an old imatrix
            e.counts = np.full(n_as, e.counts[0], dtype=np.int64)
        e = self._entry(name, n_as, ne0, n_as)
        if e.counts.size != n_as:
            raise CalibrationError(f"tensor {name!r}: {e.counts.size} expert counts so far, the model has {n_as}")
        ex_all = np.asarray(ids, dtype=np.int64)
        if ex_all.size and (ex_all.min() < 0 or ex_all.max() >= n_as):
            raise CalibrationError(f"tensor {name!r}: expert id outside 0..{n_as - 1} in the routing")
        touched = np.zeros(n_as, dtype=bool)
        for idx in range(ids.shape[1]):  # imatrix.cpp's loop order: expert slot, then token
            xs = x[0, :, idx % ne1, :]
            ex = ex_all[:, idx]
            for expert in np.unique(ex):
                _add_squares(e.sums[expert], xs[ex == expert])
            e.counts += np.bincount(ex, minlength=n_as)
            touched[np.unique(ex)] = True
        _check_finite(name, e.sums[touched])
        self._passed_chunks(e.counts)

    # -- merging (IMatrixCollector::load_imatrix) -------------------------------------------------
    def merge(self, name: str, sums: np.ndarray, counts: np.ndarray) -> None:
        """Add raw sums (n_mat * n_per_row) and counts (n_mat) of an earlier file."""
        sums = np.asarray(sums, dtype=np.float32).reshape(-1)
        counts = np.asarray(counts, dtype=np.int64).reshape(-1)
        e = self.entries.get(name)
        if e is None:
            self.entries[name] = Entry(sums.reshape(counts.size, -1).copy(), counts.copy())
            return
        if sums.size != e.sums.size:
            raise CalibrationError(f"tensor {name!r}: merged files disagree on its size ({sums.size} vs {e.sums.size} sums)")
        if e.counts.size == 1 and counts.size > 1:
            e.counts = np.full(counts.size, e.counts[0], dtype=np.int64)
        if counts.size != e.counts.size and not (counts.size == 1 and e.counts.size > 1):
            raise CalibrationError(f"tensor {name!r}: merged files disagree on its counts ({counts.size} vs {e.counts.size})")
        e.sums = (e.sums.reshape(-1) + sums).reshape(e.counts.size, -1)
        e.counts = e.counts + counts

    # -- what a user looks at ------------------------------------------------------------------
    def skew(self, top: int = 10) -> list[dict[str, Any]]:
        """The tensors with the most skewed importance: max / mean of E[x²] over columns."""
        rows = []
        for name, e in self.entries.items():
            if not (e.counts > 0).any():
                continue
            m = e.means()[e.counts > 0]
            mean = float(m.mean())
            col = int(np.argmax(m.max(axis=0)))
            rows.append({"tensor": name, "columns": e.n_per_row, "experts": int(e.counts.size),
                         "count": int(e.counts.max()), "mean": mean, "max": float(m.max()),
                         "max_column": col, "skew": float(m.max()) / mean if mean > 0 else float("inf")})
        rows.sort(key=lambda r: -r["skew"])
        return rows[:top]


def _check_finite(name: str, sums: np.ndarray) -> None:
    if not np.isfinite(sums).all():
        raise CalibrationError(f"tensor {name!r}: non-finite activations (the model produced NaN/Inf)")


@dataclass
class Progress:
    chunks_done: int
    chunks_total: int
    tokens_done: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_done / self.seconds if self.seconds > 0 else 0.0

    @property
    def eta_seconds(self) -> float:
        if self.chunks_done == 0:
            return float("nan")
        return self.seconds * (self.chunks_total - self.chunks_done) / self.chunks_done


def plan_chunks(n_tokens: int, n_ctx: int, chunks: int | None) -> int:
    """compute_imatrix: at least 2 * n_ctx tokens; n_chunk = min(chunks, tokens // n_ctx)."""
    if n_tokens < 2 * n_ctx:
        raise CalibrationError(
            f"the calibration text has {n_tokens} tokens; a context of {n_ctx} needs at least {2 * n_ctx} "
            "(give more text, or a smaller --ctx)"
        )
    n_max = n_tokens // n_ctx
    if chunks is not None and chunks < 1:
        raise CalibrationError(f"--chunks must be at least 1, got {chunks}")
    return n_max if chunks is None else min(chunks, n_max)


def collect_imatrix(
    tap: Any,
    text: str,
    *,
    n_ctx: int = 512,
    chunks: int | None = None,
    process_output: bool = False,
    dataset: str = "",
    stats: ImatrixStats | None = None,
    parse_special: bool = False,
    progress: Callable[[Progress], None] | None = None,
    skip_chunks: int = 0,
) -> ImatrixStats:
    """Run ``text`` through ``tap`` (a runtime model with the eval callback) and return what
    llama-imatrix accumulates. ``stats`` (e.g. merged from earlier files) is added to in place."""
    if stats is None:
        stats = ImatrixStats(chunk_size=n_ctx, process_output=process_output)
    stats.process_output = process_output
    tap.select, tap.sink = stats.wants, stats.add
    if dataset:
        stats.datasets.append(dataset)  # imatrix.cpp adds it before collecting: periodic saves name it
    run_chunks(tap, text, n_ctx=n_ctx, chunks=chunks, parse_special=parse_special, progress=progress,
               skip_chunks=skip_chunks)
    if not stats.entries:
        raise CalibrationError("the model has no matrix multiplication with a 'blk.*' weight; nothing to collect")
    return stats


def run_chunks(tap: Any, text: str, *, n_ctx: int = 512, chunks: int | None = None, parse_special: bool = False,
               progress: Callable[[Progress], None] | None = None,
               after_decode: Callable[[], None] | None = None, skip_chunks: int = 0) -> int:
    """Decode ``text`` through ``tap`` as llama-imatrix does (chunks of ``n_ctx`` tokens, the first
    of each made BOS, ``tap.n_seq`` chunks per decode); its sink sees every matmul. Returns the
    number of chunks. ``after_decode`` runs after each decode, while the runtime is idle;
    ``skip_chunks`` drops the text's first chunks (llama-imatrix --chunk)."""
    tokens = np.asarray(tap.tokenize(text, parse_special=parse_special), dtype=np.int32)
    if skip_chunks > 0:
        if (skip_chunks + 2) * n_ctx >= len(tokens):
            raise CalibrationError(f"--chunk {skip_chunks}: the text has {len(tokens)} tokens; not enough would be "
                                   f"left after removing {skip_chunks} chunks of {n_ctx}")
        tokens = tokens[skip_chunks * n_ctx:]
    n_chunk = plan_chunks(len(tokens), n_ctx, chunks)
    n_seq = int(tap.n_seq)
    bos = tap.bos if tap.add_bos else None
    t0 = time.perf_counter()
    if progress:
        progress(Progress(0, n_chunk, 0, 0.0))
    for i in range(0, n_chunk, n_seq):
        group = []
        for c in range(i, min(i + n_seq, n_chunk)):
            chunk = tokens[c * n_ctx:(c + 1) * n_ctx].copy()
            if bos is not None:
                chunk[0] = bos
            group.append(chunk)
        tap.decode_chunks(group)
        if after_decode:
            after_decode()
        done = i + len(group)
        if progress:
            progress(Progress(done, n_chunk, done * n_ctx, time.perf_counter() - t0))
    return n_chunk


def entries_from_files(stats: ImatrixStats, raw: Iterable[tuple[str, np.ndarray, np.ndarray]]) -> None:
    for name, sums, counts in raw:
        stats.merge(name, sums, counts)


# -- calibration text -------------------------------------------------------------------------------

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")


def read_text(path: str | Path) -> str:
    """A text file, or every text file (.txt .md .rst .text) under a folder, sorted by path and
    joined by blank lines. UTF-8; a clear error for a missing path, an empty folder or bad bytes."""
    path = Path(path)
    if not path.exists():
        raise CalibrationError(f"{path}: no such file or folder")
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES
    )
    if not files:
        raise CalibrationError(f"{path}: the folder holds no text files ({', '.join(TEXT_SUFFIXES)})")
    parts = []
    for f in files:
        try:
            parts.append(f.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise CalibrationError(f"{f}: not UTF-8 text (byte {exc.start})") from None
    text = "\n\n".join(parts)
    if not text.strip():
        raise CalibrationError(f"{path}: the calibration text is empty")
    return text


def default_calibration_path() -> Path:
    """The calibration text shipped with llmquant (data/calibration.txt; sources in data/NOTICE)."""
    return Path(__file__).resolve().parent.parent / "data" / "calibration.txt"
