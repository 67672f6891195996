"""Quantize speed and memory: llmquant vs llama.cpp's llama_model_quantize (ctypes), same
source, same thread count, same run. Prints time ratio (ours / llama.cpp) and peak RSS against
the goal: output size + 2 x largest tensor (float32) + 200 MB.

    python bench/quantize_speed.py [--types Q8_0,Q4_0] [--threads 2] [--repeat 3] [--imatrix FILE]

With --imatrix both sides quantize with the same importance matrix (needed for IQ2_M and the other
types llama.cpp makes only with one); the bytes of the two outputs are compared too.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _measure import measure  # noqa: E402

from llmquant.models import default_model_path  # noqa: E402
from llmquant.gguf.source import GGUFSource  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", default="Q8_0,Q4_0")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--model", default=str(default_model_path()))
    ap.add_argument("--imatrix", default=None, help="importance matrix for both sides")
    args = ap.parse_args()
    src = GGUFSource(args.model)
    largest_f32 = max(t.n_elements for t in src.tensors) * 4
    print(f"model {args.model}\nthreads {args.threads}, best of {args.repeat}\n")
    print(f"{'type':8} {'llmquant s':>11} {'llama.cpp s':>12} {'ratio':>6} {'llmquant RSS':>13} {'llama.cpp RSS':>14} {'RSS goal':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.types.split(","):
            ftype = "ALL_F32" if name == "F32" else f"MOSTLY_{name}"
            ours, theirs = [], []
            for _ in range(args.repeat):
                ours.append(measure("llmquant", args.model, f"{tmp}/ours.gguf", ftype, args.threads, args.imatrix))
                theirs.append(measure("llama.cpp", args.model, f"{tmp}/theirs.gguf", ftype, args.threads, args.imatrix))
            t_ours = min(r["seconds"] for r in ours)
            t_theirs = min(r["seconds"] for r in theirs)
            rss_ours = statistics.median(r["peak_rss"] for r in ours)
            rss_theirs = statistics.median(r["peak_rss"] for r in theirs)
            out_size = Path(f"{tmp}/ours.gguf").stat().st_size
            goal = out_size + 2 * largest_f32 + 200e6
            print(f"{name:8} {t_ours:11.2f} {t_theirs:12.2f} {t_ours / t_theirs:6.2f} "
                  f"{rss_ours / 2**20:10.0f} MiB {rss_theirs / 2**20:11.0f} MiB {goal / 2**20:6.0f} MiB"
                  f"{'' if rss_ours <= goal else '  OVER'}{_same_tensors(f'{tmp}/ours.gguf', f'{tmp}/theirs.gguf')}")


def _same_tensors(a: str, b: str) -> str:
    """'' when every tensor's bytes are equal (metadata differs: llmquant adds its own keys)."""
    ga, gb = GGUFSource(a), GGUFSource(b)
    names = [t.name for t in gb.tensors]
    if [t.name for t in ga.tensors] != names:
        return "  (tensor lists differ)"
    differ = sum(not np.array_equal(ga.raw(n), gb.raw(n)) for n in names)
    return f"  ({differ} of {len(names)} tensors differ)" if differ else ""


if __name__ == "__main__":
    main()
