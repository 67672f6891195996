"""The main job: quantize a model to every rung, measure each against the source (its F32
rendering when the source is itself quantized), time it, and say which rung to use here and why.
Orchestration only: quantize.py, eval.py, bench.py and fit.py do the work; report.py renders the
result; resume.py records finished work so that an interrupted ladder picks up where it stopped."""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from gguf import LlamaFileType

from .. import __version__
from ..errors import DestinationError, LadderError, LlmquantError
from ..system import check_disk_space, default_threads
from ..store import resolve_model
from ..quantize import QuantizeResult, output_is_current, quantize_model, recipe_key, source_fingerprint
from .resume import LadderState, fingerprint, folder_fingerprint, text_digest
from ..gguf.recipes import RecipeOptions, ftype_name, parse_ftype, tensors_requiring_imatrix
from ..gguf.source import GGUFSource

DEFAULT_RUNGS = ("F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K")
# the IQ files published beside the K-quants, made with an importance matrix: they join the
# default rungs when the ladder has one (--imatrix), each after the K/legacy rung just above it
# in bits per weight (IQ4_XS 4.25 after Q4_0 4.5, IQ3_M 3.7 after Q3_K_M, IQ2_M 2.7 after Q2_K)
IMATRIX_RUNGS = (("IQ4_XS", "Q4_0"), ("IQ3_M", "Q3_K_M"), ("IQ2_M", "Q2_K"))


def default_rungs(with_imatrix: bool = False) -> tuple[str, ...]:
    """The ladder's rungs when none are named: DEFAULT_RUNGS, plus IMATRIX_RUNGS with an imatrix."""
    if not with_imatrix:
        return DEFAULT_RUNGS
    after = {prev: name for name, prev in IMATRIX_RUNGS}
    return tuple(r for rung in DEFAULT_RUNGS for r in (rung, after.get(rung)) if r)


KEEP_CHOICES = ("all", "best", "none")
KEEP_ALL_BELOW = 3e9  # parameters: above, every rung file together passes ~20 GB; keep the recommended one

Step = Callable[[str, float | None], None]  # (description, fraction done or None)


@dataclass
class RungResult:
    name: str
    path: str
    reused: bool
    file_bytes: int
    bits_per_weight: float
    quantize_seconds: float
    types: dict[str, dict[str, int]]
    fallback_share: float  # share of quantized weights stored in a fallback type
    fallbacks: dict[str, int]  # "Q4_K -> Q5_0": tensors
    eval: dict = field(default_factory=dict)
    speed: dict = field(default_factory=dict)
    fit: dict = field(default_factory=dict)  # llmquant fit's row for this rung on this machine
    resumed: bool = False  # measurements taken from ladder-state.json (an earlier, interrupted run)
    kept: bool = True  # the file is still on disk (--keep)
    format: str = "gguf"  # gguf, nf4 (measure/formats.py)
    runtime: str = "llama.cpp"  # what measured it here
    engines: str = "llama.cpp, Ollama, LM Studio"  # what loads it
    memory_bytes: int | None = None  # weights in memory as loaded (HF formats)

    def main_types(self, limit: int = 2) -> str:
        total = sum(e["params"] for e in self.types.values()) or 1
        ranked = sorted(self.types.items(), key=lambda kv: -kv[1]["params"])[:limit]
        return ", ".join(f"{100 * e['params'] / total:.0f}% {name}" for name, e in ranked)


@dataclass
class LadderResult:
    model: str
    model_name: str | None
    source_type: str | None
    source_was_quantized: bool
    base: str
    base_type: str
    ctx: int
    chunks: int | None
    text: str
    threads: int
    rungs: list[RungResult]
    inversions: list[str]
    recommendation: str | None
    reasons: list[str]
    machine: dict
    fit_ctx: int | None
    notes: list[str]
    seconds: float
    out_dir: str
    base_logits: str | None = None
    keep: str = "all"
    offload: dict | None = None  # runtime.llama.Offload.to_dict(): layers on GPU / CPU in eval and speed
    formats: list[str] = field(default_factory=lambda: ["gguf"])

    def to_dict(self) -> dict:
        return asdict(self)


