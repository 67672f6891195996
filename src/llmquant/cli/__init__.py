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
from .machines import default_threads

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
    name: Annotated[Optional[str], typer.Option("--name", help="Also add DST to the model store as NAME[:TAG].", show_default=False)] = None,
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
    if name:
        from .store import parse_name

        parse_name(name)  # a bad name fails before any work
    ftype = parse_ftype(qtype)
    options = RecipeOptions(
        pure=pure,
        allow_requantize=allow_requantize,
        quantize_output_tensor=not leave_output_tensor,
        output_tensor_type=parse_ggml_type(output_tensor_type) if output_tensor_type else None,
        token_embedding_type=parse_ggml_type(token_embedding_type) if token_embedding_type else None,
        tensor_types=tuple(parse_tensor_type(spec) for spec in tensor_type),
    )
    n_threads = default_threads(threads)
    imat = load_imatrix(imatrix) if imatrix else None
    weighting = {"importance": imat.entries, "metadata": imat.provenance(imatrix)} if imat else {}
    if dry_run or as_json:
        result = quantize_model(src, dst, ftype, options=options, threads=n_threads, force=force, dry_run=dry_run, **weighting)
    else:
        with _TensorProgress(ftype_name(ftype)) as progress:
            result = quantize_model(src, dst, ftype, options=options, threads=n_threads, force=force, progress=progress, **weighting)
    stored = None
    if name and not dry_run and result.destination:
        from .store import register

        stored = register(result.destination, name)
    if as_json:
        _print_json({**result.to_dict(), **({"stored_as": stored.name} if stored else {})})
        return
    _render_quantize(result, dry_run)
    if stored:
        out.print(f"stored as {stored.name}", highlight=False)
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
    fit_ctx: Annotated[Optional[int], typer.Option("--fit-ctx", help="Context for the memory fit (default: trained, max 8192).")] = None,
    machine: Annotated[str, typer.Option("--machine", help="Machine to fit on (see llmquant fit --machine list).")] = "this",
    threads: ThreadsOpt = 0,
    name: Annotated[Optional[str], typer.Option("--name", help="Also store every rung as NAME[:TAG]-RUNG (e.g. smollm2:135m -> smollm2:135m-q4_k_m).", show_default=False)] = None,
    as_json: JsonOpt = False,
) -> None:
    """The main job: quantize to every rung, measure quality loss, size and speed, and recommend one."""
    from .ladder import run_ladder
    from .report import footer_lines, header_lines, table, write_all

    names = tuple(r.strip() for r in rungs.split(",") if r.strip())
    if name:
        from .store import parse_name, rung_name

        for r in names:
            parse_name(rung_name(name, r))  # a bad name fails before any work
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TimeElapsedColumn(), console=err,
                  transient=True, disable=as_json) as bar:
        task = bar.add_task("ladder", total=1.0)

        def step(desc: str, frac: float | None) -> None:
            bar.update(task, description=desc, completed=frac if frac is not None else 0)

        result = run_ladder(model, rungs=names, out_dir=out_dir, text=text, ctx=ctx, chunks=chunks,
                            threads=threads or None, speed=not no_speed, fit_ctx=fit_ctx, machine=machine,
                            step=step)
    paths = write_all(result, out_dir)
    stored = []
    if name:
        from .store import register, rung_name

        stored = [register(r.path, rung_name(name, r.name)).name for r in result.rungs]
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
    opts = dict(text=text, ctx=ctx, chunks=chunks, threads=threads or None)
    if as_json:
        result = evaluate(path, base_path, **opts)
    else:
        with _TensorProgress("evaluate") as bar:
            result = evaluate(path, base_path, **opts, progress=lambda done, n: bar(done, n, f"chunk {done} of {n}"))
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


