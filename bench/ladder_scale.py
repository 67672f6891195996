"""The ladder at a real size: a random-weight llama of ~1.1B parameters (F16, 22 layers, 2048 wide,
5632 FFN, 32 heads / 4 KV heads, SmolLM2's 49152-token vocabulary), built here, never downloaded.

Measures, each in a fresh process:
  1. ``run_ladder`` (rungs one at a time against base logits on disk): peak RSS and, per rung,
     wall seconds (quantize + evaluate, and each part) against the rung's size (goal: linear in
     size);
  2. the same rungs evaluated the way the ladder did it before (``evaluate_many``: every rung and
     the base loaded at once, in lockstep): peak RSS;
  3. the largest single model's runtime footprint as ``llmquant fit`` predicts it at the eval
     context (the F16 base is the largest model the ladder runs); goal: (1) <= 1.3 x that;
  4. ``quantize`` Q4_K_M and Q8_0 time vs llama.cpp's ``llama_model_quantize`` (ctypes), same
     source, same threads (goal <= 1.0);
  5. the first-run cost of numba compilation (an empty NUMBA_CACHE_DIR) quantizing the embedded
     model to Q4_K_M, vs the same with the cache warm.

    python bench/ladder_scale.py [--rungs Q8_0,Q4_K_M,Q4_0] [--ctx 256] [--chunks 2] [--threads 2]
                                 [--work DIR] [--skip-quantize]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _llama_build import CACHE  # noqa: E402

HPARAMS = dict(n_layer=22, n_embd=2048, n_ff=5632, n_head=32, n_head_kv=4)


def build_model(path: Path, seed: int = 0) -> Path:
    """Stream a random F16 llama to ``path`` (one tensor in memory at a time)."""
    from gguf import GGMLQuantizationType as T, GGUFValueType as V

    from llmquant.gguf.source import GGUFSource
    from llmquant.gguf.writer import AtomicGGUFWriter
    from llmquant.models import default_model_path

    if path.is_file():
        return path
    h = HPARAMS
    head_dim = h["n_embd"] // h["n_head"]
    kv = head_dim * h["n_head_kv"]
    with GGUFSource(default_model_path()) as vocab_src:
        n_vocab = len(vocab_src.get("tokenizer.ggml.tokens"))
        fields = [f for k, f in vocab_src.fields.items() if k.startswith("tokenizer.")]
    shapes = [("token_embd.weight", (h["n_embd"], n_vocab), T.F16)]
    for i in range(h["n_layer"]):
        shapes += [(f"blk.{i}.attn_norm.weight", (h["n_embd"],), T.F32),
                   (f"blk.{i}.attn_q.weight", (h["n_embd"], h["n_embd"]), T.F16),
                   (f"blk.{i}.attn_k.weight", (h["n_embd"], kv), T.F16),
                   (f"blk.{i}.attn_v.weight", (h["n_embd"], kv), T.F16),
                   (f"blk.{i}.attn_output.weight", (h["n_embd"], h["n_embd"]), T.F16),
                   (f"blk.{i}.ffn_norm.weight", (h["n_embd"],), T.F32),
                   (f"blk.{i}.ffn_gate.weight", (h["n_embd"], h["n_ff"]), T.F16),
                   (f"blk.{i}.ffn_up.weight", (h["n_embd"], h["n_ff"]), T.F16),
                   (f"blk.{i}.ffn_down.weight", (h["n_ff"], h["n_embd"]), T.F16)]
    shapes += [("output_norm.weight", (h["n_embd"],), T.F32), ("output.weight", (h["n_embd"], n_vocab), T.F16)]
    rng = np.random.default_rng(seed)
    with AtomicGGUFWriter(path, "llama") as w:
        w.set("general.name", "random-llama-1.1B", V.STRING)
        w.set("general.file_type", 1, V.UINT32)
        for key, value in (("block_count", h["n_layer"]), ("context_length", 2048), ("embedding_length", h["n_embd"]),
                           ("feed_forward_length", h["n_ff"]), ("attention.head_count", h["n_head"]),
                           ("attention.head_count_kv", h["n_head_kv"]), ("rope.dimension_count", head_dim)):
            w.set(f"llama.{key}", value, V.UINT32)
        w.set("llama.attention.layer_norm_rms_epsilon", 1e-5, V.FLOAT32)
        w.set("llama.rope.freq_base", 10000.0, V.FLOAT32)
        w.set("llama.vocab_size", n_vocab, V.UINT32)
        for f in fields:
            w.add_field(f)
        for name, shape, qtype in shapes:
            w.add_tensor_info(name, shape, qtype)
        w.start()
        for name, shape, qtype in shapes:
            if qtype == T.F32:
                w.write_tensor(name, np.ones(shape[::-1], np.float32))
            else:  # 1/sqrt(fan-in) scale keeps activations bounded through 22 layers
                w.write_tensor(name, (rng.standard_normal(shape[::-1], np.float32) / np.sqrt(shape[0])).astype(np.float16))
        w.commit()
    return path


LADDER_CHILD = r"""
import json, sys, time
from llmquant.measure.ladder import run_ladder
from llmquant.measure.memprobe import peak_rss
src, out, rungs, ctx, chunks, threads = sys.argv[1:7]
marks = []
def step(desc, frac):
    marks.append((time.perf_counter(), desc)); print(desc, file=sys.stderr, flush=True)