def _quantize(src: Path, dst: Path, ftype: LlamaFileType, threads: int, imat=None, *, hessians=None,
              calib=None) -> tuple[QuantizeResult, bool]:
    """The rung's file (reused when current), plain, with ``imat``, or refined against ``hessians``
    (``calibrate.collect_hessians``; never reused: its recipe is not in the file's key)."""
    options = RecipeOptions(allow_requantize=True)
    weighting = {"importance": imat.entries, "metadata": imat.provenance()} if imat is not None else {}
    if hessians is None and dst.exists() and output_is_current(dst, src, ftype, options, weighting.get("importance")):
        return quantize_model(src, None, ftype, options=options, dry_run=True, **weighting), True
    planned = quantize_model(src, None, ftype, options=options, dry_run=True, **weighting)
    check_disk_space(dst.parent, planned.file_bytes or planned.output_bytes, f"{ftype_name(ftype)} file {dst.name}")
    if hessians is not None:
        from ..calibrate import refine_model

        return refine_model(src, dst, ftype, options=options, text=calib, threads=threads, force=True,
                            stats=hessians), False
    return quantize_model(src, dst, ftype, options=options, threads=threads, force=True, **weighting), False


# rungs an importance matrix changes: K and legacy quants (Q8_0 and the float types ignore it)
_NO_IMATRIX = {"F32", "F16", "BF16", "Q8_0"}
IMAT_SUFFIX = "+imat"
REFINE_SUFFIX = "+refine"
_NO_REFINE = {"F32", "F16", "BF16"}


def _units(ftypes: list[tuple[str, LlamaFileType]], out: Path, stem: str, imatrix: bool,
           refine: bool) -> list[tuple[str, LlamaFileType, str | None, Path]]:
    """The files the ladder makes, in order: (row name, file type, None / "imat" / "refine", path).
    With an importance matrix every K / legacy rung is also made with it, and an IQ rung only with it."""
    units = []
    for name, ftype in ftypes:
        if not (imatrix and name.startswith("IQ")):
            units.append((name, ftype, None, out / f"{stem}-{name}.gguf"))
        if imatrix and name not in _NO_IMATRIX:
            units.append((name + IMAT_SUFFIX, ftype, "imat", out / f"{stem}-{name}-imat.gguf"))
        if refine and name not in _NO_REFINE:
            units.append((name + REFINE_SUFFIX, ftype, "refine", out / f"{stem}-{name}-refine.gguf"))
    return units


def _check_space(src: Path, outputs: list[tuple[Path, LlamaFileType]]) -> None:
    """Before writing anything: room for every file still to write (their exact planned sizes; a
    stale file being replaced needs room for one temporary copy at a time)."""
    from ..gguf.writer import check_free_space

    options = RecipeOptions(allow_requantize=True)
    new, replaced = 0, 0
    sizes: dict[LlamaFileType, int] = {}  # a rung and its +imat / +refine files: one plan
    for path, ftype in outputs:
        if path.exists() and output_is_current(path, src, ftype, options):
            continue
        if ftype not in sizes:
            sizes[ftype] = quantize_model(src, None, ftype, options=options, dry_run=True).file_bytes or 0
        size = sizes[ftype]
        if path.exists():
            replaced = max(replaced, size)
        else:
            new += size
    if new or replaced:
        check_free_space(outputs[0][0].parent, new + replaced, what=f"the ladder's {len(outputs)} files")


def _rung(name: str, path: Path, q: QuantizeResult, reused: bool) -> RungResult:
    quantized = [p for p in q.plans if p.quantizable]
    total = sum(math.prod(p.shape) for p in quantized) or 1
    fallbacks: dict[str, int] = {}
    for p in q.fallbacks:
        key = f"{p.target.name} -> {p.type.name}"
        fallbacks[key] = fallbacks.get(key, 0) + 1
    return RungResult(
        name=name, path=str(path), reused=reused, file_bytes=path.stat().st_size,
        bits_per_weight=q.bits_per_weight, quantize_seconds=0.0 if reused else q.seconds,
        types=q.type_counts(), fallback_share=sum(math.prod(p.shape) for p in q.fallbacks) / total,
        fallbacks=fallbacks,
    )