# -- run / chat ------------------------------------------------------------------------------------------
PromptOpt = Annotated[Optional[str], typer.Option("--prompt", "-p", help="The prompt (default: read stdin, or chat when stdin is a terminal).", show_default=False)]
CtxOpt = Annotated[int, typer.Option("--ctx", "-c", min=16, help="Context window in tokens.")]
TempOpt = Annotated[float, typer.Option("--temp", min=0.0, max=5.0, help="Temperature; 0 is greedy (always the most likely token).")]
TopPOpt = Annotated[float, typer.Option("--top-p", min=0.0, max=1.0, help="Nucleus sampling: keep the smallest set of tokens with this much probability.")]
TopKOpt = Annotated[int, typer.Option("--top-k", min=0, help="Keep only the K most likely tokens (0: all).")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", "-s", help="Sampling seed (default: random).", show_default=False)]


def _sampling(temp: float, top_p: float, top_k: int, seed: Optional[int]):
    from .runtime import Sampling

    return Sampling(temperature=temp, top_p=top_p, top_k=top_k, seed=seed)


def _stats_line(stats) -> str:
    return (f"prompt: {stats.prompt_tokens} tokens, {stats.prompt_tps:.1f} tok/s | "
            f"generation: {stats.completion_tokens} tokens, {stats.generation_tps:.1f} tok/s ({stats.finish_reason})")


@app.command()
def run(
    model: ModelArg = None,
    prompt: PromptOpt = None,
    n_predict: Annotated[int, typer.Option("--n-predict", "-n", min=-1, help="Tokens to generate at most (-1: until the model stops or the context is full).")] = 256,
    temp: TempOpt = 0.8,
    top_p: TopPOpt = 0.95,
    top_k: TopKOpt = 40,
    seed: SeedOpt = None,
    ctx: CtxOpt = 4096,
    threads: ThreadsOpt = 0,
    chat: Annotated[bool, typer.Option("--chat", help="Send the prompt as one user turn through the model's chat template.")] = False,
    system: Annotated[Optional[str], typer.Option("--system", help="System prompt (with --chat).", show_default=False)] = None,
    as_json: JsonOpt = False,
) -> None:
    """Generate from a prompt, streaming tokens to the terminal, then print tokens/s (llama-cli -p)."""
    from .models import resolve_model
    from .run import ChatSession, load, run_prompt

    path = resolve_model(model)
    if prompt is None and sys.stdin.isatty() and not as_json:
        m = load(path, ctx=ctx, threads=threads or None)
        _chat_loop(ChatSession(m, _sampling(temp, top_p, top_k, seed), n_predict, system), path)
        return
    if prompt is None:
        prompt = sys.stdin.read()
    m = load(path, ctx=ctx, threads=threads or None)
    stream = run_prompt(m, prompt, max_tokens=n_predict, sampling=_sampling(temp, top_p, top_k, seed),
                        chat=chat, system=system)
    interrupted = False
    try:
        for piece in stream:
            if not as_json:
                sys.stdout.write(piece)
                sys.stdout.flush()
    except KeyboardInterrupt:
        interrupted = True
    if as_json:
        s = stream.stats
        _print_json({"model": str(path), "text": stream.text, "tokens": stream.tokens,
                     "prompt_tokens": s.prompt_tokens, "completion_tokens": s.completion_tokens,
                     "finish_reason": "interrupted" if interrupted else s.finish_reason,
                     "prompt_tps": s.prompt_tps, "generation_tps": s.generation_tps, "threads": m.threads})
    else:
        sys.stdout.write("\n")
        sys.stdout.flush()
        err.print(_stats_line(stream.stats) + (" — interrupted" if interrupted else ""), highlight=False, style="dim")
    if interrupted:
        raise typer.Exit(130)


@app.command()
def chat(
    model: ModelArg = None,
    system: Annotated[Optional[str], typer.Option("--system", help="System prompt.", show_default=False)] = None,
    n_predict: Annotated[int, typer.Option("--n-predict", "-n", min=-1, help="Tokens per answer at most (-1: until the model stops).")] = -1,
    temp: TempOpt = 0.8,
    top_p: TopPOpt = 0.95,
    top_k: TopKOpt = 40,
    seed: SeedOpt = None,
    ctx: CtxOpt = 4096,
    threads: ThreadsOpt = 0,
) -> None:
    """Chat with a model in the terminal, using its own chat template (/bye to leave, /? for help)."""
    from .models import resolve_model
    from .run import ChatSession, load

    path = resolve_model(model)
    m = load(path, ctx=ctx, threads=threads or None)
    _chat_loop(ChatSession(m, _sampling(temp, top_p, top_k, seed), n_predict, system), path)


def _chat_loop(session, path) -> None:
    from .chat import ChatTemplateError
    from .run import repl

    interactive = sys.stdin.isatty()
    if interactive:
        _readline_history()
    try:  # render once up front, so a bad or hostile template is refused before the first message
        session.model.format_chat(session.messages("hello"))
    except ChatTemplateError as exc:
        raise LlmquantError(f"{path}: {exc}") from None
    if session.model.chat_template is None:
        err.print("[yellow]this model has no chat template; using ChatML[/yellow]")
    if interactive:
        err.print(f"[dim]{path.name} · /? for help, /bye or Ctrl-D to leave[/dim]", highlight=False)

    def read(prompt: str) -> str:
        if interactive:
            return input(prompt)
        line = sys.stdin.readline()
        if not line:
            raise EOFError
        return line.rstrip("\n")

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    def note(text: str) -> None:
        err.print(text, style="dim", highlight=False, markup=False)

    try:
        repl(session, read, write, note)
    except ChatTemplateError as exc:
        raise LlmquantError(str(exc)) from None


def _readline_history() -> None:
    """Arrow-key editing and a history of past messages kept in $LLMQUANT_HOME/chat_history."""
    try:
        import atexit
        import readline

        from .store import home
    except ImportError:
        return
    path = home() / "chat_history"
    try:
        readline.read_history_file(path)
    except OSError:
        pass
    readline.set_history_length(1000)

    def save() -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(path)
        except OSError:
            pass

    atexit.register(save)


# -- serve -------------------------------------------------------------------------------------------------
@app.command()
def serve(
    model: ModelArg = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port (0: any free port).")] = 8080,
    api_key: Annotated[Optional[str], typer.Option("--api-key", envvar="LLMQUANT_API_KEY", help="Require Authorization: Bearer KEY (or set LLMQUANT_API_KEY).", show_default=False)] = None,
    ctx: CtxOpt = 4096,
    parallel: Annotated[int, typer.Option("--parallel", "-np", min=1, max=64, help="Requests generated at once (each slot has its own context); more wait in line.")] = 1,
    threads: Annotated[int, typer.Option("--threads", "-t", min=0, help="Threads per slot (0: cores / parallel).")] = 0,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log every request.")] = False,
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API (chat, completions, embeddings, models)."""
    from .models import DEFAULT_MODEL_NAME, resolve_model
    from .serve import bind, is_loopback, load_state
    from .serve import serve as run_server

    path = resolve_model(model)
    if model is None or model in (DEFAULT_MODEL_NAME, "default"):
        model_id = DEFAULT_MODEL_NAME
    elif Path(model).expanduser().exists():
        model_id = path.stem
    else:
        from .store import get

        model_id = get(model).name
    sock = bind(host, port)
    if not is_loopback(host) and not api_key:
        err.print(f"[yellow]warning: listening on {host} without --api-key: anyone who can reach it can use it[/yellow]")
    state = load_state(path, model_id, n_ctx=ctx, parallel=parallel, threads=threads or None, api_key=api_key,
                       aliases={model or DEFAULT_MODEL_NAME, "default" if model is None else model_id})

    def announce(url: str) -> None:
        out.print(f"serving {model_id} on {url}/v1 ({parallel} slot{'s' if parallel > 1 else ''}, "
                  f"context {ctx}, {state.threads} thread{'s' if state.threads > 1 else ''} per slot"
                  f"{', API key required' if api_key else ''}) — Ctrl-C to stop", highlight=False, soft_wrap=True)
        sys.stdout.flush()

    run_server(state, sock, log_level="info" if verbose else "warning", announce=announce)


# -- bench -------------------------------------------------------------------------------------------------
@app.command()
def bench(
    model: ModelArg = None,
    n_prompt: Annotated[int, typer.Option("--n-prompt", "-p", min=0, help="Prompt tokens for the pp test (0: skip).")] = 512,
    n_gen: Annotated[int, typer.Option("--n-gen", "-n", min=0, help="Generated tokens for the tg test (0: skip).")] = 128,
    repetitions: Annotated[int, typer.Option("--repetitions", "-r", min=1, help="Repetitions of each test.")] = 3,
    threads: ThreadsOpt = 0,
    as_json: JsonOpt = False,
) -> None:
    """Prompt-processing and generation speed (tokens/s, mean ± stddev) in llama-bench's columns."""
    from .bench import bench_model, bench_rows
    from .models import resolve_model

    path = resolve_model(model)
    result = bench_model(path, n_prompt=n_prompt, n_gen=n_gen, repetitions=repetitions, threads=threads or None)
    rows = bench_rows(result)
    if as_json:
        _print_json({**result.to_dict(), "rows": rows})
        return
    cols = [("model", "l"), ("size", "r"), ("params", "r"), ("backend", "l"), ("threads", "r"), ("test", "r"), ("t/s", "r")]
    cells = [[r["model"], r["size"], r["params"], r["backend"], str(r["threads"]), r["test"], r["t/s"]] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, (c, _) in enumerate(cols)]

    def fmt(values: list[str]) -> str:
        return "| " + " | ".join(v.rjust(w) if a == "r" else v.ljust(w) for v, w, (_, a) in zip(values, widths, cols)) + " |"

    lines = [fmt([c for c, _ in cols]),
             "| " + " | ".join(("-" * (w - 1) + ":") if a == "r" else "-" * w for w, (_, a) in zip(widths, cols)) + " |"]
    sys.stdout.write("\n".join(lines + [fmt(row) for row in cells]) + "\n")  # markdown, never wrapped


# -- store: pull / list / show / rm --------------------------------------------------------------------------
NameArg = Annotated[str, typer.Argument(help="A model name, NAME[:TAG] (see llmquant list).", show_default=False)]


@app.command()
def pull(
    src: Annotated[str, typer.Argument(help="A GGUF file, a folder holding one, or hf.co/ORG/REPO[:QUANT] from the local Hugging Face cache.", show_default=False)],
    name: Annotated[Optional[str], typer.Option("--name", help="Store it as NAME[:TAG] (default: from the model's metadata).", show_default=False)] = None,
    copy: Annotated[bool, typer.Option("--copy", help="Always copy (default: hard-link when on the same disk).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Add a local model to the store under a name:tag (offline: never downloads)."""
    from .store import pull as pull_model

    m = pull_model(src, name, link=not copy)
    if as_json:
        _print_json(m.to_dict())
        return
    out.print(f"pulled {m.name} ({_human_bytes(m.size)}, {m.file_type or '?'}, "
              f"{_human_count(m.n_params)} parameters) from {m.source}", highlight=False, soft_wrap=True)


@app.command("list")
def list_(as_json: JsonOpt = False) -> None:
    """List the models in the store (and the embedded default)."""
    import datetime

    from .store import home, list_models

    models = list_models()
    if as_json:
        _print_json([m.to_dict() for m in models])
        return
    t = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("NAME", "SIZE", "QUANT", "PARAMS", "MODIFIED"):
        t.add_column(col, justify="right" if col in ("SIZE", "PARAMS") else "left")
    now = datetime.datetime.now().timestamp()
    for m in models:
        when = "embedded" if m.embedded else _ago(now - m.modified)
        t.add_row(m.name, _human_bytes(m.size), m.file_type or "?", _human_count(m.n_params), when)
    out.print(t)
    err.print(f"[dim]store: {home()}[/dim]", highlight=False)


def _ago(seconds: float) -> str:
    for unit, n in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= n:
            k = int(seconds // n)
            return f"{k} {unit}{'s' if k > 1 else ''} ago"
    return "just now"


@app.command()
def show(
    name: NameArg,
    template: Annotated[bool, typer.Option("--template", help="Print only the chat template.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Show a stored model: details, default parameters, chat template and metadata."""
    from .store import show as show_model

    info = show_model(name)
    if as_json:
        _print_json(info)
        return
    if template:
        sys.stdout.write((info["chat_template"] or "") + "\n")
        return
    m, d = info["model"], info["details"]

    def section(title: str, rows: list[tuple[str, str]]) -> None:
        t = Table(show_header=False, box=None, pad_edge=False, title=title, title_justify="left", title_style="bold")
        t.add_column(style="dim", no_wrap=True)
        t.add_column(overflow="fold")
        for k, v in rows:
            t.add_row(k, v)
        out.print(t)
        out.print()

    section("Model", [
        ("name", m["name"]), ("file", m["path"]), ("source", m["source"]),
        ("architecture", str(d["architecture"])),
        ("parameters", f"{_human_count(d['parameters'])} ({d['parameters']:,})"),
        ("quantization", str(d["quantization"] or "?")), ("size", _human_bytes(m["size"])),
        ("context length", str(d["context_length"] or "-")), ("embedding length", str(d["embedding_length"] or "-")),
        ("layers", str(d["layers"] or "-")), ("heads / kv heads", f"{d['heads'] or '-'} / {d['kv_heads'] or '-'}"),
        ("vocabulary", str(d["vocabulary"] or "-")), ("license", str(d["license"] or "-")),
    ] + ([("sha256", m["sha256"])] if m.get("sha256") else []))
    p = info["parameters"]
    section("Parameters", [(k, json.dumps(v) if k == "stop" else str(v)) for k, v in p.items()])
    out.print("[bold]Chat template[/bold]")
    out.print(info["chat_template"] or "(none: chat uses ChatML)", markup=False, highlight=False, soft_wrap=True)
    out.print()
    section("Metadata", [(k, str(v)) for k, v in info["metadata"].items()])


@app.command()
def rm(names: Annotated[list[str], typer.Argument(help="Model names to remove.", show_default=False)]) -> None:
    """Remove models from the store (their files too, unless still linked elsewhere)."""
    from .store import remove

    for name in names:
        m = remove(name)
        out.print(f"deleted {m.name}", highlight=False)


# -- convert ----------------------------------------------------------------------------------------------
@app.command()
def convert(
    hf_dir: Annotated[str, typer.Argument(help="A Hugging Face model folder (config.json, *.safetensors, tokenizer).", show_default=False)],
    dst: Annotated[Optional[str], typer.Argument(help="Output GGUF (default: NAME-SIZE-TYPE.gguf here).", show_default=False)] = None,
    outtype: Annotated[str, typer.Option("--outtype", help="f32, f16, bf16, q8_0, or auto (BF16/F16 as stored).")] = "auto",
    quantize_to: Annotated[Optional[str], typer.Option("--quantize", "-q", help="Then quantize to this type (e.g. Q4_K_M) in the same run.")] = None,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Read PyTorch .bin pickles (can run code; needs torch).")] = False,
    threads: ThreadsOpt = 0,
    force: Annotated[bool, typer.Option("--force", "-f", help="Overwrite DST if it exists.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Convert a Hugging Face safetensors folder to GGUF, as llama.cpp's convert_hf_to_gguf.py does."""
    from .convert import convert_model, parse_outtype
    from .recipes import parse_ftype

    ftype = parse_outtype(outtype)
    target = parse_ftype(quantize_to) if quantize_to else None
    kwargs = dict(quantize=target, threads=default_threads(threads), force=force, allow_pickle=allow_pickle)
    if as_json:
        result = convert_model(hf_dir, dst, ftype, **kwargs)
        _print_json(result.to_dict())
        return
    with _TensorProgress("convert") as progress:
        result = convert_model(hf_dir, dst, ftype, progress=progress, **kwargs)
    kind = f"outtype {result.outtype}" + (f", quantized to {result.quantized_to}" if result.quantized_to else "")
    types = Table(title=f"{result.hf_architecture} -> {result.architecture}, {kind}")
    for col in ("type", "tensors", "params", "bytes"):
        types.add_column(col, justify="left" if col == "type" else "right")
    for name, e in sorted(result.type_counts().items(), key=lambda kv: -kv[1]["bytes"]):
        types.add_row(name, str(e["tensors"]), _human_count(e["params"]), _human_bytes(e["bytes"]))
    out.print(types)
    out.print(f"vocabulary: {result.vocab_size} tokens ({result.tokenizer}, pre-tokenizer {result.pre_tokenizer})", highlight=False)
    step = f", then quantized to {result.quantized_to}" if result.quantized_to else ""
    out.print(f"wrote {result.destination}: {_human_bytes(result.file_bytes)}, {_human_count(result.n_params)} parameters"
              f"{step}, in {result.seconds:.1f} s", highlight=False)
    for note in result.notes:
        out.print(f"[dim]note: {note}[/dim]")


# -- fit ----------------------------------------------------------------------------------------------------
@app.command()
def fit(
    model: ModelArg = None,
    ctx: Annotated[Optional[int], typer.Option("--ctx", help="Context length in tokens (default: 4096, or the trained context if smaller).")] = None,
    kv_type: Annotated[str, typer.Option("--kv-type", help="KV cache type: f16, q8_0 or q4_0.")] = "f16",
    batch: Annotated[int, typer.Option("--batch", help="Prompt batch size (n_batch; llama-cpp-python caps the micro-batch at 512).")] = 512,
    machine: Annotated[Optional[str], typer.Option("--machine", help="A catalog machine (e.g. rtx-4090, macbook-air-m2-8gb), 'this' (measured; the default) or 'list'.")] = None,
    ram: Annotated[Optional[str], typer.Option("--ram", help="Describe the machine instead: system RAM, e.g. 32GB.")] = None,
    vram: Annotated[Optional[str], typer.Option("--vram", help="With --ram: one CUDA GPU with this much VRAM, e.g. 12GB.")] = None,
    task: Annotated[str, typer.Option("--task", help="chat, summarise, rag, code, math or reasoning (steers the recommendation).")] = "chat",
    as_json: JsonOpt = False,
) -> None:
    """What fits where: memory (weights, KV cache, compute, runtime) and speed of every quantization rung on a machine.

    MODEL is a GGUF file, a Hugging Face folder (config.json + safetensors headers; no weights read), a preset
    (llama-3-8b, qwen2.5-7b, ...) or a size such as 8B or qwen2.5:14b. Default: the embedded SmolLM2-135M.
    """
    from .fit import fit_for
    from .machines import CATALOG

    if machine is not None and machine.strip().lower() == "list":
        if as_json:
            _print_json([m.to_dict() for m in CATALOG])
            return
        t = Table(title="machines")
        for col in ("name", "machine", "memory", "bandwidth"):
            t.add_column(col)
        for m in CATALOG:
            mem = f"{m.gpus} x {m.vram / 2**30:g} GiB VRAM + {m.ram / 2**30:g} GiB RAM" if m.kind == "gpu" else f"{m.ram / 2**30:g} GiB"
            bw = f"{m.gpu_bandwidth:g} GB/s (RAM {m.bandwidth:g})" if m.kind == "gpu" else f"{m.bandwidth:g} GB/s"
            t.add_row(m.name, m.label, mem, bw)
        out.print(t)
        out.print("this: this machine (RAM read from the OS, bandwidth measured)")
        return
    report = fit_for(model, machine=machine, ram=ram, vram=vram, n_ctx=ctx, kv_type=kv_type, n_batch=batch, task=task)
    if as_json:
        _print_json(report.to_dict())
        return
    _render_fit(report)


def _fit_bytes(n: float) -> str:
    """Compact sizes for the fit table: 4.58 GiB, 275 MiB."""
    return f"{n / 2**30:.2f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:.0f} MiB"


def _render_fit(report) -> None:
    spec, c, m, rec = report.spec, report.ctx, report.machine, report.recommendation
    out.print(f"[bold]{spec.name}[/bold] ({spec.arch}, {_human_count(spec.n_params)} parameters, trained context "
              f"{spec.n_ctx_train or '?'}) - context {c.n_ctx}, KV {c.kv_type}, batch {c.n_batch_eff}"
              f"{', flash attention' if c.flash_attn else ''}", highlight=False)
    usable = report.to_dict()["machine"]["usable_bytes"]
    if m.kind == "gpu":
        out.print(f"on {m.label}: {_fit_bytes(m.vram * m.gpus)} of VRAM, {_fit_bytes(usable)} of RAM usable", highlight=False)
    else:
        out.print(f"on {m.label}: {_fit_bytes(usable)} usable", highlight=False)
    t = Table()
    for col in ("rung", "bpw", "weights", "KV cache", "compute", "runtime", "total", "fits", "headroom", "tok/s", "max ctx"):
        t.add_column(col, justify="left" if col in ("rung", "fits") else "right")
    for r in report.rungs:
        if not r.fits:
            fits = "[red]no[/red]"
        elif r.placement == "gpu+cpu":
            fits = f"[yellow]partial ({r.gpu_layers} layers)[/yellow]"
        else:
            fits = "[yellow]tight[/yellow]" if r.tight else "[green]yes[/green]"
        name = r.ftype + (" (this file)" if r.weights.this_file else "")
        if r.ftype == rec.ftype:
            name = f"[bold]{name} <-[/bold]"
        t.add_row(name, f"{r.weights.bits_per_weight:.2f}", _fit_bytes(r.memory.weights), _fit_bytes(r.memory.kv),
                  _fit_bytes(r.compute + r.memory.output), _fit_bytes(r.memory.overhead), _fit_bytes(r.total),
                  fits, _fit_bytes(r.headroom), f"{r.tok_s:.0f}", str(r.max_ctx or "-"))
    out.print(t)
    for w in report.warnings:
        out.print(f"[yellow]warning: {w}[/yellow]", highlight=False)
    for n in spec.notes:
        out.print(f"[dim]note: {n}[/dim]", highlight=False)
    out.print(rec.verdict, highlight=False)


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
