"""Speed of a GGUF in llama.cpp, measured the way llama-bench does.

``pp``: tokens/s processing a prompt of ``n_prompt`` random tokens in one batch from an empty
cache; ``tg``: tokens/s generating ``n_gen`` tokens one at a time. Each test is repeated and
reported as mean ± standard deviation. ``probe`` runs a measurement in a fresh subprocess so its
peak RSS is the model's own.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


@dataclass
class SpeedResult:
    model: str
    size_bytes: int
    n_params: int
    threads: int
    n_prompt: int
    n_gen: int
    pp_tps: float
    pp_std: float
    tg_tps: float
    tg_std: float
    repetitions: int
    peak_rss: int | None = None
    offload: dict | None = None  # runtime.llama.Offload.to_dict(): layers on GPU / CPU, as loaded

    def to_dict(self) -> dict:
        return asdict(self)


def bench_model(
    path: str | Path, *, n_prompt: int = 512, n_gen: int = 128, repetitions: int = 3,
    threads: int | None = None, seed: int = 0, options=None,
) -> SpeedResult:
    """Prompt-processing and generation speed of ``path`` in this process; ``options``: a
    runtime.llama.LoadOptions (GPU layers, ...) or its ``to_dict()``."""
    from ..runtime.llama import LoadOptions, Model
    from ..gguf.source import GGUFSource

    path = Path(path)
    with GGUFSource(path) as src:
        n_params = src.n_params
    rng = np.random.default_rng(seed)
    options = LoadOptions(**options) if isinstance(options, dict) else options or LoadOptions()
    with Model(path, **options.model_kwargs(n_ctx=max(n_prompt + n_gen + 8, 64), threads=threads,
                                            n_batch=max(n_prompt, 32))) as m:
        n_threads = m.threads
        offload = m.offload.to_dict()
        (pp_m, pp_s), (tg_m, tg_s) = time_pp_tg(m, rng, n_prompt, n_gen, repetitions)
    return SpeedResult(str(path), path.stat().st_size, n_params, n_threads, n_prompt, n_gen,
                       pp_m, pp_s, tg_m, tg_s, repetitions, offload=offload)


def time_pp_tg(m, rng, n_prompt: int, n_gen: int, repetitions: int) -> tuple[tuple[float, float], tuple[float, float]]:
    """llama-bench's two measurements on a loaded model (anything with ``n_vocab`` and
    ``eval_tokens(tokens, reset=)``: llama.cpp or transformers): pp = a prompt of ``n_prompt`` random
    tokens in one batch from an empty cache, tg = ``n_gen`` tokens one at a time; (mean, std) tok/s of each."""
    vocab = m.n_vocab
    pp, tg = [], []
    m.eval_tokens([int(t) for t in rng.integers(0, vocab, 8)], reset=True)  # warm-up
    for _ in range(repetitions):
        if n_prompt:
            tokens = [int(t) for t in rng.integers(0, vocab, n_prompt)]
            t0 = time.perf_counter()
            m.eval_tokens(tokens, reset=True)
            pp.append(n_prompt / (time.perf_counter() - t0))
        if n_gen:
            m.eval_tokens([int(rng.integers(0, vocab))], reset=True)
            t0 = time.perf_counter()
            for t in rng.integers(0, vocab, n_gen):
                m.eval_tokens([int(t)])
            tg.append(n_gen / (time.perf_counter() - t0))

    def mean_std(v):
        return (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0) if v else (0.0, 0.0)

    return mean_std(pp), mean_std(tg)


def probe(path: str | Path, **kwargs) -> SpeedResult:
    """``bench_model`` in a fresh subprocess; also reports that process's peak RSS."""
    if kwargs.get("options") is not None and not isinstance(kwargs["options"], dict):
        kwargs["options"] = kwargs["options"].to_dict()
    args = json.dumps({"path": str(path), **kwargs})
    proc = subprocess.run([sys.executable, "-m", "llmquant.measure.bench", args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"speed probe of {path} failed: {proc.stderr.strip()[-500:]}")
    return SpeedResult(**json.loads(proc.stdout.strip().splitlines()[-1]))


def model_facts(path: str | Path) -> dict:
    """What llama-bench prints about a model: ``arch size-label ftype``, tensor bytes, parameters —
    and the bytes of weights one generated token reads (every matrix once; the token embedding is
    a row lookup unless it doubles as the output matrix)."""
    from ..gguf.source import GGUFSource

    with GGUFSource(path) as src:
        ftype = src.file_type
        ftype_name = ftype.name.removeprefix("MOSTLY_") if ftype is not None else "?"
        size_label = src.get("general.size_label") or "?B"
        names = {t.name for t in src.tensors}
        per_token = sum(t.n_bytes for t in src.tensors
                        if not (t.name == "token_embd.weight" and "output.weight" in names))
        return {"desc": f"{src.arch} {size_label} {ftype_name}", "tensor_bytes": src.tensor_bytes,
                "n_params": src.n_params, "bytes_per_token": per_token}


def bench_rows(result: SpeedResult) -> list[dict]:
    """``result`` as llama-bench's rows: model, size, params, backend, threads, test, t/s."""
    facts = model_facts(result.model)
    off = result.offload or {}
    # llama-bench names the backend (CUDA, Metal, ...) and its -ngl
    backend = ",".join(dict.fromkeys(d.rstrip("0123456789") for d in off.get("devices", ()))) if off.get("gpu_layers") else ""
    base = {"model": facts["desc"], "size": _mib(facts["tensor_bytes"]), "params": f"{facts['n_params'] / 1e6:.2f} M"
            if facts["n_params"] < 1e9 else f"{facts['n_params'] / 1e9:.2f} B", "backend": backend or "CPU",
            "threads": result.threads, "ngl": min(off.get("n_gpu_layers", 0), off.get("n_layers", 0))}
    rows = []
    if result.n_prompt:
        rows.append({**base, "test": f"pp{result.n_prompt}", "t/s": f"{result.pp_tps:.2f} ± {result.pp_std:.2f}",
                     "avg_ts": result.pp_tps, "stddev_ts": result.pp_std})
    if result.n_gen:
        rows.append({**base, "test": f"tg{result.n_gen}", "t/s": f"{result.tg_tps:.2f} ± {result.tg_std:.2f}",
                     "avg_ts": result.tg_tps, "stddev_ts": result.tg_std})
    return rows


def _mib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def _child(argv: list[str]) -> None:
    kwargs = json.loads(argv[0])
    path = kwargs.pop("path")
    result = bench_model(path, **kwargs)
    from .memprobe import peak_rss

    result.peak_rss = peak_rss()
    print(json.dumps(result.to_dict()))


if __name__ == "__main__":
    _child(sys.argv[1:])
