"""Calibration verbs: imatrix (llama-imatrix's importance matrix, from llama.cpp's own forward pass)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from .options import JsonOpt, ModelArg, ThreadsOpt, _print_json, app, err, out


class _ChunkProgress:
    """Chunks done, tokens/s and ETA on stderr."""

    def __init__(self, label: str = "imatrix"):
        self.bar: Progress | None = None
        self.task = None
        self.label = label

    def __call__(self, p) -> None:
        if self.bar is None:
            self.bar = Progress(
                TextColumn(f"[bold]{self.label}"), BarColumn(), MofNCompleteColumn(), TextColumn("chunks"),
                TextColumn("{task.fields[tps]}"), TextColumn("ETA"), TimeRemainingColumn(), console=err,
            )
            self.bar.start()
            self.task = self.bar.add_task("imatrix", total=p.chunks_total, tps="")
        tps = f"{p.tokens_per_second:,.0f} tok/s" if p.seconds > 0 else ""
        self.bar.update(self.task, total=p.chunks_total, completed=p.chunks_done, tps=tps)

    def __enter__(self) -> _ChunkProgress:
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


@app.command()
def imatrix(
    model: ModelArg = None,
    text: Annotated[str | None, typer.Option("--file", "-f", help="Calibration text: a file, or a folder of .txt/.md/.rst files (default: the shipped calibration text).", show_default=False)] = None,
    output: Annotated[str, typer.Option("--output", "-o", help="Output file (.gguf, or .dat for the legacy format).")] = "imatrix.gguf",
    ctx: Annotated[int, typer.Option("--ctx", "-c", min=1, help="Tokens per chunk (llama-imatrix's -c).")] = 512,
    chunks: Annotated[int | None, typer.Option("--chunks", min=1, help="Use at most N chunks (default: all the text).", show_default=False)] = None,
    process_output: Annotated[bool, typer.Option("--process-output", help="Also collect output.weight.")] = False,
    in_file: Annotated[list[str], typer.Option("--in-file", help="Earlier imatrix to merge (repeatable); without -f they are only combined.")] = [],
    output_format: Annotated[str | None, typer.Option("--output-format", help="gguf or dat (default: from the file name).", show_default=False)] = None,
    batch: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Tokens per decode; batch/ctx chunks run as parallel sequences (llama-imatrix's -b).")] = 2048,
    from_chunk: Annotated[int, typer.Option("--chunk", "--from-chunk", min=0, help="Start from chunk N of the text (llama-imatrix --chunk).")] = 0,
    output_frequency: Annotated[int, typer.Option("--output-frequency", "-ofreq", min=1, help="Write the output every N chunks while collecting, so an interrupted run keeps what it had.")] = 10,
    save_frequency: Annotated[int, typer.Option("--save-frequency", min=0, help="Also keep a copy OUTPUT.at_N every N chunks (0: none).")] = 0,
    threads: ThreadsOpt = 0,
    top: Annotated[int, typer.Option("--top", min=0, help="Rows of the skew table.")] = 10,
    as_json: JsonOpt = False,
) -> None:
    """Collect an importance matrix (llama-imatrix's file, same numbers) for quantize --imatrix."""
    from ..calibrate import make_imatrix
    from ..store import resolve_model
    from ..system import default_threads

    src = resolve_model(model)
    kwargs = {"n_ctx": ctx, "chunks": chunks, "process_output": process_output, "in_files": in_file,
              "output_format": output_format, "threads": default_threads(threads), "n_batch": batch,
              "from_chunk": from_chunk, "output_frequency": output_frequency, "save_frequency": save_frequency}
    if as_json:
        result = make_imatrix(src, text, output, **kwargs)
        d = result.to_dict()
        d["skew"] = d["skew"][:top]
        _print_json(d)
        return
    with _ChunkProgress() as progress:
        result = make_imatrix(src, text, output, progress=progress, **kwargs)
    tps = f", {result.tokens / result.seconds:,.0f} tok/s" if result.seconds > 0 and result.tokens else ""
    out.print(f"wrote {result.path} ({result.output_format}): {result.entries} entries, {result.chunk_count} chunks "
              f"of {result.chunk_size} tokens ({result.chunks} collected now, {result.seconds:.1f} s{tps})",
              highlight=False)
    if top and result.skew:
        t = Table(title="most skewed importance (max / mean of E\\[x²] over columns)")
        for col in ("tensor", "columns", "max / mean", "max column", "mean E\\[x²]"):
            t.add_column(col, justify="left" if col == "tensor" else "right")
        for r in result.skew[:top]:
            t.add_row(r["tensor"], str(r["columns"]), f"{r['skew']:,.1f}", str(r["max_column"]), f"{r['mean']:.4g}")
        out.print(t)
