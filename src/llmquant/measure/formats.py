"""The format comparison (``llmquant ladder HF_DIR --formats gguf,nf4``): the ways people run a
quantized model — GGUF in llama.cpp, NF4 (bitsandbytes) and the weight-only HF checkpoints in
transformers — measured on one model, one text and one base, as rows of the ladder's table.

The ladder makes and measures the GGUF rungs as always; this module adds a row per HF format: the
checkpoint written into the out folder (NF4: quantized at load time with bitsandbytes, saved with
``save_pretrained`` and measured from the saved folder, so what is measured is what a user gets),
evaluated by transformers against the ladder's base over the same token ids (the HF-folder vs
F32-GGUF parity test bounds the runtime difference at KLD < 1e-4), its speed measured in
transformers on this machine in a fresh process (peak RSS), and the engines that load it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from ..errors import UnknownTypeError
from ..runtime.torch import NF4_BLOCKSIZE

# format -> (runtime that measures it here, engines that load it)
FORMATS = {
    "gguf": ("llama.cpp", "llama.cpp, Ollama, LM Studio"),
    "nf4": ("transformers", "transformers (vLLM only through its bitsandbytes plugin)"),
}
PLANNED = {"gptq": "transformers + gptqmodel, vLLM", "awq": "transformers + gptqmodel, vLLM"}


def parse_formats(spec: str | tuple[str, ...] | None) -> tuple[str, ...]:
    """``gguf,nf4`` -> ("gguf", "nf4"); unknown names fail with the known ones."""
    if spec is None:
        return ("gguf",)
    names = tuple(s.strip().lower() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip())
    for n in names:
        if n in PLANNED:
            raise UnknownTypeError(n, list(FORMATS) + [f"({n}: needs llmquant's GPTQ/AWQ exporter, not in this build)"])
        if n not in FORMATS:
            raise UnknownTypeError(n, list(FORMATS))
    return names or ("gguf",)


def default_group_size(widths: list[int], preferred: int = 128) -> tuple[int, str]:
    """The group size a group-wise 4-bit format uses on matrices whose input widths are ``widths``:
    ``preferred`` where every width is a multiple of it, else the largest power of two (>= 32) that
    divides them all, and why."""
    for g in (preferred, 64, 32):
        if all(w % g == 0 for w in widths):
            if g == preferred:
                return g, f"group size {g}: every matrix width is a multiple of {g}"
            bad = sorted({w for w in widths if w % preferred})
            return g, (f"group size {g}: widths {', '.join(map(str, bad))} are not multiples of {preferred}, "
                       f"so {g} is the largest group every matrix allows")
    return 0, f"no group size of 32 or more divides the widths {sorted(set(widths))}: per-channel scales"


def format_notes(formats: tuple[str, ...]) -> list[str]:
    notes = []
    if "nf4" in formats:
        notes.append(f"NF4 = bitsandbytes 4-bit NormalFloat in blocks of {NF4_BLOCKSIZE} weights (its default; "
                     "any matrix width allows it), absmax double-quantized, fp32 compute on CPU; embeddings "
                     "and the output matrix stay in the checkpoint's float type, as transformers leaves them")
    return notes


def gguf_source(hf_dir: Path, out_dir: Path, threads: int) -> Path:
    """The HF folder converted once into the out folder at its own precision (F32 weights stay F32:
    convert's "auto" would round them to 16 bits), reused when newer than the folder's files."""
    from ..convert import convert_model
    from ..runtime.torch import inspect_folder

    dst = out_dir / f"{hf_dir.name}.gguf"
    newest = max(p.stat().st_mtime for p in hf_dir.iterdir() if p.is_file())
    if not (dst.is_file() and dst.stat().st_mtime >= newest):
        outtype = "f32" if inspect_folder(hf_dir).dtype == "float32" else "auto"
        convert_model(hf_dir, dst, outtype, threads=threads, force=True)
    return dst


def hf_rungs(hf_dir: Path, formats: tuple[str, ...], base: Path, out_dir: Path, *, text, ctx: int,
             chunks: int | None, threads: int, speed: bool, step) -> list[dict]:
    """One ladder row (``RungResult``'s fields) per HF format in ``formats``; GGUF rows are the
    ladder's own."""
    from .eval import evaluate
    from ..runtime.torch import TorchModel

    rows = []
    for fmt in formats:
        if fmt == "gguf":
            continue
        name = fmt.upper()
        dst = out_dir / f"{hf_dir.name}-{name}"
        step(f"{name}: quantize with bitsandbytes", None)
        t0 = time.perf_counter()
        reused = (dst / "config.json").is_file() and (dst / "config.json").stat().st_mtime >= (hf_dir / "config.json").stat().st_mtime
        if not reused:
            with TorchModel(hf_dir, load=fmt, threads=threads) as m:
                m.save_pretrained(dst, force=True)
        seconds = time.perf_counter() - t0
        with TorchModel(dst, threads=threads) as m:
            file_bytes, memory, n_params, q = m.file_bytes, m.memory_bytes, m.n_params, m.quantization
        step(f"{name}: evaluate against the base", None)
        e = evaluate(dst, base, text=text, ctx=ctx, chunks=chunks, threads=threads,
                     progress=lambda done, total: step(f"{name}: evaluate chunk {done}/{total}", done / max(total, 1)))
        runtime, engines = FORMATS[fmt]
        row = dict(
            name=name, path=str(dst), reused=reused, file_bytes=file_bytes, bits_per_weight=8 * file_bytes / max(n_params, 1),
            quantize_seconds=0.0 if reused else seconds, types={q.label: {"tensors": 0, "params": n_params}},
            fallback_share=0.0, fallbacks={}, eval=e.to_dict(), format=fmt, runtime=runtime, engines=engines,
            memory_bytes=memory,
        )
        if speed:
            step(f"{name}: speed in transformers", None)
            row["speed"] = probe_torch(dst, n_prompt=128, n_gen=32, repetitions=2, threads=threads)
        rows.append(row)
    return rows


# -- speed in transformers, as measure/bench.py measures llama.cpp -------------------------------------------

def bench_torch(folder: str | Path, *, load: str | None = None, n_prompt: int = 512, n_gen: int = 128,
                repetitions: int = 3, threads: int | None = None, seed: int = 0) -> dict:
    """llama-bench's pp (a prompt of ``n_prompt`` random tokens in one batch from an empty cache) and
    tg (``n_gen`` tokens one at a time with the KV cache) for an HF folder in transformers."""
    from ..runtime.torch import TorchModel

    from ..system import default_threads
    from .bench import time_pp_tg

    rng = np.random.default_rng(seed)
    with TorchModel(folder, load=load, threads=threads) as m:
        (pp_m, pp_s), (tg_m, tg_s) = time_pp_tg(m, rng, n_prompt, n_gen, repetitions)
        facts = {"size_bytes": m.file_bytes, "n_params": m.n_params, "memory_bytes": m.memory_bytes}
    return {"model": str(folder), **facts, "threads": default_threads(threads), "n_prompt": n_prompt, "n_gen": n_gen,
            "pp_tps": pp_m, "pp_std": pp_s, "tg_tps": tg_m, "tg_std": tg_s, "repetitions": repetitions,
            "runtime": "transformers"}


def probe_torch(folder: str | Path, **kwargs) -> dict:
    """``bench_torch`` in a fresh subprocess; also reports that process's peak RSS."""
    args = json.dumps({"folder": str(folder), **kwargs})
    proc = subprocess.run([sys.executable, "-m", "llmquant.measure.formats", args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"speed probe of {folder} failed: {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _child(argv: list[str]) -> None:
    from .memprobe import peak_rss

    kwargs = json.loads(argv[0])
    result = bench_torch(kwargs.pop("folder"), **kwargs)
    result["peak_rss"] = peak_rss()
    print(json.dumps(result))


if __name__ == "__main__":
    _child(sys.argv[1:])
