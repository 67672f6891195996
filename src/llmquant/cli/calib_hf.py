"""Calibrated quantization of Hugging Face checkpoints: gptq, awq (and rtn, their baseline)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ..system import default_threads
from .options import JsonOpt, ThreadsOpt, _human_bytes, _print_json, app, err, out

SrcArg = Annotated[str, typer.Argument(help="A Hugging Face model folder (config.json, *.safetensors, tokenizer.json).", show_default=False)]
DstArg = Annotated[str, typer.Argument(help="The output folder (written atomically).", show_default=False)]
BitsOpt = Annotated[int, typer.Option("--bits", "-b", help="Bits per weight: 2, 3, 4 or 8.")]
GroupOpt = Annotated[Optional[int], typer.Option("--group-size", "-g", help="Columns per scale (0: per channel). Default: 128 where every input width allows, else the largest of 64/32/16 that does.", show_default=False)]
FormatOpt = Annotated[str, typer.Option("--format", help="compressed-tensors (transformers, vLLM, llm-compressor), gptq (GPTQ v1: AutoGPTQ, GPTQModel, vLLM) or awq (AWQ GEMM).")]
CalibOpt = Annotated[Optional[str], typer.Option("--calib", help="Calibration text file (default: the shipped calibration text).", show_default=False)]
SamplesOpt = Annotated[Optional[int], typer.Option("--samples", "-n", help="Calibration samples (default: as many as the text holds, up to 128).", show_default=False)]
SeqOpt = Annotated[int, typer.Option("--seq-len", help="Tokens per calibration sample.")]
ForceOpt = Annotated[bool, typer.Option("--force", "-f", help="Replace OUT_DIR if it exists.")]


class _LayerProgress:
    def __init__(self, title: str):
        self.title, self.bar, self.task = title, None, None

    def __call__(self, i: int, n: int, label: str) -> None:
        if self.bar is None:
            self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[layer]}"),
                                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=err)
            self.bar.start()
            self.task = self.bar.add_task(self.title, total=n, layer="")
        self.bar.update(self.task, completed=i, layer=label)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()


def _run(method: str, as_json: bool, **kwargs) -> None:
    from ..calib.hf_quant import quantize_hf

    if as_json:
        _print_json(quantize_hf(method=method, **kwargs).to_dict())
        return
    with _LayerProgress(method) as progress:
        r = quantize_hf(method=method, progress=progress, **kwargs)
    t = Table(title=f"{r.method} -> {r.format}: {r.dst}")
    t.add_column("setting")
    t.add_column("value")
    rows = [("bits", str(r.bits)), ("group", r.group_note), ("symmetric", str(r.sym)), ("act-order", r.act_order),
            ("layers / linears", f"{r.layers} / {r.linears}"), ("weights on disk", _human_bytes(r.out_bytes)),
            ("time", f"{r.seconds:.1f} s")]
    if r.method == "gptq":
        rows.insert(4, ("group ranges", f"best of {r.range_search} shrinks of min/max (diag(H)-weighted)" if r.range_search else "min/max"))
    if r.samples:
        rows.insert(4, ("calibration", f"{r.samples} x {r.seq_len} tokens of {r.calibration}"))
    for row in rows:
        t.add_row(*row)
    out.print(t)
    for note in r.notes:
        err.print(f"note: {note}", highlight=False)


@app.command()
def gptq(src: SrcArg, dst: DstArg, bits: BitsOpt = 4, group_size: GroupOpt = None,
         sym: Annotated[bool, typer.Option("--sym/--asym", help="Symmetric (zero point 2^(b-1)) or asymmetric groups.")] = True,
         act_order: Annotated[str, typer.Option("--act-order", help="static (reorder while quantizing, no g_idx), group (g_idx, desc_act) or none.")] = "static",
         damp: Annotated[float, typer.Option("--damp", help="Dampening, as a fraction of mean(diag H).")] = 0.01,
         range_search: Annotated[int, typer.Option("--range-search", min=0, help="Each group's range: the best of N shrinks of its min/max by diag(H)-weighted error (GPTQ's mse option); 0: min/max, as llm-compressor's default observer.")] = 20,
         fmt: FormatOpt = "compressed-tensors", calib: CalibOpt = None, samples: SamplesOpt = None, seq_len: SeqOpt = 512,
         threads: ThreadsOpt = 0, force: ForceOpt = False, as_json: JsonOpt = False) -> None:
    """GPTQ a Hugging Face checkpoint on the CPU, layer by layer, into a checkpoint transformers and vLLM load."""
    _run("gptq", as_json, src=src, dst=dst, bits=bits, group_size=group_size, sym=sym, act_order=act_order, damp=damp,
         range_search=range_search, fmt=fmt,
         calib=calib, samples=samples, seq_len=seq_len, threads=default_threads(threads), force=force)


@app.command()
def awq(src: SrcArg, dst: DstArg, bits: BitsOpt = 4, group_size: GroupOpt = None,
        sym: Annotated[bool, typer.Option("--sym/--asym", help="Symmetric or asymmetric (AWQ's zero_point=True) groups.")] = False,
        clip: Annotated[bool, typer.Option("--clip/--no-clip", help="AWQ's per-group clip search after the scales.")] = True,
        fmt: FormatOpt = "compressed-tensors", calib: CalibOpt = None, samples: SamplesOpt = None, seq_len: SeqOpt = 512,
        threads: ThreadsOpt = 0, force: ForceOpt = False, as_json: JsonOpt = False) -> None:
    """AWQ a Hugging Face checkpoint on the CPU (activation-aware scales folded into the norms, clip search)."""
    _run("awq", as_json, src=src, dst=dst, bits=bits, group_size=group_size, sym=sym, fmt=fmt, awq_clip_search=clip,
         calib=calib, samples=samples, seq_len=seq_len, threads=default_threads(threads), force=force)
