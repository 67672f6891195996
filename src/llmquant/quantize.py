"""The quantize pipeline: source -> recipe -> formats -> writer, one tensor at a time.

Peak memory is one tensor's float32 copy plus its quantized bytes; the output is written
atomically (writer.py). Tensors whose planned type equals their stored type are copied as
bytes, as llama.cpp does.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterator, Mapping

import numpy as np
from gguf import GGUFValueType, LlamaFileType

from . import __version__
from .errors import LlmquantError, RequantizeError, TensorDataError
from .formats import get_format
from .gguf.imatrix import importance_for_plans
from .models import is_default_model
from .gguf.recipes import (
    RecipeOptions, TensorPlan, ftype_name, hparams_from_fields, in_load_order, plan_model,
    tensors_requiring_imatrix,
)
from .gguf.source import GGUFSource
from .gguf.writer import AtomicGGUFWriter, check_destination, tensor_nbytes

QUANTIZATION_VERSION = 2  # GGML_QNT_VERSION

ProgressFn = Callable[[int, int, TensorPlan], None]
RefineFn = Callable[[str, Any, np.ndarray, np.ndarray], "np.ndarray | None"]


def plan_type_counts(plans: list[TensorPlan]) -> dict[str, dict[str, int]]:
    """Tensors, bytes and parameters per ggml type of a plan."""
    out: dict[str, dict[str, int]] = {}
    for p in plans:
        entry = out.setdefault(p.type.name, {"tensors": 0, "bytes": 0, "params": 0})
        entry["tensors"] += 1
        entry["bytes"] += tensor_nbytes(p.shape, p.type)
        entry["params"] += int(np.prod(p.shape))
    return out


@dataclass
class QuantizeResult:
    source: str
    destination: str | None
    ftype: str
    plans: list[TensorPlan]
    source_bytes: int
    output_bytes: int  # tensor data bytes
    file_bytes: int | None  # bytes of the written file (None for a dry run)
    n_params: int
    seconds: float
    source_was_quantized: bool
    notes: list[str] = field(default_factory=list)
    importance_tensors: list[str] = field(default_factory=list)  # quantized with importance weights
    refine: dict | None = None  # quantize --refine: settings and per-tensor diagnostics
    folded: Any = field(default=None, repr=False)  # quantize --refine: the calib.fold.FoldedScales used

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.output_bytes / max(self.n_params, 1)

    @property
    def fallbacks(self) -> list[TensorPlan]:
        return [p for p in self.plans if p.fell_back]

    def type_counts(self) -> dict[str, dict[str, int]]:
        return plan_type_counts(self.plans)

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "destination": self.destination,
            "ftype": self.ftype,
            "n_params": self.n_params,
            "source_bytes": self.source_bytes,
            "output_tensor_bytes": self.output_bytes,
            "file_bytes": self.file_bytes,
            "bits_per_weight": round(self.bits_per_weight, 4),
            "seconds": round(self.seconds, 3),
            "source_was_quantized": self.source_was_quantized,
            "types": self.type_counts(),
            "fallbacks": [
                {"name": p.name, "shape": list(p.shape), "wanted": p.target.name, "used": p.type.name, "reason": p.reason}
                for p in self.fallbacks
            ],
            "notes": self.notes,
            "importance_tensors": len(self.importance_tensors),
            **({"refine": self.refine} if self.refine is not None else {}),
            "tensors": [
                {"name": p.name, "shape": list(p.shape), "source_type": p.src_type.name, "type": p.type.name,
                 "bytes": tensor_nbytes(p.shape, p.type), "reason": p.reason}
                for p in self.plans
            ],
        }


def plan_source(
    src: GGUFSource, ftype: LlamaFileType, options: RecipeOptions, *, dry_run: bool = False
) -> list[TensorPlan]:
    """llama.cpp's per-tensor types for ``src``; refuses (unless ``dry_run``) what llama.cpp refuses."""
    tensors = [(t.name, t.shape, t.type) for t in src.tensors]
    hparams = hparams_from_fields(src.arch, {k: f.value for k, f in src.fields.items()})
    try:
        return plan_model(tensors, src.arch, hparams, ftype, options, dry_run=dry_run)
    except RequantizeError as exc:
        raise RequantizeError(f"{src.path}: {exc}") from None


