"""Verbs that measure: ladder (the main job), eval."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .options import (
    JsonOpt,
    ModelArg,
    ThreadsOpt,
    _print_json,
    _TensorProgress,
    app,
    err,
    out,
)


# -- ladder -------------------------------------------------------------------------------------------------
@app.command()
def ladder(
    model: ModelArg = None,
    rungs: Annotated[str, typer.Option("--rungs", help="Comma-separated rungs.")] = "F16,Q8_0,Q6_K,Q5_K_M,Q4_K_M,Q4_0,Q3_K_M,Q2_K",
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the quantized files and the reports.")] = Path("ladder-out"),
    text: Annotated[Optional[Path], typer.Option("--text", help="Evaluation text file or folder (default: built-in).")] = None,
    ctx: Annotated[int, typer.Option("--ctx", help="Context per evaluation chunk.")] = 512,
    chunks: Annotated[Optional[int], typer.Option("--chunks", help="Evaluate at most N chunks.")] = None,
    no_speed: Annotated[bool, typer.Option("--no-speed", help="Skip the speed and memory measurements.")] = False,
    fit_ctx: Annotated[Optional[int], typer.Option("--fit-ctx", help="Context for the memory fit (default: trained, max 8192).")] = None,
    machine: Annotated[str, typer.Option("--machine", help="Machine to fit on (see llmquant fit --machine list).")] = "this",
    threads: ThreadsOpt = 0,
    formats: Annotated[str, typer.Option("--formats", help="With an HF folder as MODEL: compare formats in one table, e.g. gguf,nf4 (gguf = the --rungs).")] = "gguf",
    name: Annotated[Optional[str], typer.Option("--name", help="Also store every rung as NAME[:TAG]-RUNG (e.g. smollm2:135m -> smollm2:135m-q4_k_m).", show_default=False)] = None,
    as_json: JsonOpt = False,
) -> None:
    """The main job: quantize to every rung, measure quality loss, size and speed, and recommend one."""
    from ..measure.ladder import run_ladder
    from ..measure.report import footer_lines, header_lines, table, write_all

    names = tuple(r.strip() for r in rungs.split(",") if r.strip())
    if name:
        from ..store import parse_name, rung_name

        for r in names:
            parse_name(rung_name(name, r))  # a bad name fails before any work
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TimeElapsedColumn(), console=err,
                  transient=True, disable=as_json) as bar:
        task = bar.add_task("ladder", total=1.0)

        def step(desc: str, frac: float | None) -> None:
            bar.update(task, description=desc, completed=frac if frac is not None else 0)

        result = run_ladder(model, rungs=names, out_dir=out_dir, text=text, ctx=ctx, chunks=chunks,
                            threads=threads or None, speed=not no_speed, fit_ctx=fit_ctx, machine=machine,
                            step=step, formats=tuple(formats.split(",")))
    paths = write_all(result, out_dir)
    stored = []
    if name:
        from ..store import register, rung_name

        stored = [register(r.path, rung_name(name, r.name)).name for r in result.rungs if r.format == "gguf"]
    if as_json:
        _print_json({**result.to_dict(), "outputs": paths, **({"stored_as": stored} if stored else {})})
        return
    for line in header_lines(result):
        out.print(line, highlight=False)
    out.print(table(result))
    for line in footer_lines(result):
        out.print(line, highlight=False)
    out.print(f"wrote {paths['json']}, {paths['md']}, {paths['png']} in {result.seconds:.0f} s", highlight=False)
    if stored:
        out.print(f"stored as {', '.join(stored)}", highlight=False)


# -- eval -------------------------------------------------------------------------------------------------
@app.command("eval")
def eval_(
    model: ModelArg = None,
    base: Annotated[Optional[str], typer.Option("--base", help="Reference for KL divergence: a GGUF (ideally the F32/F16 rendering) or an HF folder; its tokenizer tokenizes the text.")] = None,
    text: Annotated[Optional[str], typer.Option("--text", help="Text file, or folder of .txt/.md files; default: the built-in text.")] = None,
    ctx: Annotated[int, typer.Option("--ctx", "-c", help="Tokens per chunk; the second half of each chunk is scored.")] = 512,
    chunks: Annotated[Optional[int], typer.Option("--chunks", min=1, help="Evaluate at most N chunks (default: all).")] = None,
    load: Annotated[Optional[str], typer.Option("--load", help="Quantize an HF folder at load time: nf4 (bitsandbytes NF4, double quant, 64-blocks, fp32 compute).")] = None,
    runtime: Annotated[str, typer.Option("--runtime", help="auto: llama.cpp for a GGUF, transformers for an HF folder; llama: run an HF folder in llama.cpp as an F32 GGUF made on the fly (dequantized first if quantized); torch.")] = "auto",
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Allow HF folders whose weights are PyTorch .bin pickles (loaded with weights_only=True).")] = False,
    threads: ThreadsOpt = 0,
    as_json: JsonOpt = False,
) -> None:
    """Perplexity and, with --base, KL divergence, same top token and Δp: llama-perplexity's numbers.
    MODEL and BASE may each be a GGUF or a Hugging Face folder (the [hf] extra runs those)."""
    from ..measure.eval import ModelRef, evaluate
    from ..store import resolve_model

    path = resolve_model(model)
    base_path = resolve_model(base) if base is not None else None
    ref = ModelRef(path, load=load, runtime=runtime, allow_pickle=allow_pickle)
    base_ref = ModelRef(base_path, allow_pickle=allow_pickle) if base_path is not None else None
    opts = dict(text=text, ctx=ctx, chunks=chunks, threads=threads or None)
    if as_json:
        result = evaluate(ref, base_ref, **opts)
    else:
        with _TensorProgress("evaluate") as bar:
            result = evaluate(ref, base_ref, **opts, progress=lambda done, n: bar(done, n, f"chunk {done} of {n}"))
    if as_json:
        _print_json(result.to_dict())
        return
    t = Table(title=f"{path.name}" + (f" ({result.model_format}, {result.runtime})" if path.is_dir() else "")
              + (f" vs {base_path.name}" if base_path else ""))
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
    )
    for note in result.notes:
        out.print(f"[dim]note: {note}[/dim]")