t0 = time.perf_counter()
r = run_ladder(src, rungs=tuple(rungs.split(",")), out_dir=out, ctx=int(ctx), chunks=int(chunks), threads=int(threads),
               speed=False, step=step, keep="all")
total = time.perf_counter() - t0
# wall seconds per rung: from its "quantize X" step to the next rung's (or the end)
starts = [(t, d.split()[1]) for t, d in marks if d.startswith("quantize ")]
ends = [t for t, _ in starts[1:]] + [next(t for t, d in marks if d == "recommend")]
base = next((t for t, d in marks if d.startswith("base logits")), t0)
print(json.dumps({"peak_rss": peak_rss(), "seconds": total, "base_logits_seconds": starts[0][0] - base if starts else None,
                  "rungs": [{"name": n, "seconds": e - s, "quantize_seconds": x.quantize_seconds, "bytes": x.file_bytes,
                             "kld": x.eval["kld_mean"]}
                            for (s, n), e, x in zip(starts, ends, r.rungs)]}))
"""

LOCKSTEP_CHILD = r"""
import json, sys
from llmquant.measure.eval import evaluate_many
from llmquant.measure.memprobe import peak_rss
base, ctx, chunks, threads, *models = sys.argv[1:]
res = evaluate_many(models, base, ctx=int(ctx), chunks=int(chunks), threads=int(threads))
print(json.dumps({"peak_rss": peak_rss(), "kld": [r.kld_mean for r in res]}))
"""

QUANT_CHILD = r"""
import json, sys, time
from gguf import LlamaFileType
kind, src, dst, ftype, threads = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
ft = LlamaFileType[ftype]
t0 = time.perf_counter()
if kind == "llmquant":
    from llmquant.quantize import quantize_model
    quantize_model(src, dst, ft, threads=threads, force=True)
else:
    from llmquant.runtime import reference
    reference.model_quantize(src, dst, ft, threads=threads, allow_requantize=True)
