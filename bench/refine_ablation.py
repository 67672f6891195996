"""What each lever of ``quantize --refine`` gives end to end: one set of statistics, many variants.

    python bench/refine_ablation.py [--types Q4_K_M,Q4_0] [--models default,degridded] [--kb 64] [--chunks 32]
                                    [--shrinks 0,0.5,0.7,0.85,1] [--wide] [--quantized-inputs]

For each model the layer statistics (XᵀX of every ``blk.*`` matmul input) are collected once over
the first --kb kB of the shipped calibration text (--chunks x 512 tokens, as refine_quality.py), then
the model is refined to each of --types once per variant and each file evaluated with ``llmquant eval``
(llama-perplexity's numbers) on data/eval.txt against the model's own F32 file:

- ``--shrinks``: how far each XᵀX is pulled toward its diagonal before error feedback
  (``calib.refine.shrink_hessian``: 0 the full correlations, 1 none, i.e. no feedback at all — each
  block's scale search weighted by E[x²] alone, as AutoRound's opt-RTN and llama.cpp do);
- ``--wide``: also each shrink with the 32-block scale search over 0.5 … 2.0 x the plain scale instead
  of 0.55 … 1.25;
- ``--quantized-inputs``: also the statistics collected from llama.cpp's own imatrix quant of each type
  (the inputs a layer sees once the layers before it are quantized), shrink 0 and the default.

The refined quantization's own seconds are printed beside each row (statistics excluded).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
import numpy as np
from _llama_build import CACHE
from refine_quality import bench_models, calibration_text, evaluate, llama_side

from llmquant.calib import refine as R
from llmquant.calibrate import collect_hessians, refine_model
from llmquant.gguf.recipes import parse_ftype

WIDE = np.linspace(0.5, 2.0, 151, dtype=np.float32)


def refined(model: Path, dst: Path, ftype: str, stats, shrink: float, wide: bool, threads: int) -> float:
    post = R.BlockGrid.__post_init__

    def widened(self):
        post(self)
        self.factors = WIDE

    if wide:
        R.BlockGrid.__post_init__ = widened
    try:
        t0 = time.perf_counter()
        refine_model(model, dst, parse_ftype(ftype), stats=stats, shrink=shrink, threads=threads, force=True)
        return time.perf_counter() - t0
    finally:
        R.BlockGrid.__post_init__ = post


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", default="Q4_K_M", help="comma-separated ftypes, all from one set of statistics")
    ap.add_argument("--models", default="default,degridded")
    ap.add_argument("--kb", type=int, default=64)
    ap.add_argument("--chunks", type=int, default=32)
    ap.add_argument("--shrinks", default="0,0.5,0.7,0.85,1")
    ap.add_argument("--wide", action="store_true")
    ap.add_argument("--quantized-inputs", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    models = bench_models(args.threads)
    shrinks = [float(s) for s in args.shrinks.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        tmp = Path(tmp)
        text = calibration_text(tmp, args.kb)
        imatrices: dict = {}
        for mname in args.models.split(","):
            model = models[mname]()
            t0 = time.perf_counter()
            stats = collect_hessians(model, text, chunks=args.chunks, threads=args.threads)
            print(f"{mname}: statistics {time.perf_counter() - t0:.0f} s", flush=True)
            for ftype in args.types.split(","):
                theirs, _, _ = llama_side(model, text, ftype, tmp, args, imatrices)
                e = evaluate(theirs, model, args)
                rows.append((mname, ftype, "llama.cpp imatrix", e, None))
                print(f"  {ftype}: llama.cpp imatrix KLD {e['kld_mean']:.5f}", flush=True)
                variants = [(f"shrink {s:g}", stats, s, False) for s in shrinks]
                if args.wide:
                    variants += [(f"shrink {s:g}, scales 0.5-2.0", stats, s, True) for s in shrinks]
                if args.quantized_inputs:
                    qstats = collect_hessians(theirs, text, chunks=args.chunks, threads=args.threads)
                    variants += [(f"shrink {s:g}, inputs of llama.cpp's {ftype}", qstats, s, False)
                                 for s in (0.0, R.DEFAULT_SHRINK)]
                for label, st, s, wide in variants:
                    dst = tmp / f"{mname}-{len(rows)}.gguf"
                    t = refined(model, dst, ftype, st, s, wide, args.threads)
                    e = evaluate(dst, model, args)
                    rows.append((mname, ftype, label, e, t))
                    print(f"    {label:44} KLD {e['kld_mean']:.5f} ± {e['kld_err']:.5f}  same-top {e['top1']:.2f}%  "
                          f"PPL {e['ppl']:.4f}  {t:.0f} s", flush=True)
                    dst.unlink()
                theirs.unlink()
    print("\n| model | type | variant | mean KLD | same-top | PPL | refine s |")
    print("|---|---|---|---|---|---|---|")
    for mname, ftype, label, e, t in rows:
        print(f"| {mname} | {ftype} | {label} | {e['kld_mean']:.5f} ± {e['kld_err']:.5f} | {e['top1']:.2f}% "
              f"| {e['ppl']:.4f} | {'' if t is None else f'{t:.0f}'} |")
    print(json.dumps([{"model": m, "type": f, "variant": v, "kld": e["kld_mean"], "top1": e["top1"], "ppl": e["ppl"]}
                      for m, f, v, e, _ in rows]))


if __name__ == "__main__":
    main()
