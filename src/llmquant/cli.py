"""The ``llmquant`` command: one thin function per verb over the library API.

Each command parses its arguments, calls one library function and renders the result as a rich
table or, with ``--json``, as JSON on stdout. Errors are one line on stderr and exit code 1.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import __version__
from .errors import LlmquantError

app = typer.Typer(
    name="llmquant",
    help="Quantize, measure and run local LLMs: llama.cpp-exact GGUF quantization in one tool.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)

# -- shared options (defined once) ------------------------------------------------------------------
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
ThreadsOpt = Annotated[int, typer.Option("--threads", "-t", min=0, help="Worker threads (0: one per core).")]
ModelArg = Annotated[
    Optional[str], typer.Argument(help="A GGUF file; default: the embedded SmolLM2-135M-Instruct.", show_default=False)
]


def _default_threads() -> int:
    import os

    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def _human_count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def _print_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


@app.callback(invoke_without_command=True)
def _root(
    version: Annotated[bool, typer.Option("--version", help="Show the version and exit.")] = False,
) -> None:
    if version:
        out.print(f"llmquant {__version__}")
        raise typer.Exit()


# -- inspect --------------------------------------------------------------------------------------------
@app.command()
def inspect(
    model: ModelArg = None,
    tensors: Annotated[bool, typer.Option("--tensors", help="List every tensor.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Show what a GGUF holds: architecture, size, bits per weight, hyper-parameters, tensor types."""
    from .inspect import inspect_model
    from .models import resolve_model

    info = inspect_model(resolve_model(model))
    if as_json:
        _print_json(info.to_dict(with_tensors=tensors))
        return
    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    rows = [
        ("file", info.path),
        ("name", info.name or "-"),
        ("architecture", info.architecture),
        ("parameters", f"{_human_count(info.n_params)} ({info.n_params:,})"),
        ("file type", info.file_type or "-"),
        ("size", f"{_human_bytes(info.file_bytes)} (tensors {_human_bytes(info.tensor_bytes)})"),
        ("bits per weight", f"{info.bits_per_weight:.2f}"),
        ("context length", str(info.context_length or "-")),
        ("layers", str(info.n_layer or "-")),
        ("embedding", str(info.n_embd or "-")),
        ("heads / kv heads", f"{info.n_head or '-'} / {info.n_head_kv or '-'}"),
        ("feed-forward", str(info.n_ff or "-")),
        ("vocabulary", f"{info.vocab_size or '-'} ({info.tokenizer_model or 'no tokenizer'})"),
        ("chat template", "yes" if info.has_chat_template else "no"),
        ("GGUF version", str(info.gguf_version)),
    ]
    for k, v in rows:
        t.add_row(k, v)
    out.print(t)
    types = Table(title="tensor types")
    for col in ("type", "tensors", "params", "bytes", "share"):
        types.add_column(col, justify="right" if col != "type" else "left")
    for name, e in info.types.items():
        types.add_row(name, str(e["tensors"]), _human_count(e["params"]), _human_bytes(e["bytes"]),
                      f"{100 * e['bytes'] / max(info.tensor_bytes, 1):.1f}%")
    out.print(types)
    if tensors:
        tt = Table(title="tensors")
        for col in ("name", "shape", "type", "bytes"):
            tt.add_column(col, justify="right" if col == "bytes" else "left")
        for e in info.tensors:
            tt.add_row(e["name"], "x".join(str(d) for d in e["shape"]), e["type"], f"{e['bytes']:,}")
        out.print(tt)


