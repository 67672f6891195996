"""The ``llmquant`` command: one thin function per verb over the library API.

Each command parses its arguments, calls one library function and renders the result as a rich
table or, with ``--json``, as JSON on stdout. Errors are one line on stderr and exit code 1.
"""

from __future__ import annotations

import json
import signal
import sys
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
    threads: ThreadsOpt = 0,
    force: Annotated[bool, typer.Option("--force", "-f", help="Overwrite DST if it exists.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Quantize a GGUF tensor by tensor with llama.cpp's rules; output bytes identical to llama-quantize."""
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
    if dry_run or as_json:
        result = quantize_model(src, dst, ftype, options=options, threads=n_threads, force=force, dry_run=dry_run)
    else:
        with _TensorProgress(ftype_name(ftype)) as progress:
            result = quantize_model(src, dst, ftype, options=options, threads=n_threads, force=force, progress=progress)
    if as_json:
        _print_json(result.to_dict())
        return
    _render_quantize(result, dry_run)


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
