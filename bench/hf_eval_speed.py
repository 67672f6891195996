"""Eval speed of the torch path (transformers on CPU) vs the llama.cpp path on the same model and chunks.

The default model as an fp32 HF folder (transformers' GGUF loader, as the tests build it) and its F32
GGUF: each is evaluated in a fresh process over the same token ids (the GGUF's tokenizer; chunks of
--ctx tokens, the second half scored, as llama-perplexity does), against no base, so the time is the
model's own decoding plus its NLL. Prints tokens/s (tokens decoded per second of decoding), the
process's peak RSS (VmHWM) and the ratios; then the same for NF4 (bitsandbytes, torch only) and for a
compressed-tensors W4A16 g64 checkpoint through transformers and through the dequantized llama.cpp
fast path.

    python bench/hf_eval_speed.py                   # ctx 512, 4 chunks, 2 threads
    python bench/hf_eval_speed.py --ctx 256 --chunks 8 --threads 1
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

CHILD = r"""
import json, sys, time
from llmquant.measure.eval import ModelRef, evaluate
from llmquant.measure.memprobe import peak_rss
path, runtime, load, ctx, chunks, threads = sys.argv[1], sys.argv[2], sys.argv[3] or None, int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
r = evaluate(ModelRef(__import__("pathlib").Path(path), runtime=runtime, load=load), ctx=ctx, chunks=chunks, threads=threads)
print(json.dumps({"tokens_per_second": r.tokens_per_second, "seconds": r.seconds, "wall_seconds": r.wall_seconds,
                  "ppl": r.ppl, "peak_rss": peak_rss(), "n_chunks": r.n_chunks}))
"""


def run(path: Path, runtime: str, load: str | None, args) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(path), runtime, load or "", str(args.ctx), str(args.chunks),
                           str(args.threads)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=None, help="folder for the models (default: a temporary one)")
    args = ap.parse_args()

    from gguf import LlamaFileType

    from hfmodel import build_default_hf_folder, write_compressed_tensors
    from helpers import default_model_path
    from llmquant.quantize import quantize_model

    with tempfile.TemporaryDirectory(prefix="hf-eval-speed-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        hf, gguf, ct = work / "SmolLM2-135M-Instruct", work / "SmolLM2-135M-Instruct-F32.gguf", work / "SmolLM2-W4A16-g64"
        if not (hf / "config.json").is_file():
            build_default_hf_folder(hf)
        if not gguf.is_file():
            quantize_model(default_model_path(), gguf, LlamaFileType.ALL_F32, threads=args.threads)
        if not (ct / "config.json").is_file():
            write_compressed_tensors(hf, ct)
        cases = [("fp32 HF folder", hf, "torch", None), ("F32 GGUF", gguf, "auto", None),
                 ("NF4 (bitsandbytes)", hf, "torch", "nf4"),
                 ("compressed-tensors W4A16", ct, "torch", None), ("compressed-tensors, dequantized fast path", ct, "llama", None)]
        res = {}
        print(f"ctx {args.ctx}, {args.chunks} chunks, {args.threads} threads; each row a fresh process")
        print(f"{'model':44} {'runtime':12} {'tok/s':>8} {'decode s':>9} {'wall s':>7} {'peak RSS':>10} {'PPL':>8}")
        for label, path, runtime, load in cases:
            r = res[label] = run(path, runtime, load, args)
            rt = "llama.cpp" if runtime in ("auto", "llama") else "transformers"
            print(f"{label:44} {rt:12} {r['tokens_per_second']:8.0f} {r['seconds']:9.1f} {r['wall_seconds']:7.1f} "
                  f"{r['peak_rss'] / 2**20:8.0f} MiB {r['ppl']:8.3f}")
        t, g = res["fp32 HF folder"], res["F32 GGUF"]
        print(f"fp32: llama.cpp / transformers tokens/s = {g['tokens_per_second'] / t['tokens_per_second']:.2f}x; "
              f"peak RSS transformers / llama.cpp = {t['peak_rss'] / g['peak_rss']:.2f}x")
        c, f = res["compressed-tensors W4A16"], res["compressed-tensors, dequantized fast path"]
        print(f"compressed-tensors: fast path / transformers tokens/s = {f['tokens_per_second'] / c['tokens_per_second']:.2f}x "
              f"(wall {c['wall_seconds']:.1f} s vs {f['wall_seconds']:.1f} s incl. dequantize + convert)")


if __name__ == "__main__":
    main()