# -- quantize ---------------------------------------------------------------------------------------------
@app.command()
def quantize(
    paths: Annotated[Optional[list[str]], typer.Argument(help="[SRC] DST: source GGUF (default: the embedded model) and output file.", show_default=False)] = None,
    qtype: Annotated[str, typer.Option("--type", "-q", help="Target file type, e.g. Q8_0, Q4_K_M, Q5_1, F16.")] = "Q8_0",
    pure: Annotated[bool, typer.Option("--pure", help="Quantize every tensor to the one type (no mixture rules).")] = False,
    allow_requantize: Annotated[bool, typer.Option("--allow-requantize", help="Allow a source that is already quantized.")] = False,
    leave_output_tensor: Annotated[bool, typer.Option("--leave-output-tensor", help="Do not quantize output.weight.")] = False,
    output_tensor_type: Annotated[Optional[str], typer.Option("--output-tensor-type", help="Type for output.weight.")] = None,
    token_embedding_type: Annotated[Optional[str], typer.Option("--token-embedding-type", help="Type for token_embd.weight.")] = None,
    tensor_type: Annotated[list[str], typer.Option("--tensor-type", help="REGEX=TYPE override (repeatable).")] = [],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the per-tensor plan and exact size; write nothing.")] = False,
    imatrix: Annotated[Optional[str], typer.Option("--imatrix", help="Importance matrix from llama-imatrix (.gguf or legacy .dat).")] = None,
    threads: ThreadsOpt = 0,
    force: Annotated[bool, typer.Option("--force", "-f", help="Overwrite DST if it exists.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Quantize a GGUF tensor by tensor with llama.cpp's rules; output bytes identical to llama-quantize."""
    from .imatrix import load_imatrix
    from .models import resolve_model
    from .quantize import quantize_model
    from .recipes import RecipeOptions, ftype_name, parse_ftype, parse_ggml_type, parse_tensor_type

    paths = paths or []
    if len(paths) > 2 or (not paths and not dry_run):
        raise LlmquantError("expected [SRC] DST: an optional source model and the output file")
    if not paths:
        src_arg, dst = None, None
    elif len(paths) == 1 and dry_run:
        src_arg, dst = paths[0], None
    elif len(paths) == 1:
        src_arg, dst = None, paths[0]
    else:
        src_arg, dst = paths
    src = resolve_model(src_arg)
    ftype = parse_ftype(qtype)
    options = RecipeOptions(
        pure=pure,
        allow_requantize=allow_requantize,
        quantize_output_tensor=not leave_output_tensor,
        output_tensor_type=parse_ggml_type(output_tensor_type) if output_tensor_type else None,
        token_embedding_type=parse_ggml_type(token_embedding_type) if token_embedding_type else None,
        tensor_types=tuple(parse_tensor_type(spec) for spec in tensor_type),
    )
    n_threads = threads or _default_threads()
    imat = load_imatrix(imatrix) if imatrix else None
    weighting = {"importance": imat.entries, "metadata": imat.provenance(imatrix)} if imat else {}
    if dry_run or as_json:
        result = quantize_model(src, dst, ftype, options=options, threads=n_threads, force=force, dry_run=dry_run, **weighting)
    else:
        with _TensorProgress(ftype_name(ftype)) as progress:
            result = quantize_model(src, dst, ftype, options=options, threads=n_threads, force=force, progress=progress, **weighting)
    if as_json:
        _print_json(result.to_dict())
        return
    _render_quantize(result, dry_run)
    if imat:
        chunks = f", {imat.chunk_count} chunks" if imat.chunk_count else ""
        out.print(f"importance matrix {imatrix} ({len(imat.entries)} entries{chunks}): "
                  f"{'would weight' if dry_run else 'weighted'} {len(result.importance_tensors)} tensors", highlight=False)


class _TensorProgress:
    """A per-tensor progress bar on stderr, shown only once writing has begun (so that an early
    error is the only thing printed)."""

    def __init__(self, title: str):
        self.title = title
        self.bar: Progress | None = None
        self.task = None

    def __call__(self, i: int, n: int, plan) -> None:
        if self.bar is None:
            self.bar = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[tensor]}"), TimeElapsedColumn(), console=err,
            )
            self.bar.start()
            self.task = self.bar.add_task(self.title, total=n, tensor="")
        label = f"{plan.name} -> {plan.type.name}" if i < n else "done"
        self.bar.update(self.task, total=n, completed=i, tensor=label)

    def __enter__(self) -> "_TensorProgress":
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()


def _render_quantize(result, dry_run: bool) -> None:
    if dry_run:
        t = Table(title=f"plan: {result.ftype} (dry run, nothing written)")
        for col in ("tensor", "shape", "from", "to", "bytes", "note"):
            t.add_column(col, justify="right" if col == "bytes" else "left")
        for p in result.to_dict()["tensors"]:
            t.add_row(p["name"], "x".join(map(str, p["shape"])), p["source_type"], p["type"], f"{p['bytes']:,}", p["reason"])
        out.print(t)
    types = Table(title="result by type")
    for col in ("type", "tensors", "params", "bytes"):
        types.add_column(col, justify="left" if col == "type" else "right")
    for name, e in sorted(result.type_counts().items(), key=lambda kv: -kv[1]["bytes"]):
        types.add_row(name, str(e["tensors"]), _human_count(e["params"]), _human_bytes(e["bytes"]))
    out.print(types)
    size = result.file_bytes if result.file_bytes is not None else result.output_bytes
    what = "would write" if dry_run else f"wrote {result.destination}:"
    out.print(
        f"{what} {_human_bytes(size)} ({result.output_bytes:,} bytes of tensors), "
        f"{result.bits_per_weight:.2f} bits per weight"
        + ("" if dry_run else f", in {result.seconds:.1f} s")
    )
    if result.fallbacks:
        by_reason: dict[str, int] = {}
        for p in result.fallbacks:
            key = f"{p.target.name} -> {p.type.name}"
            by_reason[key] = by_reason.get(key, 0) + 1
        summary = ", ".join(f"{n} x {k}" for k, n in by_reason.items())
        out.print(
            f"[yellow]{len(result.fallbacks)} tensors fell back to another type because their row length "
            f"is not a multiple of the block size ({summary})[/yellow]"
        )
    for note in result.notes:
        out.print(f"[dim]note: {note}[/dim]")


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
    threads: ThreadsOpt = 0,
    as_json: JsonOpt = False,
) -> None:
    """The main job: quantize to every rung, measure quality loss, size and speed, and recommend one."""
    from .ladder import run_ladder
    from .report import footer_lines, header_lines, table, write_all

    names = tuple(r.strip() for r in rungs.split(",") if r.strip())
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TimeElapsedColumn(), console=err,
                  transient=True, disable=as_json) as bar:
        task = bar.add_task("ladder", total=1.0)

        def step(desc: str, frac: float | None) -> None:
            bar.update(task, description=desc, completed=frac if frac is not None else 0)

        result = run_ladder(model, rungs=names, out_dir=out_dir, text=text, ctx=ctx, chunks=chunks,
                            threads=threads or None, speed=not no_speed, step=step)
    paths = write_all(result, out_dir)
    if as_json:
        _print_json({**result.to_dict(), "outputs": paths})
        return
    for line in header_lines(result):
        out.print(line, highlight=False)
    out.print(table(result))
    for line in footer_lines(result):
        out.print(line, highlight=False)
    out.print(f"wrote {paths['json']}, {paths['md']}, {paths['png']} in {result.seconds:.0f} s", highlight=False)


