"""Verbs that read or write GGUF files: inspect, quantize."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.table import Table

from ..errors import LlmquantError, OptionError
from ..system import default_threads
from .options import (
    JsonOpt,
    SplitOpt,
    ModelArg,
    ThreadsOpt,
    _human_bytes,
    _human_count,
    _print_json,
    _TensorProgress,
    app,
    out,
    split_bytes,
    pick,
)


# -- inspect --------------------------------------------------------------------------------------------
@app.command()
def inspect(
    model: ModelArg = None,
    tensors: Annotated[bool, typer.Option("--tensors", help="List every tensor.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Show what a GGUF or a Hugging Face folder holds: architecture, size, bits per weight, hyper-parameters,
    tensor types; for a GPTQ / AWQ / compressed-tensors folder also bits, group size and size in memory."""
    from ..gguf.inspect import inspect_model
    from ..runtime.torch import is_hf_folder
    from ..store import resolve_model

    path = resolve_model(model)
    if is_hf_folder(path):
        _inspect_hf(path, tensors, as_json)
        return
    info = inspect_model(path)
    if as_json:
        _print_json(info.to_dict(with_tensors=tensors))
        return
    rows = [
        ("file", info.path),
        ("name", info.name or "-"),
        ("architecture", info.architecture),
        ("parameters", f"{_human_count(info.n_params)} ({info.n_params:,})"),
        ("file type", info.file_type or "-"),
        ("size", f"{_human_bytes(info.file_bytes)} (tensors {_human_bytes(info.tensor_bytes)})"),
        ("bits per weight", f"{info.bits_per_weight:.2f}"),
        *_shape_rows(info, f"{info.tokenizer_model or 'no tokenizer'}"),
        ("GGUF version", str(info.gguf_version)),
    ]
    _render_inspect(rows, "type", info.types, info.tensor_bytes, info.tensors if tensors else None, "type")


def _shape_rows(info, tokenizer: str) -> list[tuple[str, str]]:
    """The hyper-parameter rows GGUF and HF inspect share."""
    return [
        ("context length", str(info.context_length or "-")),
        ("layers", str(info.n_layer or "-")),
        ("embedding", str(info.n_embd or "-")),
        ("heads / kv heads", f"{info.n_head or '-'} / {info.n_head_kv or '-'}"),
        ("feed-forward", str(info.n_ff or "-")),
        ("vocabulary", f"{info.vocab_size or '-'} ({tokenizer})"),
        ("chat template", "yes" if info.has_chat_template else "no"),
    ]


def _render_inspect(rows, kind: str, groups: dict, tensor_bytes: int, tensors: list[dict] | None, type_key: str) -> None:
    """The key/value table, the per-type (or per-kind) summary and, if asked, every tensor."""
    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    for k, v in rows:
        t.add_row(k, v)
    out.print(t)
    types = Table(title=f"tensor {kind}s")
    for col in (kind, "tensors", "params", "bytes", "share"):
        types.add_column(col, justify="right" if col != kind else "left")
    for name, e in groups.items():
        types.add_row(name, str(e["tensors"]), _human_count(e["params"]), _human_bytes(e["bytes"]),
                      f"{100 * e['bytes'] / max(tensor_bytes, 1):.1f}%")
    out.print(types)
    if tensors is not None:
        tt = Table(title="tensors")
        for col in ("name", "shape", "type", "bytes"):
            tt.add_column(col, justify="right" if col == "bytes" else "left")
        for e in tensors:
            tt.add_row(e["name"], "x".join(str(d) for d in e["shape"]), e[type_key], f"{e['bytes']:,}")
        out.print(tt)


