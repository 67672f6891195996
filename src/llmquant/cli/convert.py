"""Hugging Face folder -> GGUF: convert."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.table import Table

from ..system import default_threads
from .options import (
    JsonOpt,
    SplitOpt,
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


# -- convert ----------------------------------------------------------------------------------------------
@app.command()
def convert(
    hf_dir: Annotated[str, typer.Argument(help="A Hugging Face model folder (config.json, *.safetensors, tokenizer).", show_default=False)],
    dst: Annotated[Optional[str], typer.Argument(help="Output GGUF (default: NAME-SIZE-TYPE.gguf here).", show_default=False)] = None,
    outfile: Annotated[Optional[str], typer.Option("--outfile", help="Output GGUF, as convert_hf_to_gguf.py spells it (same as DST).", show_default=False)] = None,
    outtype: Annotated[str, typer.Option("--outtype", help="f32, f16, bf16, q8_0, or auto (BF16/F16 as stored).")] = "auto",
    quantize_to: Annotated[Optional[str], typer.Option("--quantize", "-q", help="Then quantize to this type (e.g. Q4_K_M) in the same run.")] = None,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Read PyTorch .bin pickles (can run code; needs torch).")] = False,
    threads: ThreadsOpt = 0,
    force: Annotated[bool, typer.Option("--force", "-f", help="Overwrite DST if it exists.")] = False,
    split_max_size: SplitOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Convert a Hugging Face safetensors folder to GGUF, as llama.cpp's convert_hf_to_gguf.py does."""
    from ..gguf.recipes import parse_ftype
    from ..convert import convert_model, parse_outtype

    dst = pick(("DST", dst), ("--outfile", outfile))
    ftype = parse_outtype(outtype)
    target = parse_ftype(quantize_to) if quantize_to else None
    kwargs = dict(quantize=target, threads=default_threads(threads), force=force, allow_pickle=allow_pickle,
                  split_max_size=split_bytes(split_max_size))
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
