"""What fits where: fit."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.table import Table

from .options import BATCH_NAMES, CTX_NAMES, JsonOpt, ModelArg, _human_count, _print_json, app, out


# -- fit ----------------------------------------------------------------------------------------------------
@app.command()
def fit(
    model: ModelArg = None,
    ctx: Annotated[Optional[int], typer.Option(*CTX_NAMES, help="Context length in tokens (default: 4096, or the trained context if smaller).")] = None,
    kv_type: Annotated[str, typer.Option("--kv-type", help="KV cache type: f16, q8_0 or q4_0.")] = "f16",
    batch: Annotated[int, typer.Option(*BATCH_NAMES, help="Prompt batch size (n_batch; llama-cpp-python caps the micro-batch at 512).")] = 512,
    machine: Annotated[Optional[str], typer.Option("--machine", help="A catalog machine (e.g. rtx-4090, macbook-air-m2-8gb), 'this' (measured; the default) or 'list'.")] = None,
    ram: Annotated[Optional[str], typer.Option("--ram", help="Describe the machine instead: system RAM, e.g. 32GB.")] = None,
    vram: Annotated[Optional[str], typer.Option("--vram", help="With --ram: one CUDA GPU with this much VRAM, e.g. 12GB.")] = None,
    task: Annotated[str, typer.Option("--task", help="chat, summarise, rag, code, math or reasoning (steers the recommendation).")] = "chat",
    engine: Annotated[str, typer.Option("--engine", help="llama.cpp (GGUF rungs; the default) or vllm (a deployment plan for an HF checkpoint).")] = "llama.cpp",
    gpu: Annotated[Optional[str], typer.Option("--gpu", help="With --engine vllm: a catalog GPU and count, e.g. A100-80G:2.")] = None,
    gpu_util: Annotated[float, typer.Option("--gpu-memory-utilization", help="With --engine vllm: vLLM's gpu_memory_utilization.")] = 0.9,
    max_model_len: Annotated[Optional[int], typer.Option("--max-model-len", help="With --engine vllm: context per request (default: the model's).")] = None,
    kv_cache_dtype: Annotated[str, typer.Option("--kv-cache-dtype", help="With --engine vllm: auto or fp8.")] = "auto",
    as_json: JsonOpt = False,
) -> None:
    """What fits where: memory (weights, KV cache, compute, runtime) and speed of every quantization rung on a machine.

    MODEL is a GGUF file, a Hugging Face folder (config.json + safetensors headers; no weights read), a preset
    (llama-3-8b, qwen2.5-7b, ...) or a size such as 8B or qwen2.5:14b. Default: the embedded SmolLM2-135M.
    """
    from ..fit.machines import CATALOG
    from ..fit.planner import fit_for

    if engine.lower() == "vllm":
        _vllm_plan(model, gpu or "a100-80gb", gpu_util, max_model_len, kv_cache_dtype, as_json)
        return
    if engine.lower() not in ("llama.cpp", "llamacpp", "llama-cpp"):
        from ..errors import LlmquantError

        raise LlmquantError(f"--engine {engine!r}: expected llama.cpp or vllm")

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


def _vllm_plan(model, gpu, gpu_util, max_model_len, kv_cache_dtype, as_json) -> None:
    from ..fit.vllm import plan_for

    p = plan_for(model, gpu, gpu_memory_utilization=gpu_util, max_model_len=max_model_len,
                 kv_cache_dtype=kv_cache_dtype)
    if as_json:
        _print_json({"schema": "llmquant.fit.vllm/1", **p.to_dict()})
        return
    t = Table(show_header=False, box=None, title=f"vLLM plan: {p.model} on {p.tp} x {p.gpu}", title_justify="left")
    t.add_column(style="dim")
    t.add_column()
    rows = [("weights per GPU", _fit_bytes(p.weights_per_gpu)), ("activations (estimate)", _fit_bytes(p.activation_bytes)),
            ("runtime overhead (estimate)", _fit_bytes(p.overhead_bytes)),
            ("KV cache memory per GPU", _fit_bytes(max(p.available_kv_bytes, 0))),
            ("KV blocks (16 tokens)", f"{p.num_blocks:,}"), ("GPU KV cache size", f"{p.kv_tokens:,} tokens"),
            (f"max concurrency at {p.max_model_len:,} tokens", f"{p.max_concurrency:.2f}x"),
            ("longest context for one request", f"{p.max_context:,} tokens"),
            ("verdict", "[green]starts[/green]" if p.fits else "[red]does not start[/red]")]
    for k, v in rows:
        t.add_row(k, v)
    out.print(t)
    for n in p.notes:
        out.print(f"[dim]note: {n}[/dim]", highlight=False)
    out.print(p.command, highlight=False, soft_wrap=True)
