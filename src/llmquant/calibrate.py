"""The imatrix pipeline: model + calibration text -> llama.cpp's importance-matrix file.

``make_imatrix`` is what ``llmquant imatrix`` (and ``--imatrix auto``) runs: merge earlier files
(``--in-file``), collect over the text through llama.cpp's forward pass (calib.stats with the
runtime's MatmulTap), write GGUF or legacy ``.dat`` atomically. ``auto_imatrix`` keeps one
imatrix per model in an output folder and reuses it while it is current.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .calib.stats import (
    ImatrixStats,
    Progress,
    collect_imatrix,
    default_calibration_path,
    read_text,
)
from .errors import CalibrationError, DestinationError
from .system import available_memory
from .gguf.imatrix import load_imatrix_raw, save_imatrix
from .gguf.writer import check_free_space

DEFAULT_OUTPUT = "imatrix.gguf"


@dataclass
class ImatrixResult:
    path: Path
    output_format: str
    entries: int
    chunks: int  # chunks collected in this run
    chunk_count: int  # imatrix.chunk_count written (merged files included)
    chunk_size: int
    tokens: int
    seconds: float
    datasets: list[str]
    skew: list[dict[str, Any]] = field(default_factory=list)
    reused: bool = False

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["path"] = str(self.path)
        return d


def output_format_for(path: str | Path, output_format: str | None) -> str:
    """``--output-format`` if given, else legacy for a ``.dat`` name and GGUF otherwise."""
    if output_format is not None:
        if output_format not in ("gguf", "dat"):
            raise CalibrationError(f"--output-format {output_format!r}: expected gguf or dat")
        return output_format
    return "dat" if str(path).lower().endswith(".dat") else "gguf"


def merge_files(stats: ImatrixStats, in_files: Sequence[str | Path]) -> None:
    """IMatrixCollector::load_imatrix for each file: raw GGUF sums and counts added; legacy sums
    (mean * ncall) times the chunk size, its ncall times the chunk size as the count."""
    import numpy as np

    from .gguf.imatrix import _lround

    for f in in_files:
        raw = load_imatrix_raw(f)
        for name, (sums, counts) in raw.entries.items():
            if raw.is_legacy:
                e = stats.entries.get(name)
                n_counts = 1 if e is None else e.counts.size
                merged_counts = np.full(n_counts, int(counts[0]) * stats.chunk_size, dtype=np.int64)
                stats.merge(name, sums.astype(np.float64) * stats.chunk_size, merged_counts)
            else:
                rounded, _ = _lround(counts)
                stats.merge(name, sums, rounded.astype(np.int64))
        stats.datasets.extend(raw.datasets)


def make_imatrix(
    model: str | Path,
    text: str | Path | None = None,
    out: str | Path = DEFAULT_OUTPUT,
    *,
    n_ctx: int = 512,
    chunks: int | None = None,
    process_output: bool = False,
    in_files: Sequence[str | Path] = (),
    output_format: str | None = None,
    threads: int | None = None,
    n_batch: int = 2048,
    parse_special: bool = False,
    progress: Callable[[Progress], None] | None = None,
    from_chunk: int = 0,
    output_frequency: int = 10,
    save_frequency: int = 0,
) -> ImatrixResult:
    """Collect llama-imatrix's importance matrix of ``model`` over ``text`` (a file or a folder of
    text files; the shipped calibration text when None and no ``in_files``) and write it to ``out``.
    With ``in_files`` and no text the files are only combined, as llama-imatrix does.

    As llama-imatrix: ``from_chunk`` skips the text's first chunks (``--chunk``); ``out`` is
    written every ``output_frequency`` chunks while collecting (``-ofreq``, so an interrupted run
    keeps what it had) and a copy ``out.at_N`` every ``save_frequency`` chunks (``--save-frequency``)."""
    import time

    from .runtime.llama import MatmulTap

    out = Path(out)
    fmt = output_format_for(out, output_format)
    if out.is_dir():
        raise DestinationError(out, "is a folder; give a file name such as imatrix.gguf")
    if not out.parent.is_dir():
        raise DestinationError(out, f"folder {out.parent} does not exist")
    if n_ctx <= 0:
        raise CalibrationError(f"--ctx must be positive, got {n_ctx}")
    if from_chunk < 0 or output_frequency < 1 or save_frequency < 0:
        raise CalibrationError("--chunk and --save-frequency must be >= 0 and --output-frequency >= 1")
    stats = ImatrixStats(chunk_size=n_ctx, process_output=process_output)
    merge_files(stats, in_files)
    stats.last_chunk = stats.chunk_count

    def save(path: Path) -> None:
        entries = {name: (e.sums, e.counts) for name, e in stats.entries.items()}
        save_imatrix(path, entries, datasets=stats.datasets, chunk_count=stats.last_chunk,
                     chunk_size=n_ctx, output_format=fmt)

    def on_chunk(last: int, step: int) -> None:  # imatrix.cpp's two checks, in its order
        if (last % output_frequency) // step == 0:
            save(out)
        if save_frequency > 0 and (last % save_frequency) // step == 0:
            save(out.with_name(f"{out.name}.at_{last}"))

    stats.on_chunk = on_chunk
    t0 = time.perf_counter()
    n_chunks = tokens = 0
    if text is not None or not in_files:
        text_path = Path(text) if text is not None else default_calibration_path()
        body = read_text(text_path)
        # before hours of collection, not after: the file at most holds every weight llama.cpp
        # will multiply by, merged entries included (plus the old file until the rename)
        held = out.stat().st_size if out.is_file() else 0
        check_free_space(out.parent, imatrix_bytes_bound(model, stats) + held, what=out.name)
        with MatmulTap(model, select=stats.wants, sink=stats.add, n_ctx=n_ctx, n_batch=n_batch,
                       threads=threads) as tap:
            before = stats.chunk_count
            collect_imatrix(tap, body, n_ctx=n_ctx, chunks=chunks, process_output=process_output,
                            dataset=str(text if text is not None else text_path), stats=stats,
                            parse_special=parse_special, progress=progress, skip_chunks=from_chunk)
            n_chunks = stats.chunk_count - before
            tokens = n_chunks * n_ctx
    if not stats.entries:
        raise CalibrationError("nothing to write: no entries collected or merged")
    stats.last_chunk = max(stats.last_chunk, stats.chunk_count)
    save(out)
    return ImatrixResult(out, fmt, len(stats.entries), n_chunks, stats.chunk_count, n_ctx, tokens,
                         time.perf_counter() - t0, list(stats.datasets), stats.skew())


def imatrix_bytes_bound(model: str | Path, stats: ImatrixStats) -> int:
    """An upper bound on the imatrix file ``stats`` will be after collecting over ``model``: one
    f32 row of sums per matrix (and a count) for every weight ``stats.wants`` and every entry
    already merged, with a generous allowance per entry for names, tensor infos and padding."""
    from .gguf.header import parse_gguf  # the header only: the imatrix process stays without numba
    from .gguf.split import SPLIT_COUNT, SPLIT_NO, other_parts

    sizes = {name: e.sums.size + e.counts.size for name, e in stats.entries.items()}
    first = parse_gguf(Path(model))
    headers = [first]
    n_split, split_no = (first.fields.get(k) for k in (SPLIT_COUNT, SPLIT_NO))
    if n_split is not None and isinstance(n_split.value, int) and n_split.value > 1:
        headers += [parse_gguf(p) for p in other_parts(Path(model), n_split.value, int(split_no.value if split_no else 0))]
    for t in (t for h in headers for t in h.tensors):
        if len(t.shape) >= 2 and stats.wants(t.name):
            n_mat = t.shape[2] if len(t.shape) > 2 else 1
            sizes[t.name] = max(sizes.get(t.name, 0), n_mat * (t.shape[0] + 1))
    return 4 * sum(sizes.values()) + 512 * len(sizes) + sum(len(d) for d in stats.datasets) + (64 << 10)


# -- --imatrix auto ------------------------------------------------------------------------------------

def _fingerprint(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def auto_imatrix_path(model: str | Path, folder: str | Path) -> Path:
    return Path(folder) / f"{Path(model).stem}.imatrix.gguf"


def auto_imatrix(
    model: str | Path,
    folder: str | Path,
    *,
    text: str | Path | None = None,
    n_ctx: int = 512,
    chunks: int | None = None,
    threads: int | None = None,
    progress: Callable[[Progress], None] | None = None,
) -> ImatrixResult:
    """``--imatrix auto``: ``<folder>/<model>.imatrix.gguf`` collected on the shipped calibration
    text (or ``text``), reused while the model, the text and the settings are those it was made
    from (recorded beside it in ``<file>.json``)."""
    model = Path(model)
    out = auto_imatrix_path(model, folder)
    sidecar = out.with_name(out.name + ".json")
    text_path = Path(text) if text is not None else default_calibration_path()
    want = {
        "model": _fingerprint(model),
        "text_sha256": hashlib.sha256(read_text(text_path).encode("utf-8")).hexdigest(),
        "n_ctx": n_ctx, "chunks": chunks,
    }
    if out.is_file() and sidecar.is_file():
        try:
            have = json.loads(sidecar.read_text())
        except (OSError, ValueError):
            have = {}
        if have.get("inputs") == want and have.get("imatrix") == _fingerprint(out):
            r = have["result"]
            return ImatrixResult(out, "gguf", r["entries"], 0, r["chunk_count"], n_ctx, 0, 0.0,
                                 r["datasets"], r.get("skew", []), reused=True)
    result = make_imatrix(model, text_path, out, n_ctx=n_ctx, chunks=chunks, threads=threads,
                          output_format="gguf", progress=progress)
    record = {"inputs": want, "imatrix": _fingerprint(out),
              "result": {k: v for k, v in result.to_dict().items() if k in ("entries", "chunk_count", "datasets", "skew")}}
    tmp = sidecar.with_name(f".{sidecar.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, sidecar)
    return result


# -- quantize --refine -----------------------------------------------------------------------------------

DEFAULT_REFINE_CHUNKS = 32  # 16 k tokens of 512: XᵀX of full rank for inputs up to ~16 k wide


def hessian_bytes(model: str | Path) -> int:
    """Memory the per-layer XᵀX of ``model`` will take (float64; q/k/v and gate/up share one)."""
    from .gguf.source import GGUFSource

    shared = ("attn_k.", "attn_v.", "ffn_up.")
    with GGUFSource(model) as src:
        return sum(8 * t.shape[0] ** 2 for t in src.tensors
                   if t.name.startswith("blk.") and len(t.shape) == 2 and t.name.endswith(".weight")
                   and not any(f".{s}" in t.name for s in shared) and "norm" not in t.name)


def collect_hessians(
    model: str | Path,
    text: str | Path | None = None,
    *,
    n_ctx: int = 512,
    chunks: int | None = DEFAULT_REFINE_CHUNKS,
    threads: int | None = None,
    progress: Callable[[Progress], None] | None = None,
):
    """Each ``blk.*`` weight's H = 2/n·XᵀX over ``text`` (the shipped calibration text when None),
    from llama.cpp's forward pass of ``model``: what ``quantize --refine`` optimises against."""
    from .calib.refine import HessianStats
    from .calib.stats import run_chunks
    from .runtime.llama import MatmulTap

    need = hessian_bytes(model)
    avail = available_memory()
    if need > avail * 0.8:
        raise CalibrationError(
            f"{model}: --refine keeps every layer's input statistics, {need / 2**30:.1f} GiB, and "
            f"{avail / 2**30:.1f} GiB of memory is free; refine a smaller model or free memory"
        )
    text_path = Path(text) if text is not None else default_calibration_path()
    body = read_text(text_path)
    stats = HessianStats()
    with MatmulTap(model, select=stats.wants, sink=stats.add, n_ctx=n_ctx, threads=threads) as tap:
        run_chunks(tap, body, n_ctx=n_ctx, chunks=chunks, progress=progress, after_decode=stats.flush)
    stats.flush()
    if not stats.hessians:
        raise CalibrationError(f"{model}: no matrix multiplication with a 'blk.*' weight; nothing to refine against")
    return stats


