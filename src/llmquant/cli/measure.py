"""Verbs that measure: ladder (the main job), eval."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .options import (
    CTX_NAMES,
    CacheTypeKOpt,
    CacheTypeVOpt,
    FlashAttnOpt,
    JsonOpt,
    StepLines,
    MlockOpt,
    ModelArg,
    ModelOpt,
    NglOpt,
    NoMmapOpt,
    ThreadsOpt,
    _print_json,
    _TensorProgress,
    app,
    err,
    load_options,
    out,
    pick,
)


# -- ladder -------------------------------------------------------------------------------------------------
@app.command()
def ladder(
    model: ModelArg = None,
    rungs: Annotated[Optional[str], typer.Option("--rungs", help="Comma-separated rungs [default: F16,Q8_0,Q6_K,Q5_K_M,Q4_K_M,Q4_0,Q3_K_M,Q2_K; with --imatrix also IQ4_XS,IQ3_M,IQ2_M].", show_default=False)] = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the quantized files and the reports.")] = Path("ladder-out"),
    text: Annotated[Optional[Path], typer.Option("--text", help="Evaluation text file or folder (default: built-in).")] = None,
    ctx: Annotated[int, typer.Option(*CTX_NAMES, help="Context per evaluation chunk.")] = 512,
    chunks: Annotated[Optional[int], typer.Option("--chunks", help="Evaluate at most N chunks.")] = None,
    no_speed: Annotated[bool, typer.Option("--no-speed", help="Skip the speed and memory measurements.")] = False,
    fit_ctx: Annotated[Optional[int], typer.Option("--fit-ctx", help="Context for the memory fit (default: trained, max 8192).")] = None,
    machine: Annotated[str, typer.Option("--machine", help="Machine to fit on (see llmquant fit --machine list).")] = "this",
    threads: ThreadsOpt = 0,
    formats: Annotated[str, typer.Option("--formats", help="With an HF folder as MODEL: compare formats in one table, e.g. gguf,nf4 (gguf = the --rungs).")] = "gguf",
    name: Annotated[Optional[str], typer.Option("--name", help="Also store every rung as NAME[:TAG]-RUNG (e.g. smollm2:135m -> smollm2:135m-q4_k_m).", show_default=False)] = None,
    keep: Annotated[Optional[str], typer.Option("--keep", help="Rung files to keep: all, best (the recommended one) or none; default: all below 3B parameters, best above.", show_default=False)] = None,
    model_opt: ModelOpt = None,
    ngl: NglOpt = "0",
    mlock: MlockOpt = False,
    no_mmap: NoMmapOpt = False,
    imatrix: Annotated[Optional[str], typer.Option("--imatrix", help="Also make every K/legacy rung with an importance matrix (rows RUNG+imat): a file, or 'auto' (collected on the shipped calibration text into --out, reused while current).", show_default=False)] = None,
    refine: Annotated[bool, typer.Option("--refine", help="Also make every quantized rung with quantize --refine (rows RUNG+refine: same types and bytes, calibrated values).")] = False,
    calib: Annotated[Optional[str], typer.Option("--calib", help="Calibration text for --refine (default: the shipped one).", show_default=False)] = None,
    as_json: JsonOpt = False,
) -> None:
    """The main job: quantize to every rung, measure quality loss, size and speed, and recommend one."""
    from ..measure.ladder import default_rungs, run_ladder
    from ..measure.report import footer_lines, header_lines, plain_table, table, write_all

    from ..store import resolve_model

    model = pick(("MODEL", model), ("--model", model_opt))
    options = load_options(resolve_model(model), ngl, ctx=ctx, mlock=mlock, no_mmap=no_mmap)
    names = tuple(r.strip() for r in rungs.split(",") if r.strip()) if rungs is not None else default_rungs(imatrix is not None)
    if name:
        from ..store import parse_name, rung_name

        for r in names:
            parse_name(rung_name(name, r))  # a bad name fails before any work
            if imatrix:
                parse_name(rung_name(name, f"{r}-imat"))
            if refine:
                parse_name(rung_name(name, f"{r}-refine"))
    log_lines = not err.is_terminal
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TimeElapsedColumn(), console=err,
                  transient=True, disable=as_json or log_lines) as bar:
        task = bar.add_task("ladder", total=1.0)
        lines = StepLines(err.file) if log_lines and not as_json else None

        def step(desc: str, frac: float | None) -> None:
            if lines is not None:
                lines(desc, frac)
            bar.update(task, description=desc, completed=frac if frac is not None else 0)

        result = run_ladder(model, rungs=names, out_dir=out_dir, text=text, ctx=ctx, chunks=chunks,
                            threads=threads or None, speed=not no_speed, fit_ctx=fit_ctx, machine=machine,
                            step=step, keep=keep, options=options, imatrix=imatrix,
                            formats=tuple(formats.split(",")), refine=refine, calib=calib)
    paths = write_all(result, out_dir)
    stored = []
    if name:
        from ..store import register, rung_name

        stored = [register(r.path, rung_name(name, r.name.replace("+", "-"))).name for r in result.rungs
                  if r.kept and getattr(r, "format", "gguf") == "gguf"]
    if as_json:
        _print_json({**result.to_dict(), "outputs": paths, **({"stored_as": stored} if stored else {})})
        return
    for line in header_lines(result):
        out.print(line, highlight=False)
    if out.is_terminal and out.width >= 120:
        out.print(table(result))
    else:  # a log or a narrow terminal: plain columns that fit its width
        out.print(plain_table(result, width=out.width if out.is_terminal else 80), highlight=False, markup=False)
    for line in footer_lines(result):
        out.print(line, highlight=False)
    if result.offload:
        out.print(f"evaluated and timed with {result.offload['placement']}", highlight=False)
    out.print(f"wrote {paths['json']}, {paths['md']}, {paths['png']} in {result.seconds:.0f} s", highlight=False)
    if stored:
        out.print(f"stored as {', '.join(stored)}", highlight=False)


# -- eval -------------------------------------------------------------------------------------------------
@app.command("eval")
def eval_(
    model: ModelArg = None,
    base: Annotated[Optional[str], typer.Option("--base", help="Reference for KL divergence: a GGUF (ideally the F32/F16 rendering) or an HF folder; its tokenizer tokenizes the text.")] = None,
    text: Annotated[Optional[str], typer.Option("--text", "-f", "--file", help="Text file, or folder of .txt/.md files; default: the built-in text.")] = None,
    ctx: Annotated[int, typer.Option(*CTX_NAMES, help="Tokens per chunk; the second half of each chunk is scored.")] = 512,
    chunks: Annotated[Optional[int], typer.Option("--chunks", min=1, help="Evaluate at most N chunks (default: all).")] = None,
    base_logits: Annotated[Optional[Path], typer.Option("--base-logits", help="Base log-probabilities in llama-perplexity's --kl-divergence-base format: read when the file exists (its tokens and context are used), else computed from --base and written.")] = None,
    load: Annotated[Optional[str], typer.Option("--load", help="Quantize an HF folder at load time: nf4 (bitsandbytes NF4, double quant, 64-blocks, fp32 compute).")] = None,
    runtime: Annotated[str, typer.Option("--runtime", help="auto: llama.cpp for a GGUF, transformers for an HF folder; llama: run an HF folder in llama.cpp as an F32 GGUF made on the fly (dequantized first if quantized); torch.")] = "auto",
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Allow HF folders whose weights are PyTorch .bin pickles (loaded with weights_only=True).")] = False,
    threads: ThreadsOpt = 0,
    model_opt: ModelOpt = None,
    ngl: NglOpt = "0",
    mlock: MlockOpt = False,
    no_mmap: NoMmapOpt = False,
    flash_attn: FlashAttnOpt = None,
    cache_type_k: CacheTypeKOpt = None,
    cache_type_v: CacheTypeVOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Perplexity and, with --base, KL divergence, same top token and Δp: llama-perplexity's numbers.
    MODEL and BASE may each be a GGUF or a Hugging Face folder (the [hf] extra runs those)."""
    from ..measure.eval import ModelRef, evaluate
    from ..store import resolve_model

    path = resolve_model(pick(("MODEL", model), ("--model", model_opt)))
    base_path = resolve_model(base) if base is not None else None
    options = load_options(path, ngl, ctx=ctx, batch=ctx, mlock=mlock, no_mmap=no_mmap, flash_attn=flash_attn,
                           cache_type_k=cache_type_k, cache_type_v=cache_type_v)
    ref = ModelRef(path, load=load, runtime=runtime, allow_pickle=allow_pickle)
    base_ref = ModelRef(base_path, allow_pickle=allow_pickle) if base_path is not None else None
    opts = dict(text=text, ctx=ctx, chunks=chunks, threads=threads or None, options=options)
    if base_logits is not None:
        # llama-perplexity's file compares GGUF files: an HF folder is converted once and reused
        ref = _as_gguf(path, threads)
        base_ref = _as_gguf(base_path, threads) if base_path is not None else None
        opts["base_logits"] = base_logits
    if base_logits is not None and not base_logits.exists() and base_path is not None:
        from ..system import check_disk_space

        def before_write(nbytes: int) -> None:
            err.print(f"writing the base logits: {nbytes / 2**20:,.1f} MiB to {base_logits} "
                      "(llama-perplexity's --kl-divergence-base format)", highlight=False)
            check_disk_space(base_logits.parent, nbytes, f"base logits {base_logits.name}")

        opts["before_write"] = before_write
    if as_json:
        result = evaluate(ref, base_ref, **opts)
    else:
        with _TensorProgress("evaluate") as bar:
            result = evaluate(ref, base_ref, **opts, progress=lambda done, n: bar(done, n, f"chunk {done} of {n}"))
    if as_json:
        _print_json(result.to_dict())
        return
    against = base_path.name if base_path else base_logits.name if base_logits else None
    t = Table(title=f"{path.name}" + (f" ({result.model_format}, {result.runtime})" if path.is_dir() else "")
              + (f" vs {against}" if against else ""))
    t.add_column("statistic")
    t.add_column("value", justify="right")
    t.add_row("PPL(Q)", f"{result.ppl:.4f} ± {result.ppl_err:.4f}")
    if result.kld_mean is not None:
        t.add_row("PPL(base)", f"{result.base_ppl:.4f} ± {result.base_ppl_err:.4f}")
        t.add_row("PPL(Q) - PPL(base)", f"{result.delta_ppl:+.4f} ± {result.delta_ppl_err:.4f}")
        t.add_row("ln(PPL(Q)/PPL(base))", f"{result.ln_ppl_ratio:+.5f} ± {result.ln_ppl_ratio_err:.5f}")
        t.add_row("PPL(Q)/PPL(base)", f"{result.ppl_ratio:.5f} ± {result.ppl_ratio_err:.5f}")
        t.add_row("mean KLD", f"{result.kld_mean:.6f} ± {result.kld_err:.6f}")
        for label, key in (("median KLD", "kld_median"), ("90% KLD", "kld_p90"), ("99% KLD", "kld_p99"), ("max KLD", "kld_max")):
            t.add_row(label, f"{getattr(result, key):.6f}")
        t.add_row("same top p", f"{result.top1:.3f} ± {result.top1_err:.3f} %")
        t.add_row("RMS Δp", f"{result.rms_dp:.3f} ± {result.rms_dp_err:.3f} %")
    out.print(t)
    out.print(
        f"{result.n_chunks} chunks of {result.n_ctx} tokens, {result.n_tokens_scored:,} tokens scored "
        f"(second half of each chunk); {result.tokens_per_second:.0f} tokens/s, {result.wall_seconds:.1f} s in all"
        + (f"; {result.offload['placement']}" if result.offload else "")
    )
    for note in result.notes:
        out.print(f"[dim]note: {note}[/dim]")


def _as_gguf(path: Path, threads: int) -> Path:
    """A Hugging Face folder is converted once (at its stored precision) into
    $LLMQUANT_HOME/converted/NAME/ and reused while the folder is unchanged."""
    if not path.is_dir():
        return path
    from ..measure.ladder import as_gguf
    from ..measure.resume import LadderState
    from ..store import home
    from ..system import default_threads

    out = home() / "converted" / path.resolve().name
    out.mkdir(parents=True, exist_ok=True)
    return as_gguf(path, out, default_threads(threads or None), LadderState(out),
                   step=lambda desc, frac: err.print(f"[dim]{desc} (once, into {out})[/dim]", highlight=False))
