"""Speed of a GGUF in llama.cpp, measured the way llama-bench does.

``pp``: tokens/s processing a prompt of ``n_prompt`` random tokens in one batch from an empty
cache; ``tg``: tokens/s generating ``n_gen`` tokens one at a time. Each test is repeated and
reported as mean ± standard deviation. ``probe`` runs a measurement in a fresh subprocess so its
peak RSS is the model's own.
"""

from __future__ import annotations

import json
import resource
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

    def to_dict(self) -> dict:
        return asdict(self)


def bench_model(
    path: str | Path, *, n_prompt: int = 512, n_gen: int = 128, repetitions: int = 3,
    threads: int | None = None, seed: int = 0,
) -> SpeedResult:
    """Prompt-processing and generation speed of ``path`` in this process."""
    from .runtime import Model
    from .sources import GGUFSource

    path = Path(path)
    with GGUFSource(path) as src:
        n_params = src.n_params
    rng = np.random.default_rng(seed)
    pp, tg = [], []
    with Model(path, n_ctx=max(n_prompt + n_gen + 8, 64), threads=threads, n_batch=max(n_prompt, 32)) as m:
        vocab = m.n_vocab
        n_threads = m.threads
        warm = [int(t) for t in rng.integers(0, vocab, 8)]
        m.eval_tokens(warm, reset=True)
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

    (pp_m, pp_s), (tg_m, tg_s) = mean_std(pp), mean_std(tg)
    return SpeedResult(str(path), path.stat().st_size, n_params, n_threads, n_prompt, n_gen,
                       pp_m, pp_s, tg_m, tg_s, repetitions)


def probe(path: str | Path, **kwargs) -> SpeedResult:
    """``bench_model`` in a fresh subprocess; also reports that process's peak RSS."""
    args = json.dumps({"path": str(path), **kwargs})
    proc = subprocess.run([sys.executable, "-m", "llmquant.bench", args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"speed probe of {path} failed: {proc.stderr.strip()[-500:]}")
    return SpeedResult(**json.loads(proc.stdout.strip().splitlines()[-1]))


def _child(argv: list[str]) -> None:
    kwargs = json.loads(argv[0])
    path = kwargs.pop("path")
    result = bench_model(path, **kwargs)
    result.peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(result.to_dict()))


if __name__ == "__main__":
    _child(sys.argv[1:])