class _Progress:
    """The ladder's steps with an overall fraction: each unit of work weighs its model's bytes
    (decoding and quantizing are linear in them)."""

    def __init__(self, step: Step, weights: dict[str, float]):
        self.step, self.weights = step, weights
        self.total = sum(weights.values()) or 1.0
        self.done = 0.0

    def __call__(self, desc: str, unit: str | None = None, part: float = 0.0) -> None:
        extra = self.weights.get(unit, 0.0) * part if unit else 0.0
        self.step(desc, min((self.done + extra) / self.total, 1.0))

    def finish(self, unit: str) -> None:
        self.done += self.weights.get(unit, 0.0)


def as_gguf(model: str | Path | None, out: Path, threads: int, state: LadderState | None = None,
            notes: list[str] | None = None, step: Step | None = None) -> Path:
    """A model argument as a GGUF path: a Hugging Face folder is converted once into ``out`` (at
    the precision its weights are stored in), and reused while the folder is unchanged."""
    src = resolve_model(model)
    if not src.is_dir():
        return src
    from ..convert import convert_model, default_output_name
    from ..hf.source import HFSource

    with HFSource(src) as hf:
        # at the stored precision: convert's "auto" would round F32 weights to F16
        stored = next((t.src_dtype for t in hf.tensors if t.src_dtype != "generated" and len(t.shape) >= 2), None)
        ftype = LlamaFileType.ALL_F32 if stored == "F32" else hf.guessed_ftype()
        dst = out / default_output_name(hf, ftype)
        need = sum(t.n_elements for t in hf.tensors) * (4 if ftype == LlamaFileType.ALL_F32 else 2)
    key = fingerprint("convert", folder_fingerprint(src), ftype_name(ftype), __version__)
    if state is not None and state.get("convert", key) and dst.is_file():
        return dst
    check_disk_space(out, need, f"conversion of {src.name}")
    if step:
        step(f"convert {src.name} -> {dst.name}", None)
    convert_model(src, dst, ftype, threads=threads, force=True)
    if state is not None:
        state.put("convert", key, {"path": str(dst)})
    if notes is not None:
        notes.append(f"converted the Hugging Face folder {src} to {dst.name} ({ftype_name(ftype)}) once")
    return dst


