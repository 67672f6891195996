"""The arithmetic floor of one GPTQ calibration pass over SmolLM2-135M on this machine.

    python bench/calib_floor.py [--tokens 4096] [--threads 2]

GPTQ must run every calibration token through every decoder layer once and form the Gram matrix
XᵀX of every linear's input. This times exactly those products at SmolLM2's shapes (hidden 576,
3 KV heads of 64, intermediate 1536, 30 layers) with torch's sgemm (the decoder layer's matmuls),
torch's scaled_dot_product_attention and numpy's symmetric rank-k update (the Gram matrices),
with nothing else: no norms, rotary, activations, Python, solving, packing or imports. The sum is
a lower bound on the forward-pass share of any GPTQ of the model with that many tokens here; it
sets what a wall-time goal against llm-compressor can ask of the one-pass GPTQ (bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def _time(f, n: int = 5) -> float:
    f()
    t = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - t) / n


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096, help="calibration tokens (8 x 512 in calib_quality.py)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    T, hidden, kv, inter, layers, heads, seq = args.tokens, 576, 192, 1536, 30, 9, 512
    x, y = torch.randn(T, hidden), torch.randn(T, inter)
    mats = [(x, torch.randn(hidden, hidden)), (x, torch.randn(2 * kv, hidden)), (x, torch.randn(hidden, hidden)),
            (x, torch.randn(2 * inter, hidden)), (y, torch.randn(hidden, inter))]  # q, k+v, o, gate+up, down
    t_lin = sum(_time(lambda a=a, w=w: a @ w.T) for a, w in mats)
    flops = sum(2 * a.shape[0] * w.shape[0] * w.shape[1] for a, w in mats)
    q = torch.randn(T // seq, heads, seq, 64)
    t_att = _time(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True))
    xn, yn = x.numpy(), y.numpy()
    t_gram = 3 * _time(lambda: xn.T @ xn) + _time(lambda: yn.T @ yn)  # q/k/v, o, gate/up inputs; down's
    a = torch.randn(2048, 2048)
    peak = 2 * 2048 ** 3 / _time(lambda: a @ a) / 1e9
    print(f"sgemm 2048^3: {peak:.0f} GFLOPS ({args.threads} threads, torch {torch.__version__}, numpy {np.__version__})")
    print(f"{'per layer':<16} {'ms':>7} {f'x{layers} s':>7}")
    for name, t in (("linears", t_lin), ("attention", t_att), ("Gram matrices", t_gram)):
        print(f"{name:<16} {t * 1e3:7.0f} {layers * t:7.1f}")
    total = layers * (t_lin + t_att + t_gram)
    print(f"{'floor':<16} {'':>7} {total:7.1f}   one calibration pass over {T} tokens")
    print(f"linears: {flops / 1e9:.1f} GFLOP a layer at {flops / t_lin / 1e9:.0f} GFLOPS")


if __name__ == "__main__":
    main()