def quantize_model(
    src_path: str | Path,
    dst_path: str | Path | None,
    ftype: LlamaFileType,
    *,
    options: RecipeOptions | None = None,
    importance: Mapping[str, np.ndarray] | None = None,
    metadata: Mapping[str, tuple[Any, GGUFValueType]] | None = None,
    threads: int = 1,
    force: bool = False,
    dry_run: bool = False,
    progress: ProgressFn | None = None,
    split_max_size: int = 0,
    refine: RefineFn | None = None,
    fold=None,
) -> QuantizeResult:
    """Quantize the GGUF at ``src_path`` to ``ftype`` and write ``dst_path`` atomically.

    ``refine(name, type, rows, plain_bytes) -> bytes | None`` (``calib.refine.Refiner``) may replace
    a tensor's plain encoding by a calibrated one of the same type and size; ``fold``
    (``calib.fold.FoldedScales``, with ``refine`` only) rescales the tensors it names before that.

    ``split_max_size`` (bytes, > 0): llama.cpp's split files ``DST-00001-of-0000N.gguf`` with at
    most that many tensor bytes each (gguf-split --split-max-size); ``destination`` is the first.

    The embedded default model is Q4_1 already; it is always requantized from its F32 rendering
    (allow_requantize is implied for it and the result says so).

    ``importance`` maps tensor names to importance vectors (``imatrix.load_imatrix(f).entries``);
    ``metadata`` is extra key -> (value, type) written to the output (``Imatrix.provenance()``).
    """
    t0 = time.perf_counter()
    options = options or RecipeOptions()
    notes: list[str] = []
    with GGUFSource(src_path) as src:
        if is_default_model(src.path) and not options.allow_requantize:
            options = replace(options, allow_requantize=True)
        if src.is_quantized:
            kind = src.file_type.name.removeprefix("MOSTLY_") if src.file_type else "mixed types"
            notes.append(
                f"the source is itself quantized ({kind}): llmquant quantizes its F32 rendering, and quality "
                "losses measured against that source are optimistic"
            )
        if importance:  # llama.cpp: has_imatrix only when some entry was loaded
            options = replace(options, has_imatrix=True)
        # written in llama-quantize's order, not the source's (a convert_hf_to_gguf file's differs)
        plans = in_load_order(plan_source(src, ftype, options, dry_run=dry_run))
        weights = importance_for_plans(plans, importance, ftype)
        output_bytes = sum(tensor_nbytes(p.shape, p.type) for p in plans)
        result = QuantizeResult(
            source=str(src.path), destination=None if dry_run else str(dst_path), ftype=ftype_name(ftype),
            plans=plans, source_bytes=src.tensor_bytes, output_bytes=output_bytes, file_bytes=None,
            n_params=src.n_params, seconds=0.0, source_was_quantized=src.is_quantized, notes=notes,
            importance_tensors=list(weights),
        )
        if dry_run:
            need = [] if options.has_imatrix else tensors_requiring_imatrix(plans, ftype)  # load order: [0] is what a real run refuses
            if need:
                notes.append(
                    f"{len(need)} tensors would need an importance matrix (e.g. {need[0].name} as {need[0].type.name}): "
                    "without --imatrix this quantization is refused, as llama.cpp refuses it"
                )
            with _prepare_writer(src, Path("dry-run.gguf"), ftype, plans, importance, force=True, options=options,
                                 metadata=metadata, split_max_size=split_max_size) as writer:
                result.file_bytes = writer.planned_file_size()
            result.seconds = time.perf_counter() - t0
            return result
        if dst_path is None:
            raise ValueError("dst_path is required unless dry_run")
        dst = check_destination(dst_path, force=force, src=src.path)
        with _prepare_writer(src, dst, ftype, plans, importance, force=force, options=options, metadata=metadata,
                             split_max_size=split_max_size) as writer:
            writer.start()
            tensors = (_quantized_tensors(src, plans, weights, threads) if refine is None
                       else _refined_tensors(src, plans, weights, threads, refine, fold))
            for i, (p, data) in enumerate(zip(plans, tensors)):
                if progress:
                    progress(i, len(plans), p)
                writer.write_tensor(p.name, data)
            if progress:
                progress(len(plans), len(plans), plans[-1])
            writer.commit()
            parts = writer.destinations
        result.destination = str(parts[0])
        result.file_bytes = sum(p.stat().st_size for p in parts)
    result.seconds = time.perf_counter() - t0
    return result


