"""What every verb shares: the typer app, the consoles, the options defined once, and the renderers of
sizes and JSON."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Optional

import typer
import typer.core
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .. import __version__
from ..errors import OptionError


class _AliasCommand(typer.core.TyperCommand):
    """A verb whose options may be spelled several ways (ours and llama.cpp's: ``--ctx``, ``-c``,
    ``--ctx-size``). click lets the last spelling win silently; two spellings of one option with
    different values are an error naming both instead."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        args = _bare_flash_attn(self.params, args)
        _check_spellings(self.params, args)
        return super().parse_args(ctx, args)


_FA_WORDS = {"on", "off", "auto", "1", "0", "true", "false", "yes", "no", "enabled", "disabled"}


def _bare_flash_attn(params, args: list[str]) -> list[str]:
    """``-fa`` alone (llama.cpp before ``-fa on|off|auto``) means on: supply the value click needs."""
    if not any(p.name == "flash_attn" for p in params):
        return args
    takes_value = {o for p in params if p.param_type_name == "option" and not p.is_flag for o in p.opts}
    fixed: list[str] = []
    for i, arg in enumerate(args):
        is_value = i > 0 and args[i - 1] in takes_value and args[i - 1] not in ("-fa", "--flash-attn")
        fixed.append(arg)
        if arg == "--" and not is_value:
            return fixed + args[i + 1:]
        if not is_value and arg in ("-fa", "--flash-attn") and (
                i + 1 == len(args) or args[i + 1].strip().lower() not in _FA_WORDS):
            fixed.append("on")
    return fixed


def _check_spellings(params, args: list[str]) -> None:
    names: dict[str, object] = {}
    for p in params:
        if p.param_type_name == "option" and not p.multiple:
            for opt in (*p.opts, *p.secondary_opts):
                names[opt] = p
    seen: dict[str, tuple[str, object]] = {}  # parameter name -> (spelling, value) first given
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            break
        if not arg.startswith("-") or arg == "-":
            continue
        key, eq, attached = arg.partition("=")
        if key in names and (len(key) > 2 or not eq):  # --ctx-size=8192, --ctx 8192, -ngl 99
            spelling, value = key, attached if eq else None
        elif arg[:2] in names and len(arg) > 2:  # -c8192
            spelling, value = arg[:2], arg[2:]
        else:
            continue
        p = names[spelling]
        if p.is_flag:
            value = spelling not in p.secondary_opts
        elif value is None and i < len(args):
            value = args[i]
            i += 1
        first = seen.setdefault(p.name, (spelling, value))
        if first[0] != spelling and first[1] != value:
            raise OptionError(f"{first[0]} and {spelling}", f"the same option given twice ({first[1]!r} and "
                                                          f"{value!r}); give it once")


class _Typer(typer.Typer):
    def command(self, *args, **kwargs):
        kwargs.setdefault("cls", _AliasCommand)
        return super().command(*args, **kwargs)