# -- eval -------------------------------------------------------------------------------------------------
@app.command("eval")
def eval_(
    model: ModelArg = None,
    base: Annotated[Optional[str], typer.Option("--base", help="Reference GGUF for KL divergence (ideally the F32/F16 rendering).")] = None,
    text: Annotated[Optional[str], typer.Option("--text", help="Text file, or folder of .txt/.md files; default: the built-in text.")] = None,
    ctx: Annotated[int, typer.Option("--ctx", "-c", help="Tokens per chunk; the second half of each chunk is scored.")] = 512,
    chunks: Annotated[Optional[int], typer.Option("--chunks", min=1, help="Evaluate at most N chunks (default: all).")] = None,
    threads: ThreadsOpt = 0,
    as_json: JsonOpt = False,
) -> None:
    """Perplexity and, with --base, KL divergence, same top token and Δp: llama-perplexity's numbers."""
    from .eval import evaluate
    from .models import resolve_model

    path = resolve_model(model)
    base_path = resolve_model(base) if base is not None else None
    bar = Progress(TextColumn("[bold]evaluate"), BarColumn(), MofNCompleteColumn(), TextColumn("chunks"),
                   TimeElapsedColumn(), console=err, transient=True, disable=as_json)
    with bar:
        task = bar.add_task("eval", total=None)
        result = evaluate(path, base_path, text=text, ctx=ctx, chunks=chunks, threads=threads or None,
                          progress=lambda done, total: bar.update(task, completed=done, total=total))
    if as_json:
        _print_json(result.to_dict())
        return
    t = Table(title=f"{path.name}" + (f" vs {base_path.name}" if base_path else ""))
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


# -- entry point -----------------------------------------------------------------------------------------
def _on_sigterm(signum, frame):  # let context managers remove partial files
    raise SystemExit(128 + signum)


def main() -> None:
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        app()
    except LlmquantError as exc:
        err.print(f"[bold red]error:[/bold red] {exc}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("interrupted; nothing was written", highlight=False)
        sys.exit(130)


if __name__ == "__main__":
    main()