def _inspect_hf(path, tensors: bool, as_json: bool) -> None:
    from ..hf.inspect import inspect_hf

    info = inspect_hf(path)
    if as_json:
        _print_json(info.to_dict(with_tensors=tensors))
        return
    sc = info.scheme
    rows = [
        ("folder", info.path),
        ("architecture", f"{info.architecture} ({info.model_type or '?'})"),
        ("parameters", f"{_human_count(info.n_params)} ({info.n_params:,})"),
        ("format", sc.label if sc else f"{info.dtype or '?'} (not quantized)"),
    ]
    if sc:
        rows += [("on disk", sc.format), ("bits / group size", f"{sc.bits} / {sc.group_size or 'per channel'}"),
                 ("zero point", "no (symmetric)" if sc.symmetric else "yes (asymmetric)"),
                 ("act-order", sc.act_order or "none"),
                 ("quantized linears", f"{info.quantized_linears} ({_human_count(info.quantized_params)} parameters, "
                                       f"{info.quantized_bits_per_weight or 0:.2f} bits each with scales and zeros)"),
                 ("not quantized", ", ".join(sc.ignored) or "-")]
    rows += [
        ("size", f"{_human_bytes(info.file_bytes)} (tensors {_human_bytes(info.tensor_bytes)})"),
        ("bits per weight", f"{info.bits_per_weight:.2f}"),
    ]
    if sc:
        rows.append(("in memory", f"{_human_bytes(info.tensor_bytes)} packed (vLLM, GPTQModel kernels); "
                                  f"{_human_bytes(info.dequantized_bytes)} dequantized to {info.dtype or 'bf16'}"))
    rows += [
        *_shape_rows(info, "tokenizer.json" if info.has_tokenizer else "no tokenizer.json"),
    ]
    _render_inspect(rows, "kind", info.kinds, info.tensor_bytes, info.tensors if tensors else None, "dtype")