app = _Typer(
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

# llama.cpp's spellings beside ours (common/arg.cpp): each tuple is one option's names, ours first
CTX_NAMES = ("--ctx", "-c", "--ctx-size")
BATCH_NAMES = ("--batch", "-b", "--batch-size")
NGL_NAMES = ("--n-gpu-layers", "-ngl", "--gpu-layers")
ModelOpt = Annotated[Optional[str], typer.Option("--model", "-m", help="The model, as llama.cpp spells it (same as MODEL).", show_default=False)]
NglOpt = Annotated[str, typer.Option(*NGL_NAMES, metavar="N|all|auto", help="Layers to offload to the GPU: a number, 'all' (= 99), or 'auto' (what `llmquant fit` plans for this machine's GPU memory). Needs a GPU build of llama-cpp-python (README).")]
BatchOpt = Annotated[int, typer.Option(*BATCH_NAMES, min=1, help="Prompt tokens per llama.cpp batch (n_batch).")]
MlockOpt = Annotated[bool, typer.Option("--mlock", help="Keep the weights in RAM (no swapping out).")]
NoMmapOpt = Annotated[bool, typer.Option("--no-mmap", help="Read the weights into memory instead of memory-mapping the file.")]
FlashAttnOpt = Annotated[Optional[str], typer.Option("--flash-attn", "-fa", metavar="on|off|auto", help="Flash attention: on, off or auto (bare -fa: on).", show_default=False)]
CacheTypeKOpt = Annotated[Optional[str], typer.Option("--cache-type-k", "-ctk", help="KV cache type for K: f16, bf16, f32, q8_0, q4_0.", show_default=False)]
CacheTypeVOpt = Annotated[Optional[str], typer.Option("--cache-type-v", "-ctv", help="KV cache type for V (quantized V turns on flash attention).", show_default=False)]


def pick(first: tuple[str, Optional[str]], second: tuple[str, Optional[str]]) -> Optional[str]:
    """One value from two spellings of it (a positional and its option: MODEL and -m): either one, or
    both when they agree; different values are an error naming both."""
    (a_name, a), (b_name, b) = first, second
    if a is not None and b is not None and a != b:
        raise OptionError(f"{a_name} and {b_name}", f"two different values ({a!r} and {b!r}); give one")
    return a if a is not None else b


def parse_gpu_layers(value: str) -> int | str:
    """``-ngl``: a number of layers, ``all`` (-1, every layer as llama.cpp's 99 does) or ``auto``."""
    key = str(value).strip().lower()
    if key in ("auto", "all"):
        return -1 if key == "all" else "auto"
    try:
        n = int(key)
    except ValueError:
        n = -2
    if n < 0:
        raise OptionError("--n-gpu-layers", f"{value!r} is not a number of layers >= 0, 'all' or 'auto'")
    return n


def parse_flash_attn(value: Optional[str]) -> Optional[bool]:
    """``-fa on|off|auto`` (llama.cpp's truthy/falsy words too) -> True / False / None (the verb's default)."""
    if value is None:
        return None
    key = value.strip().lower()
    if key in ("on", "1", "true", "yes", "enabled"):
        return True
    if key in ("off", "0", "false", "no", "disabled"):
        return False
    if key == "auto":
        return None
    raise OptionError("--flash-attn", f"{value!r}: expected on, off or auto")


def load_options(path, ngl: str, *, ctx: int, batch: int = 512, mlock: bool = False, no_mmap: bool = False,
                 flash_attn: Optional[str] = None, cache_type_k: Optional[str] = None,
                 cache_type_v: Optional[str] = None, machine: Optional[str] = None):
    """The runtime's LoadOptions from the shared options: ``-ngl auto`` becomes ``fit``'s plan for this
    machine (or ``machine``) and a GPU request on a CPU-only build of llama-cpp-python is accepted with
    one warning line, as llama.cpp does."""
    from ..runtime.llama import LoadOptions, gpu_devices

    n = parse_gpu_layers(ngl)
    devices = gpu_devices()
    if n == "auto":
        n = auto_gpu_layers(path, machine=machine, ctx=ctx, batch=batch, kv_type=cache_type_k or "f16",
                            devices=devices)
    elif n != 0 and not devices:
        err.print(f"[yellow]warning: no usable GPU found, -ngl {ngl} is ignored (this llama-cpp-python "
                  "was built without GPU support; see the README to build it with CUDA or Metal)[/yellow]",
                  highlight=False, soft_wrap=True)
    return LoadOptions(n_gpu_layers=n, use_mmap=not no_mmap, use_mlock=mlock, flash_attn=parse_flash_attn(flash_attn),
                       type_k=cache_type_k, type_v=cache_type_v)


def auto_gpu_layers(path, *, machine: Optional[str] = None, ctx: int = 4096, batch: int = 512,
                    kv_type: str = "f16", devices=None) -> int:
    """``-ngl auto``: the layers ``fit`` plans to put on ``machine``'s GPU (a catalog name), or on this
    machine's GPUs as llama.cpp finds them (none on a CPU-only build: 0)."""
    from ..fit.catalog import load_spec
    from ..fit.machines import find_machine, this_machine, with_gpus
    from ..fit.planner import gpu_layers_that_fit

    if machine is None or machine.strip().lower() == "this":
        if devices is None:
            from ..runtime.llama import gpu_devices

            devices = gpu_devices()
        if not devices:
            return 0
        mach = with_gpus(this_machine(bandwidth=1.0), devices)  # bandwidth: speed only, not layers
    else:
        mach = find_machine(machine)
    kv = kv_type.strip().lower()
    return gpu_layers_that_fit(load_spec(str(path)), mach, n_ctx=ctx, kv_type=kv if kv in ("f16", "q8_0", "q4_0") else "f16",
                               n_batch=batch)


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