def source_fingerprint(path: str | Path) -> str:
    """A cheap content fingerprint of a model file: size plus SHA-256 of its first and last 8 MiB
    (the header, the vocabulary and the tail of the tensor data); of every part of a split model."""
    path = Path(path)
    from .gguf.split import split_index, split_path

    parsed = split_index(path)
    if parsed is not None and parsed[1] == 0 and parsed[2] > 1:
        return hashlib.sha256("".join(_file_fingerprint(split_path(parsed[0], i, parsed[2]))
                                      for i in range(parsed[2])).encode()).hexdigest()[:32]
    return _file_fingerprint(path)


def _file_fingerprint(path: Path) -> str:
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(8 << 20))
        if size > 16 << 20:
            f.seek(size - (8 << 20))
            h.update(f.read())
    return h.hexdigest()[:32]


def importance_digest(importance: Mapping[str, np.ndarray] | None) -> str:
    """A short hash of importance vectors ('-' when none): outputs made with another imatrix differ."""
    if not importance:
        return "-"
    h = hashlib.sha256()
    for name in sorted(importance):
        h.update(name.encode())
        h.update(np.ascontiguousarray(importance[name], dtype=np.float32).tobytes())
    return h.hexdigest()[:16]


def recipe_key(ftype: LlamaFileType, options: RecipeOptions, importance: Mapping[str, np.ndarray] | None = None) -> str:
    """Everything besides the source that decides an output's bytes, as a stable string."""
    parts = [ftype_name(ftype), f"pure={options.pure}", f"output={options.quantize_output_tensor}",
             f"out_type={options.output_tensor_type.name if options.output_tensor_type else '-'}",
             f"embd_type={options.token_embedding_type.name if options.token_embedding_type else '-'}",
             "tt=" + ",".join(f"{p}={t.name}" for p, t in options.tensor_types),
             f"imatrix={importance_digest(importance)}", f"llmquant={__version__}"]
    return ";".join(parts)


def output_is_current(
    dst: str | Path, src: str | Path, ftype: LlamaFileType, options: RecipeOptions,
    importance: Mapping[str, np.ndarray] | None = None,
) -> bool:
    """True when ``dst`` is a complete llmquant output of ``src`` with the same recipe (reusable)."""
    try:
        with GGUFSource(dst) as out:
            fingerprint, recipe = out.get("llmquant.source_fingerprint"), out.get("llmquant.recipe")
    except LlmquantError:
        return False
    return fingerprint == source_fingerprint(src) and recipe == recipe_key(ftype, options, importance)


def _prepare_writer(
    src: GGUFSource, dst: Path, ftype: LlamaFileType, plans: list[TensorPlan],
    importance: Mapping[str, np.ndarray] | None, *, force: bool, options: RecipeOptions,
    metadata: Mapping[str, tuple[Any, GGUFValueType]] | None = None, split_max_size: int = 0,
) -> AtomicGGUFWriter:
    """A writer holding the output's metadata and tensor table (nothing written yet)."""
    writer = AtomicGGUFWriter(dst, src.arch, force=force, alignment=src.header.alignment, split_max_size=split_max_size)
    for f in src.fields.values():
        writer.add_field(f)
    writer.set("general.file_type", int(ftype), GGUFValueType.UINT32)
    writer.set("general.quantization_version", QUANTIZATION_VERSION, GGUFValueType.UINT32)
    writer.set("general.quantized_by", "llmquant", GGUFValueType.STRING)
    writer.set("llmquant.version", __version__, GGUFValueType.STRING)
    writer.set("llmquant.source_fingerprint", source_fingerprint(src.path), GGUFValueType.STRING)
    writer.set("llmquant.recipe", recipe_key(ftype, options, importance), GGUFValueType.STRING)
    if importance:  # as llama-quantize: a uint32, written only when entries were loaded
        writer.set("quantize.imatrix.entries_count", len(importance), GGUFValueType.UINT32)
    for key, (value, vtype) in (metadata or {}).items():
        writer.set(key, value, vtype)
    for p in plans:
        writer.add_tensor_info(p.name, p.shape, p.type)
    return writer