# -- quantize ---------------------------------------------------------------------------------------------
@app.command()
def quantize(
    paths: Annotated[Optional[list[str]], typer.Argument(metavar="[SRC] DST [TYPE [THREADS]]", help="Source GGUF (default: the embedded model) and output file; TYPE and THREADS may follow as llama-quantize takes them (SRC TYPE alone writes ggml-model-TYPE.gguf beside SRC).", show_default=False)] = None,
    qtype: Annotated[Optional[str], typer.Option("--type", "-q", help="Target file type, e.g. Q8_0, Q4_K_M, Q5_1, F16 (or TYPE after the paths).  [default: Q8_0]", show_default=False)] = None,
    pure: Annotated[bool, typer.Option("--pure", help="Quantize every tensor to the one type (no mixture rules).")] = False,
    allow_requantize: Annotated[bool, typer.Option("--allow-requantize", help="Allow a source that is already quantized.")] = False,
    leave_output_tensor: Annotated[bool, typer.Option("--leave-output-tensor", help="Do not quantize output.weight.")] = False,
    output_tensor_type: Annotated[Optional[str], typer.Option("--output-tensor-type", help="Type for output.weight.")] = None,
    token_embedding_type: Annotated[Optional[str], typer.Option("--token-embedding-type", help="Type for token_embd.weight.")] = None,
    tensor_type: Annotated[list[str], typer.Option("--tensor-type", help="REGEX=TYPE override (repeatable).")] = [],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the per-tensor plan and exact size; write nothing.")] = False,
    imatrix: Annotated[Optional[str], typer.Option("--imatrix", help="Importance matrix (.gguf or legacy .dat, from llmquant imatrix or llama-imatrix), or 'auto': collect one from SRC on the shipped calibration text into DST's folder (reused while current).")] = None,
    threads: ThreadsOpt = 0,
    force: Annotated[bool, typer.Option("--force", "-f", help="Overwrite DST if it exists.")] = False,
    name: Annotated[Optional[str], typer.Option("--name", help="Also add DST to the model store as NAME[:TAG].", show_default=False)] = None,
    split_max_size: SplitOpt = None,
    refine: Annotated[bool, typer.Option("--refine", help="Calibrate: the same per-tensor types and bytes as llama.cpp's imatrix quant of TYPE, better values (GPTQ error feedback over each layer's input correlations, shrunk toward their diagonal, on the shipped calibration text or --calib).")] = False,
    calib: Annotated[Optional[str], typer.Option("--calib", help="Calibration text file or folder for --refine (default: the shipped one).", show_default=False)] = None,
    calib_chunks: Annotated[int, typer.Option("--calib-chunks", help="Chunks of 512 tokens of calibration text --refine reads (0: all).")] = 32,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="With --refine: a line per tensor (layer-output error gain, feedback ratio) and per folded scale.")] = False,
    fold: Annotated[bool, typer.Option("--fold/--no-fold", help="With --refine: first fold AWQ-style per-channel scales into the norms and matrices before each layer's linears (zero extra bytes; the float model's function unchanged).")] = True,
    as_json: JsonOpt = False,
) -> None:
    """Quantize a GGUF tensor by tensor with llama.cpp's rules; output bytes identical to llama-quantize."""
    from ..gguf.imatrix import load_imatrix
    from ..gguf.recipes import (
        RecipeOptions,
        ftype_name,
        parse_ftype,
        parse_ggml_type,
        parse_tensor_type,
    )
    from ..quantize import quantize_model
    from ..store import resolve_model

    paths, pos_type, pos_threads = _llama_quantize_args(paths or [], dry_run)
    qtype = pick(("TYPE", pos_type and pos_type.upper()), ("--type", qtype and qtype.upper())) or "Q8_0"
    threads = int(pick(("THREADS", pos_threads), ("--threads", str(threads) if threads else None)) or 0)
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
        from ..store import parse_name

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
    if refine:
        if imatrix:
            raise OptionError("--imatrix", "--refine collects its own statistics (use --calib for the text); drop --imatrix")
        _quantize_refined(src, dst, ftype, options, calib=calib, chunks=calib_chunks or None, threads=n_threads,
                          force=force, dry_run=dry_run, name=name, split=split_bytes(split_max_size),
                          verbose=verbose, as_json=as_json, fold=fold)
        return
    if not fold:
        raise OptionError("--no-fold", "folds scales only under --refine; add --refine")
    if calib:
        raise OptionError("--calib", "is the calibration text of --refine; add --refine (or give an imatrix with --imatrix)")
    if imatrix == "auto":
        from pathlib import Path

        from ..calibrate import auto_imatrix

        folder = Path(dst).parent if dst else Path(".")
        if as_json or dry_run:
            made = auto_imatrix(src, folder, threads=n_threads)
        else:
            from .calib import _ChunkProgress

            with _ChunkProgress() as chunk_progress:
                made = auto_imatrix(src, folder, threads=n_threads, progress=chunk_progress)
        imatrix = str(made.path)
    imat = load_imatrix(imatrix) if imatrix else None
    weighting = {"importance": imat.entries, "metadata": imat.provenance(imatrix)} if imat else {}
    weighting["split_max_size"] = split_bytes(split_max_size)
    if dry_run or as_json:
        result = quantize_model(src, dst, ftype, options=options, threads=n_threads, force=force, dry_run=dry_run, **weighting)
    else:
        with _TensorProgress(ftype_name(ftype)) as progress:
            result = quantize_model(src, dst, ftype, options=options, threads=n_threads, force=force, progress=progress, **weighting)
    if not _report_quantize(result, name, dry_run, as_json):
        return
    if imat:
        chunks = f", {imat.chunk_count} chunks" if imat.chunk_count else ""
        out.print(f"importance matrix {imatrix} ({len(imat.entries)} entries{chunks}): "
                  f"{'would weight' if dry_run else 'weighted'} {len(result.importance_tensors)} tensors", highlight=False)


