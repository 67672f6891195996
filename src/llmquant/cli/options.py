"""What every verb shares: the typer app, the consoles, the options defined once, and the renderers of
sizes and JSON."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .. import __version__

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
SplitOpt = Annotated[Optional[str], typer.Option(
    "--split-max-size", help="Write llama.cpp's split files (NAME-00001-of-0000N.gguf) of at most SIZE each, e.g. 50G or 500M (as gguf-split).",
    show_default=False)]
ModelArg = Annotated[
    Optional[str], typer.Argument(help="A GGUF file or a stored model's NAME[:TAG]; default: the embedded SmolLM2-135M-Instruct.", show_default=False)
]


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


class _TensorProgress:
    """A per-tensor progress bar on stderr, shown only once writing has begun (so that an early
    error is the only thing printed)."""

    def __init__(self, title: str):
        self.title = title
        self.bar: Progress | None = None
        self.task = None

    def __call__(self, i: int, n: int, item) -> None:
        """``item``: a TensorPlan (shown as "name -> TYPE") or a ready label."""
        if self.bar is None:
            self.bar = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[tensor]}"), TimeElapsedColumn(), console=err,
            )
            self.bar.start()
            self.task = self.bar.add_task(self.title, total=n, tensor="")
        label = "done" if i >= n else item if isinstance(item, str) else f"{item.name} -> {item.type.name}"
        self.bar.update(self.task, total=n, completed=i, tensor=label)

    def __enter__(self) -> "_TensorProgress":
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()


class StepLines:
    """Progress a log can read: one line per step, with the elapsed time and, from the overall
    fraction done, an ETA. Repeated updates of one step (e.g. "evaluate Q4_K_M: chunk 3/40") print
    a line when the step starts and then at most once a minute."""

    def __init__(self, stream, every: float = 60.0):
        import time

        self.stream, self.every, self.clock = stream, every, time.monotonic
        self.t0 = self.clock()
        self.last_head, self.last_time = None, -1e9

    def __call__(self, desc: str, frac: float | None) -> None:
        now = self.clock()
        head = desc.split(":")[0]
        if head == self.last_head and now - self.last_time < self.every:
            return
        self.last_head, self.last_time = head, now
        elapsed = now - self.t0
        eta = f", ETA {_clock(elapsed * (1 - frac) / frac)}" if frac and 0 < frac < 1 and elapsed > 1 else ""
        pct = f"{100 * frac:3.0f}% " if frac is not None else ""
        self.stream.write(f"[{_clock(elapsed)}{eta}] {pct}{desc}\n")
        self.stream.flush()


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def split_bytes(size: str | None) -> int:
    """--split-max-size SIZE in bytes (0: one file); a bad size is a one-line error."""
    if not size:
        return 0
    from ..errors import LlmquantError
    from ..gguf.split import parse_size

    try:
        return parse_size(size)
    except ValueError as exc:
        raise LlmquantError(f"--split-max-size: {exc}") from None
