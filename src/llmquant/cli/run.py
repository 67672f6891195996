"""Verbs that run a model through llama.cpp: run, chat, serve, bench."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import LlmquantError
from .options import (
    CTX_NAMES,
    BatchOpt,
    CacheTypeKOpt,
    CacheTypeVOpt,
    FlashAttnOpt,
    JsonOpt,
    MlockOpt,
    ModelArg,
    ModelOpt,
    NglOpt,
    NoMmapOpt,
    ThreadsOpt,
    _print_json,
    app,
    err,
    load_options,
    out,
    pick,
)

# -- run / chat ------------------------------------------------------------------------------------------
PromptOpt = Annotated[Optional[str], typer.Option("--prompt", "-p", help="The prompt (default: read stdin, or chat when stdin is a terminal).", show_default=False)]
CtxOpt = Annotated[int, typer.Option(*CTX_NAMES, min=16, help="Context window in tokens.")]
TempOpt = Annotated[float, typer.Option("--temp", "--temperature", min=0.0, max=5.0, help="Temperature; 0 is greedy (always the most likely token).")]
TopPOpt = Annotated[float, typer.Option("--top-p", min=0.0, max=1.0, help="Nucleus sampling: keep the smallest set of tokens with this much probability.")]
TopKOpt = Annotated[int, typer.Option("--top-k", min=0, help="Keep only the K most likely tokens (0: all).")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", "-s", help="Sampling seed (default: random).", show_default=False)]
MinPOpt = Annotated[float, typer.Option("--min-p", min=0.0, max=1.0, help="Drop tokens less likely than this fraction of the most likely one.")]
RepeatPenaltyOpt = Annotated[float, typer.Option("--repeat-penalty", min=0.0, help="Penalise tokens already in the context (1.0: off).")]


def _sampling(temp: float, top_p: float, top_k: int, seed: Optional[int], min_p: float = 0.05, repeat_penalty: float = 1.0):
    from ..runtime.llama import Sampling

    return Sampling(temperature=temp, top_p=top_p, top_k=top_k, seed=seed, min_p=min_p, repeat_penalty=repeat_penalty)


def _stats_line(stats) -> str:
    return (f"prompt: {stats.prompt_tokens} tokens, {stats.prompt_tps:.1f} tok/s | "
            f"generation: {stats.completion_tokens} tokens, {stats.generation_tps:.1f} tok/s ({stats.finish_reason})")


@app.command()
def run(
    model: ModelArg = None,
    model_opt: ModelOpt = None,
    prompt: PromptOpt = None,
    n_predict: Annotated[int, typer.Option("--n-predict", "-n", "--predict", min=-1, help="Tokens to generate at most (-1: until the model stops or the context is full).")] = 256,
    temp: TempOpt = 0.8,
    top_p: TopPOpt = 0.95,
    top_k: TopKOpt = 40,
    min_p: MinPOpt = 0.05,
    repeat_penalty: RepeatPenaltyOpt = 1.0,
    seed: SeedOpt = None,
    ctx: CtxOpt = 4096,
    threads: ThreadsOpt = 0,
    batch: BatchOpt = 512,
    ngl: NglOpt = "0",
    mlock: MlockOpt = False,
    no_mmap: NoMmapOpt = False,
    flash_attn: FlashAttnOpt = None,
    cache_type_k: CacheTypeKOpt = None,
    cache_type_v: CacheTypeVOpt = None,
    chat: Annotated[bool, typer.Option("--chat", help="Send the prompt as one user turn through the model's chat template.")] = False,
    system: Annotated[Optional[str], typer.Option("--system", help="System prompt (with --chat).", show_default=False)] = None,
    as_json: JsonOpt = False,
) -> None:
    """Generate from a prompt, streaming tokens to the terminal, then print tokens/s (llama-cli -p)."""
    from ..serve.session import ChatSession, load, run_prompt
    from ..store import resolve_model

    path = resolve_model(pick(("MODEL", model), ("--model", model_opt)))
    options = load_options(path, ngl, ctx=ctx, batch=batch, mlock=mlock, no_mmap=no_mmap, flash_attn=flash_attn,
                           cache_type_k=cache_type_k, cache_type_v=cache_type_v)
    sampling = _sampling(temp, top_p, top_k, seed, min_p, repeat_penalty)
    if prompt is None and sys.stdin.isatty() and not as_json:
        m = load(path, ctx=ctx, threads=threads or None, batch=batch, options=options)
        _chat_loop(ChatSession(m, sampling, n_predict, system), path)
        return
    if prompt is None:
        prompt = sys.stdin.read()
    m = load(path, ctx=ctx, threads=threads or None, batch=batch, options=options)
    stream = run_prompt(m, prompt, max_tokens=n_predict, sampling=sampling, chat=chat, system=system)
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
                     "prompt_tps": s.prompt_tps, "generation_tps": s.generation_tps, "threads": m.threads,
                     "offload": m.offload.to_dict()})
    else:
        sys.stdout.write("\n")
        sys.stdout.flush()
        err.print(_stats_line(stream.stats) + f" | {m.offload.describe()}" + (" — interrupted" if interrupted else ""),
                  highlight=False, style="dim", soft_wrap=True)
    if interrupted:
        raise typer.Exit(130)


@app.command()
def chat(
    model: ModelArg = None,
    model_opt: ModelOpt = None,
    system: Annotated[Optional[str], typer.Option("--system", help="System prompt.", show_default=False)] = None,
    n_predict: Annotated[int, typer.Option("--n-predict", "-n", "--predict", min=-1, help="Tokens per answer at most (-1: until the model stops).")] = -1,
    temp: TempOpt = 0.8,
    top_p: TopPOpt = 0.95,
    top_k: TopKOpt = 40,
    min_p: MinPOpt = 0.05,
    repeat_penalty: RepeatPenaltyOpt = 1.0,
    seed: SeedOpt = None,
    ctx: CtxOpt = 4096,
    threads: ThreadsOpt = 0,
    batch: BatchOpt = 512,
    ngl: NglOpt = "0",
    mlock: MlockOpt = False,
    no_mmap: NoMmapOpt = False,
    flash_attn: FlashAttnOpt = None,
    cache_type_k: CacheTypeKOpt = None,
    cache_type_v: CacheTypeVOpt = None,
) -> None:
    """Chat with a model in the terminal, using its own chat template (/bye to leave, /? for help)."""
    from ..serve.session import ChatSession, load
    from ..store import resolve_model

    path = resolve_model(pick(("MODEL", model), ("--model", model_opt)))
    options = load_options(path, ngl, ctx=ctx, batch=batch, mlock=mlock, no_mmap=no_mmap, flash_attn=flash_attn,
                           cache_type_k=cache_type_k, cache_type_v=cache_type_v)
    m = load(path, ctx=ctx, threads=threads or None, batch=batch, options=options)
    _chat_loop(ChatSession(m, _sampling(temp, top_p, top_k, seed, min_p, repeat_penalty), n_predict, system), path)


def _chat_loop(session, path) -> None:
    from ..runtime.chat import ChatTemplateError
    from ..serve.session import repl

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
        err.print(f"[dim]{path.name} · {session.model.offload.describe()} · /? for help, /bye or Ctrl-D to leave[/dim]",
                  highlight=False)

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

        from ..store import home
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
    model_opt: ModelOpt = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port (0: any free port).")] = 8080,
    api_key: Annotated[Optional[str], typer.Option("--api-key", envvar="LLMQUANT_API_KEY", help="Require Authorization: Bearer KEY (or set LLMQUANT_API_KEY).", show_default=False)] = None,
    ctx: CtxOpt = 4096,
    parallel: Annotated[int, typer.Option("--parallel", "-np", min=1, max=64, help="Requests generated at once (each slot has its own context); more wait in line.")] = 1,
    threads: Annotated[int, typer.Option("--threads", "-t", min=0, help="Threads per slot (0: cores / parallel).")] = 0,
    batch: BatchOpt = 512,
    ngl: NglOpt = "0",
    mlock: MlockOpt = False,
    no_mmap: NoMmapOpt = False,
    flash_attn: FlashAttnOpt = None,
    cache_type_k: CacheTypeKOpt = None,
    cache_type_v: CacheTypeVOpt = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log every request.")] = False,
    max_memory: Annotated[Optional[str], typer.Option("--max-memory", help="Memory the loaded models may use together, e.g. 8G (default: what fit counts as usable here).", show_default=False)] = None,
    max_models: Annotated[int, typer.Option("--max-models", min=1, max=64, help="Models loaded at once at most (Ollama's OLLAMA_MAX_LOADED_MODELS).")] = 3,
) -> None:
    """Serve models over OpenAI's and Ollama's HTTP APIs (chat, completions, embeddings, models;
    /api/chat, /api/generate, ...). MODEL is loaded first; any store model a request names is loaded
    on demand, least recently used ones unloaded to stay within --max-memory. --port 11434 stands in
    for Ollama."""
    from ..models import DEFAULT_MODEL_NAME
    from ..serve.app import bind, is_loopback, load_state
    from ..serve.app import serve as run_server
    from ..store import resolve_model

    model = pick(("MODEL", model), ("--model", model_opt))
    path = resolve_model(model)
    options = load_options(path, ngl, ctx=ctx, batch=batch, mlock=mlock, no_mmap=no_mmap, flash_attn=flash_attn,
                           cache_type_k=cache_type_k, cache_type_v=cache_type_v)
    if model is None or model in (DEFAULT_MODEL_NAME, "default"):
        model_id = DEFAULT_MODEL_NAME
    elif Path(model).expanduser().exists():
        model_id = path.stem
    else:
        from ..store import get

        model_id = get(model).name
    sock = bind(host, port)
    if not is_loopback(host) and not api_key:
        err.print(f"[yellow]warning: listening on {host} without --api-key: anyone who can reach it can use it[/yellow]")
    from ..fit.machines import parse_size
    from ..serve.pool import ModelPool, default_budget

    budget = parse_size(max_memory, what="--max-memory") if max_memory else default_budget()
    state = load_state(path, model_id, n_ctx=ctx, parallel=parallel, threads=threads or None, api_key=api_key,
                       aliases={model or DEFAULT_MODEL_NAME, "default" if model is None else model_id},
                       batch=batch, options=options)
    offload = state.slots.models[0].offload.describe()
    pool = ModelPool(budget=budget, max_models=max_models, n_ctx=ctx, parallel=parallel, threads=threads or None,
                     api_key=api_key, batch=batch, options=options)
    pool.add(state)

    def announce(url: str) -> None:
        out.print(f"serving {model_id} on {url}/v1 ({parallel} slot{'s' if parallel > 1 else ''}, "
                  f"context {ctx}, {state.threads} thread{'s' if state.threads > 1 else ''} per slot, {offload}"
                  f"{', API key required' if api_key else ''}) — Ctrl-C to stop", highlight=False, soft_wrap=True)
        sys.stdout.flush()

    run_server(state, sock, log_level="info" if verbose else "warning", announce=announce, pool=pool)


@app.command()
def ui(
    host: Annotated[str, typer.Option("--host", help="Address to listen on (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port (0: any free port).")] = 8080,
    api_key: Annotated[Optional[str], typer.Option("--api-key", envvar="LLMQUANT_API_KEY", help="Require Authorization: Bearer KEY (the page asks for it).", show_default=False)] = None,
    reports: Annotated[Optional[list[Path]], typer.Option("--reports", help="A folder to search for ladder reports (ladder.json), besides the store; repeatable.", show_default=False)] = None,
    ctx: CtxOpt = 4096,
    max_memory: Annotated[Optional[str], typer.Option("--max-memory", help="Memory the loaded models may use together (default: what fit counts as usable here).", show_default=False)] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log every request.")] = False,
) -> None:
    """A local web page: the store's models with fit's verdict on this machine, ladder reports (table and chart),
    and a streaming chat. Starts the server (OpenAI and Ollama APIs too) and prints its address."""
    from ..fit.machines import parse_size
    from ..models import DEFAULT_MODEL_NAME
    from ..serve.app import bind, is_loopback
    from ..serve.app import serve as run_server
    from ..serve.pool import ModelPool, default_budget

    sock = bind(host, port)
    if not is_loopback(host) and not api_key:
        err.print(f"[yellow]warning: listening on {host} without --api-key: anyone who can reach it can use it[/yellow]")
    budget = parse_size(max_memory, what="--max-memory") if max_memory else default_budget()
    pool = ModelPool(budget=budget, n_ctx=ctx, api_key=api_key)
    pool.default = DEFAULT_MODEL_NAME

    def announce(url: str) -> None:
        out.print(f"llmquant ui on {url}/ (API on {url}/v1 and {url}/api) — Ctrl-C to stop", highlight=False,
                  soft_wrap=True)
        sys.stdout.flush()

    run_server(None, sock, log_level="info" if verbose else "warning", announce=announce, pool=pool,
               report_dirs=[p.expanduser() for p in reports or []])


# -- bench -------------------------------------------------------------------------------------------------
@app.command()
def bench(
    model: ModelArg = None,
    n_prompt: Annotated[int, typer.Option("--n-prompt", "-p", min=0, help="Prompt tokens for the pp test (0: skip).")] = 512,
    n_gen: Annotated[int, typer.Option("--n-gen", "-n", min=0, help="Generated tokens for the tg test (0: skip).")] = 128,
    repetitions: Annotated[int, typer.Option("--repetitions", "-r", min=1, help="Repetitions of each test.")] = 3,
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
    """Prompt-processing and generation speed (tokens/s, mean ± stddev) in llama-bench's columns."""
    from ..measure.bench import bench_model, bench_rows
    from ..store import resolve_model

    path = resolve_model(pick(("MODEL", model), ("--model", model_opt)))
    options = load_options(path, ngl, ctx=max(n_prompt + n_gen + 8, 64), batch=max(n_prompt, 32), mlock=mlock,
                           no_mmap=no_mmap, flash_attn=flash_attn, cache_type_k=cache_type_k, cache_type_v=cache_type_v)
    result = bench_model(path, n_prompt=n_prompt, n_gen=n_gen, repetitions=repetitions, threads=threads or None,
                         options=options)
    rows = bench_rows(result)
    if as_json:
        _print_json({**result.to_dict(), "rows": rows})
        return
    # llama-bench adds an ngl column when layers are offloaded
    cols = [("model", "l"), ("size", "r"), ("params", "r"), ("backend", "l"), ("threads", "r")]
    cols += [("ngl", "r")] if options.n_gpu_layers else []
    cols += [("test", "r"), ("t/s", "r")]
    cells = [[r["model"], r["size"], r["params"], r["backend"], str(r["threads"])]
             + ([str(r["ngl"])] if options.n_gpu_layers else []) + [r["test"], r["t/s"]] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, (c, _) in enumerate(cols)]

    def fmt(values: list[str]) -> str:
        return "| " + " | ".join(v.rjust(w) if a == "r" else v.ljust(w) for v, w, (_, a) in zip(values, widths, cols)) + " |"

    lines = [fmt([c for c, _ in cols]),
             "| " + " | ".join(("-" * (w - 1) + ":") if a == "r" else "-" * w for w, (_, a) in zip(widths, cols)) + " |"]
    sys.stdout.write("\n".join(lines + [fmt(row) for row in cells]) + "\n")  # markdown, never wrapped
    if result.offload:
        err.print(result.offload["placement"], highlight=False, style="dim")
