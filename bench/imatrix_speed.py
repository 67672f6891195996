"""llmquant imatrix vs llama-imatrix, same run: wall time and peak RSS on the same model, text, ctx
and threads (goal: ratio <= 1.0), then the KLD of Q4_K_M, Q3_K_M, Q2_K and Q4_0 made with our
imatrix and with llama-imatrix's, on text held out from both (data/eval.txt; the calibration text
shares no 64-token window with it).

    python bench/imatrix_speed.py [--kb 200] [--threads 2] [--ppl] [--types Q4_K_M,Q3_K_M,Q2_K,Q4_0]

The model is the F32 rendering of the default model (made once under bench/.cache); the text is the
first --kb kilobytes of the shipped calibration text. Both tools run under /usr/bin/time -v in
alternation (llama-imatrix first), each in a fresh process. llama-imatrix computes a perplexity as
it goes unless --no-ppl; llmquant does not, so by default it runs with --no-ppl (--ppl: without).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _llama_build import CACHE, build_tool
from gguf import LlamaFileType

from llmquant.calib.stats import default_calibration_path
from llmquant.models import default_model_path


def timed(cmd: list[str]) -> tuple[float, int, str]:
    """(wall seconds, peak RSS bytes, stdout) of ``cmd`` run under /usr/bin/time -v."""
    t0 = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)[1]) * 1024
    return wall, rss, p.stdout


def f32_model(threads: int) -> Path:
    from llmquant.gguf.recipes import RecipeOptions
    from llmquant.quantize import output_is_current, quantize_model

    dst = CACHE / "smollm2-135m-F32.gguf"
    CACHE.mkdir(parents=True, exist_ok=True)
    opts = RecipeOptions(allow_requantize=True)
    if not (dst.exists() and output_is_current(dst, default_model_path(), LlamaFileType.ALL_F32, opts)):
        quantize_model(default_model_path(), dst, LlamaFileType.ALL_F32, options=opts, threads=threads, force=True)
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kb", type=int, default=200, help="kilobytes of the calibration text")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--ppl", action="store_true", help="let llama-imatrix compute its perplexity too")
    ap.add_argument("--types", default="Q4_K_M,Q3_K_M,Q2_K,Q4_0")
    ap.add_argument("--eval-chunks", type=int, default=None)
    args = ap.parse_args()

    tool = build_tool("llama-imatrix")
    model = f32_model(args.threads)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        tmp = Path(tmp)
        text = tmp / "calib.txt"
        raw = default_calibration_path().read_bytes()[: args.kb * 1000]
        text.write_bytes(raw[: len(raw.decode("utf-8", "ignore").encode("utf-8"))])
        theirs, ours = tmp / "theirs.gguf", tmp / "ours.gguf"
        cmd_theirs = [str(tool), "-m", str(model), "-f", str(text), "-o", str(theirs), "-c", str(args.ctx),
                      "-t", str(args.threads)] + ([] if args.ppl else ["--no-ppl"])
        cmd_ours = [sys.executable, "-m", "llmquant", "imatrix", str(model), "-f", str(text), "-o", str(ours),
                    "-c", str(args.ctx), "-t", str(args.threads), "--json"]
        print(f"model {model} (F32 rendering of the default model)\ntext {args.kb} kB of the calibration text, "
              f"ctx {args.ctx}, {args.threads} threads\n")
        t_theirs, rss_theirs, _ = timed(cmd_theirs)
        t_ours, rss_ours, out = timed(cmd_ours)
        res = json.loads(out)
        print(f"{'':14} {'wall s':>8} {'peak RSS':>10}")
        print(f"{'llama-imatrix':14} {t_theirs:8.1f} {rss_theirs / 2**20:7.0f} MiB" + ("" if args.ppl else "  (--no-ppl)"))
        print(f"{'llmquant':14} {t_ours:8.1f} {rss_ours / 2**20:7.0f} MiB  ({res['chunk_count']} chunks, "
              f"{res['tokens'] / res['seconds']:.0f} tok/s while collecting)")
        print(f"ratio llmquant / llama-imatrix: time {t_ours / t_theirs:.2f}, peak RSS {rss_ours / rss_theirs:.2f} "
              f"(goal <= 1.0)\n")
        if args.types:  # --types '' : the speed half only
            kld(model, ours, theirs, tmp, args)


def kld(model: Path, ours: Path, theirs: Path, tmp: Path, args) -> None:
    import numpy as np

    from llmquant.gguf.imatrix import load_imatrix, load_imatrix_raw
    from llmquant.gguf.recipes import RecipeOptions, parse_ftype
    from llmquant.measure.eval import evaluate_many
    from llmquant.quantize import quantize_model

    a, b = load_imatrix_raw(ours), load_imatrix_raw(theirs)
    same = sum(np.array_equal(a.entries[n][0], b.entries[n][0]) for n in b.entries)
    worst = max(float(np.max(np.abs(a.entries[n][0].astype(np.float64) - b.entries[n][0])
                             / np.maximum(np.abs(b.entries[n][0]), 1e-30))) for n in b.entries)
    print(f"imatrix sums: {same} of {len(b.entries)} entries bit-identical, largest relative difference {worst:.2e}")
    files = []
    for name in args.types.split(","):
        for side, path in (("ours", ours), ("theirs", theirs)):
            im = load_imatrix(path)
            dst = tmp / f"{name}-{side}.gguf"
            quantize_model(model, dst, parse_ftype(name), options=RecipeOptions(allow_requantize=True),
                           importance=im.entries, metadata=im.provenance("imatrix.gguf"), threads=args.threads)
            files.append((name, side, dst))
    results = evaluate_many([f[2] for f in files], model, ctx=args.ctx, chunks=args.eval_chunks, threads=args.threads)
    print(f"\nKLD vs the F32 model on data/eval.txt ({results[0].n_chunks} chunks of {args.ctx}), held out from both:")
    print(f"{'type':8} {'ours':>20} {'llama-imatrix':>20} {'ratio':>7} {'same bytes':>11}")
    for i in range(0, len(files), 2):
        r1, r2 = results[i], results[i + 1]
        same_bytes = files[i][2].read_bytes() == files[i + 1][2].read_bytes()
        print(f"{files[i][0]:8} {r1.kld_mean:.5f} ± {r1.kld_err:.5f} {r2.kld_mean:.5f} ± {r2.kld_err:.5f} "
              f"{r1.kld_mean / r2.kld_mean:7.4f} {'yes' if same_bytes else 'no':>11}")


if __name__ == "__main__":
    main()