def codec(qtype):
    """(encode(rows, importance) -> bytes, decode(bytes, shape) -> values) of a ggml type (``formats``)."""
    from .formats import get_format

    fmt = get_format(qtype)
    return (lambda w, imp: fmt.quantize(w, imp)), (lambda b, shape: fmt.dequantize(b, shape))


def fold_scales(src: str | Path, ftype, options, stats, *, shrink: float, threads: int = 1):
    """``calib.fold.search_folds`` over ``src`` for the types llama.cpp's mixture gives ``ftype``:
    the layers searched ``threads`` at a time (one BLAS thread each). None for an architecture
    without folds."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from threadpoolctl import threadpool_limits

    from .calib.fold import FOLDS, search_folds
    from .calib.refine import REFINABLE
    from .gguf.source import GGUFSource
    from .quantize import quantize_model

    with GGUFSource(src) as s:
        if s.arch not in FOLDS:
            return None
        plans = quantize_model(src, None, ftype, options=options, threads=1, force=True, dry_run=True).plans
        codecs = {p.name: codec(p.type) for p in plans if p.type in REFINABLE}
        shapes = {t.name: tuple(reversed(t.shape)) for t in s.tensors}  # (rows, cols) or (n,)
        n_layer = int(s.get(f"{s.arch}.block_count") or 0)
        n_head, n_kv = s.get(f"{s.arch}.attention.head_count"), s.get(f"{s.arch}.attention.head_count_kv")
        heads = (int(n_head), int(n_kv or n_head)) if isinstance(n_head, int) and isinstance(n_kv or n_head, int) else None

        def read(name: str):
            return np.asarray(s.read(name), np.float32)

        with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(max_workers=max(threads, 1)) as pool:
            return search_folds(s.arch, n_layer, read, codecs, stats.get, shrink=shrink, heads=heads,
                                shape=shapes.get, map_layers=pool.map)


def refine_model(
    src: str | Path,
    dst: str | Path | None,
    ftype,
    *,
    options=None,
    text: str | Path | None = None,
    chunks: int | None = DEFAULT_REFINE_CHUNKS,
    n_ctx: int = 512,
    damp: float = 0.01,
    weighting: str = "ldl",
    shrink: float | None = None,
    threads: int | None = None,
    force: bool = False,
    dry_run: bool = False,
    progress=None,
    chunk_progress: Callable[[Progress], None] | None = None,
    on_tensor=None,
    split_max_size: int = 0,
    stats=None,
    fold: bool = True,
):
    """``quantize --refine``: llama.cpp's per-tensor types for ``ftype`` (as with an imatrix), each
    refinable tensor encoded against its layer's XᵀX over the calibration text (calib.refine).
    ``stats``: HessianStats already collected (``collect_hessians``) for this model and text.
    ``shrink``: how far each XᵀX is pulled toward its diagonal before error feedback
    (``calib.refine.shrink_hessian``; None: ``DEFAULT_SHRINK``).
    ``fold``: first choose AWQ-style per-channel scales per decoder layer and fold them into the
    norms and matrices before (``calib.fold``; same tensors, types and bytes, the float model's
    function unchanged); architectures without a mapping in ``calib.fold.FOLDS`` are not folded.
    Returns the QuantizeResult, its ``refine`` dict filled in."""
    import time
    from dataclasses import replace

    from gguf import GGUFValueType

    from .calib.refine import DEFAULT_SHRINK, Refiner
    from .gguf.recipes import RecipeOptions
    from .quantize import quantize_model

    options = replace(options or RecipeOptions(), has_imatrix=True)
    if dry_run:
        result = quantize_model(src, dst, ftype, options=options, threads=threads or 1, force=True, dry_run=True,
                                split_max_size=split_max_size)
        result.refine = {"dry_run": True}
        return result
    if dst is not None:
        from .gguf.writer import check_destination

        check_destination(dst, force=force, src=src)  # a bad destination fails before the calibration
    t0 = time.perf_counter()
    text_path = Path(text) if text is not None else default_calibration_path()
    if stats is None:
        stats = collect_hessians(src, text_path, n_ctx=n_ctx, chunks=chunks, threads=threads, progress=chunk_progress)
    t_stats = time.perf_counter() - t0

    shrink = DEFAULT_SHRINK if shrink is None else shrink
    t1 = time.perf_counter()
    folded = fold_scales(src, ftype, options, stats, shrink=shrink, threads=threads or 1) if fold else None
    t_fold = time.perf_counter() - t1
    refiner = Refiner(stats, codec, damp=damp, weighting=weighting, shrink=shrink, on_tensor=on_tensor,
                      folded=folded)
    importance = {n: refiner.importance(n) for n in [*stats.hessians, *stats.alias]}
    n_tokens = max(stats.counts.values())
    n_folds = sum(r["alpha"] > 0 for r in folded.report) if folded is not None else 0
    settings = (f"gptq damp={damp} shrink={shrink} weighting={weighting} folds={n_folds} tokens={n_tokens} "
                f"ctx={n_ctx} text={text_path.name}")
    metadata = {"llmquant.refine": (settings, GGUFValueType.STRING)}
    result = quantize_model(src, dst, ftype, options=options, importance=importance, metadata=metadata,
                            threads=threads or 1, force=force, progress=progress, refine=refiner,
                            split_max_size=split_max_size, fold=folded)
    result.folded = folded
    order = {p.name: i for i, p in enumerate(result.plans)}
    reports = sorted(refiner.reports, key=lambda r: order.get(r.name, len(order)))  # refined two at a time
    result.seconds = time.perf_counter() - t0
    result.refine = {
        "settings": settings, "calibration_tokens": n_tokens, "statistics_seconds": round(t_stats, 2),
        "fold_seconds": round(t_fold, 2),
        "folds": folded.report if folded is not None else [],
        "hessian_bytes": stats.nbytes, "tensors_refined": sum(r.kept for r in reports),
        "tensors_kept_plain": sum(not r.kept for r in reports),
        "tensors": [r.to_dict() for r in reports],
    }
    return result