print(json.dumps({"seconds": time.perf_counter() - t0}))
"""


def child(code: str, *args: str, env: dict | None = None) -> dict:
    proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    if proc.returncode:
        raise SystemExit(f"child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rungs", default="Q8_0,Q4_K_M,Q4_0")
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--chunks", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default=str(CACHE / "ladder-scale"))
    ap.add_argument("--skip-quantize", action="store_true", help="skip the quantize-vs-llama.cpp timing")
    args = ap.parse_args()

    from llmquant.fit.catalog import load_spec
    from llmquant.fit.planner import fit, resolve_machine
    from llmquant.gguf.source import GGUFSource
    from llmquant.models import default_model_path

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    src = build_model(work / "random-llama-1.1B-F16.gguf")
    with GGUFSource(src) as s:
        n_params = s.n_params
    print(f"model {src}: {n_params / 1e9:.3f}B parameters, {src.stat().st_size / 2**30:.2f} GiB F16 "
          f"(built in {time.perf_counter() - t0:.0f} s); ctx {args.ctx}, {args.chunks} chunks, {args.threads} threads\n")

    rungs = args.rungs.split(",")
    report = fit(load_spec(str(src)), resolve_machine("this", None, None), n_ctx=args.ctx, ladder=["F16", *rungs]).to_dict()
    predicted = {r["ftype"]: r["total_bytes"] for r in report["rungs"]}
    largest = max(predicted.get(n, 0) for n in ["F16", *rungs])

    out = work / "ladder-out"
    lad = child(LADDER_CHILD, src, out, args.rungs, args.ctx, args.chunks, args.threads)
    files = [out / f"random-llama-1.1B-{n}.gguf" for n in rungs]
    lock = child(LOCKSTEP_CHILD, src, args.ctx, args.chunks, args.threads, *files)

    print("ladder memory (peak RSS of a fresh process):")
    print(f"  one rung at a time (run_ladder)       {lad['peak_rss'] / 2**30:6.2f} GiB   "
          f"{lad['peak_rss'] / largest:.2f} x fit's largest single model ({largest / 2**30:.2f} GiB, F16 base at ctx {args.ctx}; goal <= 1.3)")
    print(f"  every rung at once (evaluate_many)    {lock['peak_rss'] / 2**30:6.2f} GiB   "
          f"{lock['peak_rss'] / largest:.2f} x  (the ladder before this change)")
    print(f"  base logits: {lad['base_logits_seconds']:.0f} s; ladder total {lad['seconds']:.0f} s\n")
    print(f"  {'rung':8} {'size GiB':>9} {'wall s':>7} {'s / GiB':>8} {'quant s':>8} {'eval s':>7} {'eval s/GiB':>10} {'KLD':>8}")
    for r in lad["rungs"]:
        gib = r["bytes"] / 2**30
        ev = r["seconds"] - r["quantize_seconds"]
        print(f"  {r['name']:8} {gib:9.2f} {r['seconds']:7.1f} {r['seconds'] / gib:8.1f} {r['quantize_seconds']:8.1f} "
              f"{ev:7.1f} {ev / gib:10.1f} {r['kld']:8.4f}")
    print()

    if not args.skip_quantize:
        print(f"quantize (fresh process each, numba cache warm), {args.threads} threads:")
        print(f"  {'type':8} {'llmquant s':>11} {'llama.cpp s':>12} {'ratio':>6}")
        with tempfile.TemporaryDirectory(dir=work) as tmp:
            child(QUANT_CHILD, "llmquant", default_model_path(), f"{tmp}/warm.gguf", "MOSTLY_Q4_K_M", args.threads)
            for name in ("Q4_K_M", "Q8_0"):
                ours = child(QUANT_CHILD, "llmquant", src, f"{tmp}/ours.gguf", f"MOSTLY_{name}", args.threads)["seconds"]
                theirs = child(QUANT_CHILD, "llama.cpp", src, f"{tmp}/theirs.gguf", f"MOSTLY_{name}", args.threads)["seconds"]
                print(f"  {name:8} {ours:11.1f} {theirs:12.1f} {ours / theirs:6.2f}")
        print()

    with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory(dir=work) as tmp:
        cold = child(QUANT_CHILD, "llmquant", default_model_path(), f"{tmp}/a.gguf", "MOSTLY_Q4_K_M", args.threads,
                     env={"NUMBA_CACHE_DIR": cache})["seconds"]
        warm = child(QUANT_CHILD, "llmquant", default_model_path(), f"{tmp}/a.gguf", "MOSTLY_Q4_K_M", args.threads,
                     env={"NUMBA_CACHE_DIR": cache})["seconds"]
    print(f"numba first run (empty cache) quantizing the embedded model to Q4_K_M: {cold:.1f} s, "
          f"warm cache {warm:.1f} s: compilation costs ~{cold - warm:.0f} s once")


if __name__ == "__main__":
    main()