def run_ladder(
    model: str | Path | None = None,
    *,
    rungs: tuple[str, ...] | None = None,
    out_dir: str | Path = "ladder-out",
    text: str | Path | None = None,
    ctx: int = 512,
    chunks: int | None = None,
    threads: int | None = None,
    speed: bool = True,
    fit_ctx: int | None = None,
    machine: str = "this",
    step: Step | None = None,
    keep: str | None = None,
    options=None,
    imatrix: str | Path | None = None,
    formats: tuple[str, ...] = ("gguf",),
    refine: bool = False,
    calib: str | Path | None = None,
) -> LadderResult:
    """Quantize ``model`` (GGUF, stored name or Hugging Face folder) to every rung and measure each
    against the base, one rung at a time: peak memory is the largest single model plus a chunk of
    logits. The base's log-probabilities are computed once and stored in ``out_dir`` in
    llama-perplexity's --kl-divergence-base format; finished work is recorded in
    ``ladder-state.json`` there, so a rerun after an interruption redoes only what is unfinished.
    ``keep``: which rung files stay, "all", "best" (the recommended one) or "none"; default "all"
    below KEEP_ALL_BELOW parameters, "best" above.
    ``options``: a runtime.llama.LoadOptions (GPU layers, ...) for evaluation and speed.
    ``rungs``: None for ``default_rungs(imatrix is not None)``.
    ``imatrix``: None (no importance rungs), "auto" (collected from the base on the shipped
    calibration text, into ``out_dir``, reused while current) or an imatrix file; then every K /
    legacy rung is also made with it (``Q4_K_M+imat``) and an IQ rung is made only with it
    (``IQ2_M+imat``: the way IQ files are published). A rung whose type llama.cpp refuses to make
    without an importance matrix (IQ2_M, IQ3_XXS, ...) is refused before any work when there is none.
    ``refine``: every quantized rung is also made with ``quantize --refine`` (``Q4_K_M+refine``),
    against each layer's input statistics over ``calib`` (the shipped calibration text when None),
    collected once from the base.
    ``formats``: with an HF folder, the HF formats measured beside the GGUF rungs (gguf, nf4)."""
    from . import formats as hf_formats
    from .eval import evaluate_against_logits, load_text, write_base_logits
    from .logits_file import LogitsFile

    t0 = time.perf_counter()
    step = step or (lambda desc, frac: None)
    threads = default_threads(threads)
    formats = hf_formats.parse_formats(formats)
    model_path = resolve_model(model)
    out = Path(out_dir)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(out)
    state = LadderState(out)
    notes: list[str] = []
    hf_dir = model_path if model_path.is_dir() else None
    if hf_dir is None and set(formats) - {"gguf"}:
        raise LlmquantError(f"--formats {','.join(formats)} needs a Hugging Face folder as the model, got {model_path.name}")
    if rungs is None:
        rungs = default_rungs(imatrix is not None)
    if "gguf" not in formats:
        rungs = ()
    ftypes = [(name.upper(), parse_ftype(name)) for name in rungs]
    src = as_gguf(model_path, out, threads, state, notes, step)
    with GGUFSource(src) as s:
        stem = (s.get("general.name") or src.stem).replace(" ", "-")
        model_name = s.get("general.name")
        source_type = ftype_name(s.file_type) if s.file_type is not None else None
        source_was_quantized = s.is_quantized
        n_params = s.n_params
        trained_ctx = int(s.arch_get("context_length") or 4096)
    if keep is None:
        keep = "all" if n_params < KEEP_ALL_BELOW else "best"
        if keep == "best":
            notes.append(f"--keep best (the default above {KEEP_ALL_BELOW / 1e9:.0f}B parameters): only the "
                         "recommended rung's file stays; the others are deleted once measured")
    if keep not in KEEP_CHOICES:
        raise LadderError(f"--keep must be one of {', '.join(KEEP_CHOICES)}, got {keep!r}")
    src_fp = source_fingerprint(src)
    plans = {name: quantize_model(src, None, ftype, options=RecipeOptions(allow_requantize=True), dry_run=True)
             for name, ftype in ftypes}

    # the base of every comparison: the source itself at 16/32-bit precision; the F32 rendering of
    # a quantized source (F16 where memory is short)
    if not source_was_quantized:
        base_path, base_name = src, source_type or "source"
    else:
        base_ftype = LlamaFileType.ALL_F32
        try:
            avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            if n_params * 4 * 3 > avail:
                base_ftype = LlamaFileType.MOSTLY_F16
                notes.append("the base is the F16 rendering of the source: its F32 rendering would not fit in memory")
        except (ValueError, OSError):
            pass
        base_name = ftype_name(base_ftype)
        base_path = out / f"{stem}-{base_name}.gguf"
    planned_units = _units(ftypes, out, stem, imatrix is not None, refine)
    try:  # every rung can be made, and there is room for every file still to write, before writing any
        for name, ftype in ftypes if imatrix is None else ():
            needy = tensors_requiring_imatrix(plans[name].plans, ftype)
            if needy:
                raise LadderError(f"rung {name}: llama.cpp makes {needy[0].name} ({needy[0].type.name}) only with an "
                                  "importance matrix; add --imatrix auto (or a file), or drop the rung")
        _check_space(src, ([(base_path, base_ftype)] if source_was_quantized else [])
                     + [(path, ftype) for _, ftype, _, path in planned_units])
    except (DestinationError, LadderError):
        if created:  # leave no trace
            shutil.rmtree(out, ignore_errors=True)
        raise
    if source_was_quantized:
        step(f"base: {base_name} rendering of the source", 0.0)
        _quantize(src, base_path, base_ftype, threads)
        notes.append(
            f"the source file is itself quantized ({source_type}); every rung is re-quantized from its "
            f"{base_name} rendering, so the losses shown are optimistic compared with quantizing the original weights"
        )
    imat = None
    if imatrix is not None:
        from ..gguf.imatrix import load_imatrix

        if str(imatrix) == "auto":
            from ..calibrate import auto_imatrix

            step("imatrix: collect on the calibration text", None)
            made = auto_imatrix(base_path, out, threads=threads)
            notes.append(f"importance matrix {made.path} ({'reused' if made.reused else 'collected'} from the "
                         f"{base_name} base over {made.chunk_count} chunks of the calibration text)")
            imatrix = made.path
        imat = load_imatrix(imatrix)
    # (rung name, file type, importance matrix or None or "refine", file)
    units = [(name, ftype, imat if kind == "imat" else kind, path) for name, ftype, kind, path in planned_units]
    hessians = None
    refine_tag = ""
    if refine:
        from ..calibrate import DEFAULT_REFINE_CHUNKS
        from ..calib.stats import default_calibration_path, read_text

        calib_text = Path(calib) if calib is not None else default_calibration_path()
        refine_tag = f";refine=gptq;calib={text_digest(read_text(calib_text))};chunks={DEFAULT_REFINE_CHUNKS}"

    # the base's log-probabilities, once per (base, text, ctx, chunks)
    content, _ = load_text(text)
    logits_key = fingerprint("base-logits", source_fingerprint(base_path), text_digest(content), ctx, chunks)
    logits_path = out / f"{stem}-base-ctx{ctx}.kld"
    plain_name = lambda n: n.removesuffix(IMAT_SUFFIX).removesuffix(REFINE_SUFFIX)  # noqa: E731
    progress = _Progress(step, {"base": float(Path(base_path).stat().st_size),
                                **{u[0]: float(plans[plain_name(u[0])].file_bytes or
                                               plans[plain_name(u[0])].output_bytes) for u in units}})
    if not (state.get("base-logits", logits_key) and _logits_ok(logits_path, LogitsFile)):
        def before_write(nbytes: int) -> None:
            step(f"base logits: {nbytes / 2**20:,.0f} MiB to {logits_path.name} (llama-perplexity's "
                 "--kl-divergence-base format)", 0.0)
            check_disk_space(out, nbytes, f"base logits {logits_path.name}")

        write_base_logits(base_path, logits_path, text, ctx, chunks, threads, before_write=before_write,
                          progress=lambda i, n: progress(f"base logits: chunk {i}/{n}", "base", i / n),
                          options=options)
        state.put("base-logits", logits_key, {"path": str(logits_path)})
    progress.finish("base")
    logits_bytes = logits_path.stat().st_size

    machine_info, fit_ctx, fits = _fit_table(src, [n for n, _ in ftypes], fit_ctx or min(trained_ctx, 8192),
                                             machine, notes)
    results: list[RungResult] = []
    n_chunks = None
    for name, ftype, rung_imat, path in units:
        recipe = RecipeOptions(allow_requantize=True)
        refined = isinstance(rung_imat, str)
        importance = rung_imat.entries if rung_imat is not None and not refined else None
        key = fingerprint("rung", src_fp, recipe_key(ftype, recipe, importance) + (refine_tag if refined else ""),
                          logits_key)
        rec = state.get(f"rung:{name}", key)
        if rec is not None and speed and not rec.get("speed"):
            rec = None  # measured without --speed before: measure again, with it
        if rec is not None:
            r = RungResult(**{**rec, "resumed": True})
            r.kept = path.is_file()
            progress(f"{name}: measured before, reused", name)
        else:
            if refined:
                from ..calibrate import collect_hessians

                if hessians is None:
                    progress(f"refine: layer statistics of the {base_name} base on the calibration text", name)
                    hessians = collect_hessians(base_path, calib, threads=threads)
                progress(f"quantize {name} (refined)", name, 0.1)
                q, reused = _quantize(src, path, ftype, threads, hessians=hessians, calib=calib)
            else:
                progress(f"quantize {name}" + (" with the imatrix" if rung_imat else ""), name)
                q, reused = _quantize(src, path, ftype, threads, rung_imat)
            r = _rung(name, path, q, reused)
            r.eval = evaluate_against_logits(
                path, logits_path, threads=threads, options=options,
                progress=lambda i, n, nm=name: progress(f"evaluate {nm}: chunk {i}/{n}", nm, 0.3 + 0.5 * i / n),
            ).to_dict()
            if speed:
                from .bench import probe

                progress(f"speed {name}", name, 0.85)
                r.speed = probe(r.path, n_prompt=128, n_gen=32, repetitions=2, threads=threads,
                                options=options).to_dict()
            state.put(f"rung:{name}", key, {k: v for k, v in asdict(r).items() if k not in ("fit", "resumed", "kept")})
        r.fit = fits.get(plain_name(name), {})
        n_chunks = r.eval.get("n_chunks", n_chunks)
        results.append(r)
        progress.finish(name)
        _apply_keep(keep, results, n_params, machine_info, fit_ctx, src, base_path)
    step("recommend", 1.0)
    if hf_dir is not None and set(formats) - {"gguf"}:
        results += [RungResult(**row) for row in hf_formats.hf_rungs(
            hf_dir, formats, base_path, out, text=text, ctx=ctx, chunks=chunks, threads=threads, speed=speed, step=step)]
        notes += hf_formats.format_notes(formats)
    inversions = find_inversions(results, source_type if source_was_quantized else None)
    recommendation, reasons = recommend(results, model_params=n_params, machine=machine_info, fit_ctx=fit_ctx)
    if keep != "all":
        notes.append(f"kept rung files (--keep {keep}): " + (", ".join(r.name for r in results if r.kept) or "none"))
    notes.append(f"base logits: {logits_path.name}, {logits_bytes / 2**20:,.0f} MiB "
                 "(reusable: llama-perplexity --kl-divergence-base FILE --kl-divergence, llmquant eval --base-logits FILE)")
    text_name = str(text) if text else "llmquant built-in evaluation text"
    return LadderResult(
        model=str(src), model_name=model_name, source_type=source_type,
        source_was_quantized=source_was_quantized, base=str(base_path), base_type=base_name,
        ctx=ctx, chunks=n_chunks if n_chunks is not None else chunks, text=text_name, threads=threads, rungs=results,
        inversions=inversions, recommendation=recommendation, reasons=reasons, notes=notes,
        machine=machine_info, fit_ctx=fit_ctx,
        seconds=time.perf_counter() - t0, out_dir=str(out), base_logits=str(logits_path), keep=keep,
        offload=results[0].eval.get("offload") if results else None,
        formats=list(formats),
    )