def _report_quantize(result, name: str | None, dry_run: bool, as_json: bool) -> bool:
    """Store the output under ``name`` (when given), then print the JSON (returns False) or the
    tables (returns True: the caller may add lines)."""
    stored = None
    if name and not dry_run and result.destination:
        from ..store import register

        stored = register(result.destination, name)
    if as_json:
        _print_json({**result.to_dict(), **({"stored_as": stored.name} if stored else {})})
        return False
    _render_quantize(result, dry_run)
    if stored:
        out.print(f"stored as {stored.name}", highlight=False)
    return True


def _quantize_refined(src, dst, ftype, options, *, calib, chunks, threads, force, dry_run, name, split, verbose,
                      as_json, fold=True) -> None:
    from ..calibrate import refine_model
    from ..gguf.recipes import ftype_name

    def show(rep) -> None:
        if verbose and not as_json:
            what = f"error {rep.gain:.2f}x lower" if rep.kept else "kept the plain encoding"  # a line in 80 columns
            out.print(f"[dim]{rep.name} {rep.type}: {what}, feedback ratio {rep.feedback_ratio:.3f}, "
                      f"{rep.seconds:.1f} s[/dim]", highlight=False)

    kw = dict(options=options, text=calib, chunks=chunks, threads=threads, force=force, dry_run=dry_run,
              on_tensor=show, split_max_size=split, fold=fold)
    if as_json or dry_run:
        result = refine_model(src, dst, ftype, **kw)
    else:
        from .calib import _ChunkProgress

        with _ChunkProgress("statistics") as chunk_progress, _TensorProgress(ftype_name(ftype) + " refined") as bar:
            def progress(*a) -> None:
                chunk_progress.__exit__(None, None, None)  # one live display at a time
                bar(*a)

            result = refine_model(src, dst, ftype, progress=progress, chunk_progress=chunk_progress, **kw)
    if not _report_quantize(result, name, dry_run, as_json):
        return
    if not dry_run:
        r = result.refine
        if verbose:
            for f in r["folds"]:  # a line each in 80 columns
                what = f"plain error {f['gain']:.2f}x lower" if f["alpha"] > 0 else "unchanged"
                out.print(f"[dim]scales folded into {f['prev']}: alpha {f['alpha']:g}, {what}[/dim]", highlight=False)
        if r["folds"]:
            folded = sum(f["alpha"] > 0 for f in r["folds"])
            out.print(f"folded per-channel scales into {folded} of {len(r['folds'])} norms and matrices "
                      f"({r['fold_seconds']:.1f} s)", highlight=False)
        out.print(f"refined {r['tensors_refined']} tensors against {r['calibration_tokens']:,} calibration tokens "
                  f"(statistics {r['statistics_seconds']:.1f} s); {r['tensors_kept_plain']} kept their plain "
                  "imatrix encoding, which had the lower layer-output error", highlight=False)


def _llama_quantize_args(args: list[str], dry_run: bool) -> tuple[list[str], Optional[str], Optional[str]]:
    """llama-quantize's positionals ``SRC [DST] TYPE [THREADS]`` -> (paths, TYPE, THREADS): TYPE is the
    first argument after a path that names a file type and is not a file; ``SRC TYPE`` alone writes
    ``ggml-model-TYPE.gguf`` beside SRC, as llama-quantize does. Without a TYPE: ([SRC] DST, None, None)."""
    from pathlib import Path

    from ..gguf.recipes import ftype_name, parse_ftype

    for k, arg in enumerate(args):
        if (k == 0 and not dry_run) or Path(arg).exists():
            continue
        try:
            ftype = parse_ftype(arg)
        except LlmquantError:
            continue
        paths, rest = args[:k], args[k + 1:]
        if len(rest) > 1 or (rest and not rest[0].isdigit()):
            raise OptionError("THREADS", f"after TYPE {arg} only a number of threads may follow, not {' '.join(rest)!r}")
        if len(paths) == 1 and not dry_run:
            src = Path(paths[0])
            paths = [paths[0], str(src.parent / f"ggml-model-{ftype_name(ftype)}.gguf")]
        return paths, arg, rest[0] if rest else None
    return args, None, None


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
