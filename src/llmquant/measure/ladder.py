"""The main job: quantize a model to every rung, measure each against the F32 rendering of the
source, time it, and say which rung to use here and why. Orchestration only: quantize.py,
eval.py, bench.py and fit.py do the work; report.py renders the result."""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from gguf import LlamaFileType

from ..errors import LlmquantError
from ..system import default_threads
from ..store import resolve_model
from ..quantize import QuantizeResult, output_is_current, quantize_model
from ..gguf.recipes import RecipeOptions, ftype_name, parse_ftype
from ..gguf.source import GGUFSource

DEFAULT_RUNGS = ("F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K")

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
    formats: list[str] = field(default_factory=lambda: ["gguf"])

    def to_dict(self) -> dict:
        return asdict(self)


def _quantize(src: Path, dst: Path, ftype: LlamaFileType, threads: int) -> tuple[QuantizeResult, bool]:
    options = RecipeOptions(allow_requantize=True)
    if dst.exists() and output_is_current(dst, src, ftype, options):
        return quantize_model(src, None, ftype, options=options, dry_run=True), True
    return quantize_model(src, dst, ftype, options=options, threads=threads, force=True), False


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


def run_ladder(
    model: str | Path | None = None,
    *,
    rungs: tuple[str, ...] = DEFAULT_RUNGS,
    out_dir: str | Path = "ladder-out",
    text: str | Path | None = None,
    ctx: int = 512,
    chunks: int | None = None,
    threads: int | None = None,
    speed: bool = True,
    fit_ctx: int | None = None,
    machine: str = "this",
    step: Step | None = None,
    formats: tuple[str, ...] = ("gguf",),
) -> LadderResult:
    from .eval import evaluate_many
    from . import formats as hf_formats

    t0 = time.perf_counter()
    step = step or (lambda desc, frac: None)
    threads = default_threads(threads)
    formats = hf_formats.parse_formats(formats)
    src = resolve_model(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf_dir = src if src.is_dir() else None
    if hf_dir is None and set(formats) - {"gguf"}:
        raise LlmquantError(f"--formats {','.join(formats)} needs a Hugging Face folder as the model, got {src.name}")
    if hf_dir is not None:  # the HF folder converted once into the out folder, at its own precision
        step("convert the HF folder to GGUF", None)
        src = hf_formats.gguf_source(hf_dir, out, threads)
    if "gguf" not in formats:
        rungs = ()
    ftypes = [(name.upper(), parse_ftype(name)) for name in rungs]
    with GGUFSource(src) as s:
        stem = (s.get("general.name") or src.stem).replace(" ", "-")
        model_name = s.get("general.name")
        source_type = ftype_name(s.file_type) if s.file_type is not None else None
        source_was_quantized = s.is_quantized
        n_params = s.n_params
        trained_ctx = int(s.arch_get("context_length") or 4096)
    f32_bytes = n_params * 4
    notes: list[str] = []
    # the base of every comparison: the F32 rendering of the source (F16 where memory is short)
    base_ftype = LlamaFileType.ALL_F32
    try:
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        if f32_bytes * 3 > avail:
            base_ftype = LlamaFileType.MOSTLY_F16
            notes.append("the base is the F16 rendering of the source: its F32 rendering would not fit in memory")
    except (ValueError, OSError):
        pass
    base_path = out / f"{stem}-{ftype_name(base_ftype)}.gguf"
    step(f"base: {ftype_name(base_ftype)} rendering of the source", None)
    _quantize(src, base_path, base_ftype, threads)
    if source_was_quantized:
        notes.append(
            f"the source file is itself quantized ({source_type}); every rung is re-quantized from its "
            f"{ftype_name(base_ftype)} rendering, so the losses shown are optimistic compared with "
            "quantizing the original weights"
        )
    results: list[RungResult] = []
    for i, (name, ftype) in enumerate(ftypes):
        path = out / f"{stem}-{name}.gguf"
        step(f"quantize {name}", i / len(ftypes))
        q, reused = _quantize(src, path, ftype, threads)
        results.append(_rung(name, path, q, reused))
    step("evaluate against the base", None)
    evals = evaluate_many([Path(r.path) for r in results], base_path, text=text, ctx=ctx, chunks=chunks,
                          threads=threads, progress=lambda done, total: step(f"evaluate chunk {done}/{total}", done / max(total, 1)))
    for r, e in zip(results, evals):
        r.eval = e.to_dict()
    if speed:
        from .bench import probe

        for i, r in enumerate(results):
            step(f"speed {r.name}", i / len(results))
            r.speed = probe(r.path, n_prompt=128, n_gen=32, repetitions=2, threads=threads).to_dict()
    step("fit: memory on this machine", None)
    machine_info, fit_ctx = (_fit_rungs(src, results, fit_ctx or min(trained_ctx, 8192), machine, notes)
                             if results else ({}, None))
    if hf_dir is not None and set(formats) - {"gguf"}:
        results += [RungResult(**row) for row in hf_formats.hf_rungs(
            hf_dir, formats, base_path, out, text=text, ctx=ctx, chunks=chunks, threads=threads, speed=speed, step=step)]
        notes += hf_formats.format_notes(formats)
    inversions = find_inversions(results, source_type if source_was_quantized else None)
    recommendation, reasons = recommend(results, model_params=n_params, machine=machine_info, fit_ctx=fit_ctx)
    text_name = str(text) if text else "llmquant built-in evaluation text"
    return LadderResult(
        model=str(src), model_name=model_name, source_type=source_type,
        source_was_quantized=source_was_quantized, base=str(base_path), base_type=ftype_name(base_ftype),
        ctx=ctx, chunks=evals[0].n_chunks if evals else (results[0].eval.get("n_chunks") if results else chunks), text=text_name, threads=threads, rungs=results,
        inversions=inversions, recommendation=recommendation, reasons=reasons, notes=notes,
        machine=machine_info, fit_ctx=fit_ctx,
        seconds=time.perf_counter() - t0, out_dir=str(out), formats=list(formats),
    )


def _fit_rungs(src: Path, rungs: list[RungResult], n_ctx: int, machine: str,
               notes: list[str]) -> tuple[dict, int | None]:
    """Attach llmquant fit's memory and speed bound for an ``n_ctx``-token context to every rung."""
    from ..fit.planner import fit, resolve_machine
    from ..fit.catalog import load_spec

    try:
        report = fit(load_spec(str(src)), resolve_machine(machine, None, None), n_ctx=n_ctx,
                     ladder=[r.name for r in rungs]).to_dict()
    except LlmquantError as exc:
        notes.append(f"fit could not size the rungs: {exc}")
        return {}, None
    by_name = {r["ftype"]: r for r in report["rungs"]}
    for r in rungs:
        row = by_name.get(r.name)
        if row:
            r.fit = {k: row[k] for k in ("total_bytes", "fits", "tight", "headroom_bytes", "tok_s", "max_ctx",
                                         "placement", "usable_bytes")}
    return report["machine"], n_ctx


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