def _remove_stale_partials(out: Path) -> None:
    """Temporary files a killed run left behind (writers name them .llmquant-partial-PID-...;
    a file whose process is gone can never be committed)."""
    for p in out.glob(".llmquant-partial-*"):
        pid = p.name.removeprefix(".llmquant-partial-").split("-")[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            p.unlink(missing_ok=True)
        except PermissionError:
            pass  # someone else's live process


def _logits_ok(path: Path, reader) -> bool:
    try:
        reader(path).close()
        return True
    except LlmquantError:
        return False


def _apply_keep(keep: str, rungs: list[RungResult], n_params: int, machine: dict, fit_ctx: int | None,
                src: Path, base: Path) -> None:
    """Delete the rung files ``keep`` does not keep. For "best", the provisional recommendation
    over the rungs measured so far stays (a later rung replaces it only by being recommended)."""
    if keep == "all":
        return
    pick = recommend(rungs, model_params=n_params, machine=machine, fit_ctx=fit_ctx)[0] if keep == "best" else None
    for r in rungs:
        path = Path(r.path)
        if r.name == pick or not r.kept or path.resolve() in (src.resolve(), Path(base).resolve()):
            continue
        path.unlink(missing_ok=True)
        r.kept = False


def _fit_table(src: Path, names: list[str], n_ctx: int, machine: str,
               notes: list[str]) -> tuple[dict, int | None, dict[str, dict]]:
    """llmquant fit's memory and speed bound for an ``n_ctx``-token context, per rung (metadata only)."""
    from ..fit.planner import fit, resolve_machine
    from ..fit.catalog import load_spec

    try:
        report = fit(load_spec(str(src)), resolve_machine(machine, None, None), n_ctx=n_ctx, ladder=names).to_dict()
    except LlmquantError as exc:
        notes.append(f"fit could not size the rungs: {exc}")
        return {}, None, {}
    by_name = {}
    for row in report["rungs"]:
        by_name[row["ftype"]] = {k: row[k] for k in ("total_bytes", "fits", "tight", "headroom_bytes", "tok_s",
                                                      "max_ctx", "placement", "usable_bytes")}
    return report["machine"], n_ctx, by_name


def _fit_rungs(src: Path, rungs: list[RungResult], n_ctx: int, machine: str,
               notes: list[str]) -> tuple[dict, int | None]:
    """Attach llmquant fit's memory and speed bound for an ``n_ctx``-token context to every rung."""
    machine_info, n_ctx_used, by_name = _fit_table(src, [r.name for r in rungs], n_ctx, machine, notes)
    for r in rungs:
        r.fit = by_name.get(r.name, {})
    return machine_info, n_ctx_used


def find_inversions(rungs: list[RungResult], source_type: str | None) -> list[str]:
    """Pairs where a larger file measures clearly worse than a smaller one, explained from the
    per-tensor types rather than left to the reader."""
    out = []
    by_size = sorted(rungs, key=lambda r: r.file_bytes)
    for i, small in enumerate(by_size):
        for big in by_size[i + 1:]:
            ks, kb = small.eval.get("kld_mean"), big.eval.get("kld_mean")
            es, eb = small.eval.get("kld_err", 0.0), big.eval.get("kld_err", 0.0)
            if ks is None or kb is None or kb <= ks + 2 * (es + eb):
                continue
            why = (
                f"{big.name} ({big.file_bytes / 2**20:.1f} MiB) measures worse than {small.name} "
                f"({small.file_bytes / 2**20:.1f} MiB): KLD {kb:.4f} vs {ks:.4f}. Their weights are mostly "
                f"not in the types their names suggest: {big.name} = {big.main_types()}, "
                f"{small.name} = {small.main_types()}"
            )
            falls = [r for r in (big, small) if r.fallback_share > 0.5]
            if falls:
                why += (" — " + ", ".join(f"{r.name} has {100 * r.fallback_share:.0f}% of its weights in fallback types "
                                            f"({'; '.join(f'{n} x {k}' for k, n in r.fallbacks.items())})" for r in falls))
            if source_type:
                why += (f". The source weights already sit on a {source_type} grid, so how well a 32-block type "
                        "re-grids them matters more than its nominal bits")
            out.append(why + ".")
    return out


def recommend(rungs: list[RungResult], model_params: int, machine: dict | None = None,
              fit_ctx: int | None = None) -> tuple[str | None, list[str]]:
    """The smallest rung whose quality loss stays within the threshold for this model size
    (the seeds' rule: Q8_0 near-lossless, Q5_K_M/Q4_K_M the sweet spot, Q3 and below noticeable;
    small models lose proportionally more at low bits, so they get a stricter threshold)."""
    small_model = model_params < 3e9
    limit = 0.01 if small_model else 0.03  # allowed PPL increase
    kld_limit = 0.02 if small_model else 0.05
    measured = [r for r in rungs if r.eval.get("ppl_ratio") is not None]
    if not measured:
        return None, ["no rung could be evaluated"]
    too_big = [r for r in measured if r.fit and not r.fit["fits"]]
    measured = [r for r in measured if not (r.fit and (not r.fit["fits"] or r.fit["tight"]))] or measured
    good = [r for r in measured if r.eval["ppl_ratio"] - 1 <= limit and r.eval["kld_mean"] <= kld_limit]
    reasons = []
    if not good:
        best = min(measured, key=lambda r: r.eval["kld_mean"])
        return best.name, [f"no rung stays within +{100 * limit:.0f}% perplexity; {best.name} loses least"]
    pick = min(good, key=lambda r: r.file_bytes)
    e = pick.eval
    reasons.append(
        f"{pick.name} is the smallest rung that stays within +{100 * limit:.0f}% perplexity and KLD {kld_limit}: "
        f"{pick.file_bytes / 2**20:.1f} MiB, {pick.bits_per_weight:.2f} bpw, PPL x{e['ppl_ratio']:.4f}, "
        f"KLD {e['kld_mean']:.4f}, same top token {e['top1']:.1f}%"
    )
    smaller = [r for r in measured if r.file_bytes < pick.file_bytes]
    if smaller:
        nxt = max(smaller, key=lambda r: r.file_bytes)
        reasons.append(
            f"the next smaller rung, {nxt.name}, loses more: PPL x{nxt.eval['ppl_ratio']:.4f}, KLD {nxt.eval['kld_mean']:.4f}"
        )
    if pick.fit:
        name = (machine or {}).get("name") or "this machine"
        name = "this machine" if name == "this" else name
        reasons.append(
            f"on {name} it needs {pick.fit['total_bytes'] / 2**20:.0f} MiB with a {fit_ctx}-token context "
            f"({pick.fit['headroom_bytes'] / 2**30:.1f} GiB to spare); memory bandwidth bounds generation at "
            f"~{pick.fit['tok_s']:.0f} tok/s"
        )
    if too_big:
        reasons.append("does not fit here: " + ", ".join(r.name for r in too_big))
    if small_model:
        reasons.append(
            f"with {model_params / 1e6:.0f}M parameters this is a small model, which loses proportionally more at "
            "low bits, so the threshold is stricter than the usual Q4_K_M sweet spot"
        )
    return pick.name, reasons