def _source_values(src: GGUFSource, plan: TensorPlan, *, always: bool = False) -> np.ndarray | None:
    """The float32 rows to quantize (None: the stored bytes are copied as they are, unless ``always``)."""
    if plan.type == plan.src_type and not always:
        return None
    values = src.read(plan.name)  # a copy: the mapped pages are not needed any more
    src.release(plan.name)
    finite = np.isfinite(values)
    if not finite.all():
        bad = np.argwhere(~finite)[0]
        n_bad = int((~finite).sum())
        raise TensorDataError(
            plan.name,
            f"{n_bad} values are NaN or Inf (first at index {tuple(int(i) for i in bad)}) in {src.path}; "
            "refusing to quantize",
        )
    return values.reshape(-1, plan.shape[0])


def _quantized_tensors(
    src: GGUFSource, plans: list[TensorPlan], importance: Mapping[str, np.ndarray], threads: int,
) -> Iterator[np.ndarray]:
    """Each plan's output bytes in order. The next tensor is read and dequantized on a helper
    thread while this one is quantized, so at most two tensors' float32 copies exist at once."""
    with ThreadPoolExecutor(max_workers=1) as reader, ThreadPoolExecutor(max_workers=max(threads, 1)) as workers:
        pending = reader.submit(_source_values, src, plans[0]) if plans else None
        for i, plan in enumerate(plans):
            rows = pending.result()
            pending = reader.submit(_source_values, src, plans[i + 1]) if i + 1 < len(plans) else None
            if rows is None:
                yield src.raw(plan.name)  # written out by the time the next one is asked for
                src.release(plan.name)
                continue
            yield _plain(plan, rows, importance, threads, workers)
            del rows


def _plain(plan: TensorPlan, rows: np.ndarray, importance: Mapping[str, np.ndarray], threads: int,
           pool: ThreadPoolExecutor | None) -> np.ndarray:
    """``rows`` in ``plan.type``, weighted by the plan's importance where the type uses one."""
    fmt = get_format(plan.type)
    weights = importance.get(plan.name) if fmt.uses_importance else None
    if weights is not None and weights.size != rows.shape[1]:
        # one slice of n_per_row values per expert (ne2), as llama-quant.cpp imatrix_for_row
        experts = rows.reshape(weights.size // rows.shape[1], -1, rows.shape[1])
        slices = weights.reshape(experts.shape[0], -1)
        return np.concatenate([fmt.quantize(e, w, threads=threads, pool=pool) for e, w in zip(experts, slices)])
    return fmt.quantize(rows, weights, threads=threads, pool=pool)


def _refined_tensors(
    src: GGUFSource, plans: list[TensorPlan], importance: Mapping[str, np.ndarray], threads: int,
    refine: RefineFn, fold=None,
) -> Iterator[np.ndarray]:
    """quantize --refine's tensors in order: each one read, plainly encoded and refined on one of
    ``threads`` workers, that many tensors at a time (a refinement is mostly one thread's work: its
    per-block scale search), so at most ``threads`` tensors' float32 copies exist at once; finished
    ones wait, as bytes, for the ones before them. A tensor ``fold`` touches is read, rescaled
    (``FoldedScales.apply``) and encoded even where its type does not change (a norm stays F32)."""

    from threadpoolctl import threadpool_limits

    def job(plan: TensorPlan) -> np.ndarray | None:
        folded = fold is not None and fold.touches(plan.name)
        rows = _source_values(src, plan, always=folded)
        if rows is None:
            return None
        if folded:
            rows = fold.apply(plan.name, rows)
        plain = _plain(plan, rows, importance, 1, None)
        better = refine(plan.name, plan.type, rows, plain)
        return plain if better is None else better

    n = max(threads, 1)
    ahead: deque[tuple[TensorPlan, Future]] = deque()
    # one BLAS thread per worker: OpenBLAS's own threads, spinning beside the other worker's scale
    # search, cost 25 % of the refine's time on 2 cores (57 s against 44 s for SmolLM2-135M Q4_K_M)
    with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(max_workers=n) as workers:
        try:
            for plan in plans:
                ahead.append((plan, workers.submit(job, plan)))
                if len(ahead) < 2 * n:  # a worker never waits for the oldest job's end
                    continue
                yield from _done(src, *ahead.popleft())
            while ahead:
                yield from _done(src, *ahead.popleft())
        finally:  # a failure (or the consumer stopping) leaves no tensor job running
            for _, fut in ahead:
                fut.cancel()


def _done(src: GGUFSource, plan: TensorPlan, fut: Future) -> Iterator[np.ndarray]:
    data = fut.result()
    if data is None:
        yield src.raw(plan.name)  # written out by the time the next one is asked for
        src.release(plan.name)
    else:
        yield data
