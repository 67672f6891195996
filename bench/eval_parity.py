"""Eval parity: llmquant's evaluate_many vs llama.cpp's llama-perplexity --kl-divergence, same files,
same text, same ctx and threads, in one run.

Builds llama-perplexity once (bench/_llama_build.py, cached under bench/.cache/), writes an F32
base and quantized renderings of the embedded SmolLM2-135M with llmquant, then runs
``llama-perplexity --kl-divergence-base`` on the base and ``--kl-divergence`` on each quantized file,
and llmquant (exact statistics, and ``llama_compat`` = llama-perplexity's 16-bit storage of the base
log-probabilities) in fresh subprocesses. Prints both sets of numbers with their relative
differences (goal: PPL, mean KLD, same-top within 1 %) and the eval throughput ratio:
llmquant tokens/s ÷ llama-perplexity tokens/s over the evaluation loops (goal >= 0.95).
llama-perplexity's time is its "total time" line (context creation to the end, model loading
excluded); llmquant's is the base's and the models' decoding + statistics.

    python bench/eval_parity.py [--types Q8_0,Q4_0] [--ctx 512] [--chunks N] [--threads 2] [--text FILE] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _llama_build import CACHE, build_tool  # noqa: E402

CHILD = r"""
import json, sys
from llmquant.measure.eval import evaluate_many
base, text, ctx, chunks, threads, compat, *models = sys.argv[1:]
res = evaluate_many(models, base, text=text, ctx=int(ctx), chunks=int(chunks) if chunks != "-" else None,
                    threads=int(threads), llama_compat=compat == "1")
print(json.dumps([r.to_dict() for r in res]))
"""

# llama-perplexity's final statistics lines -> our EvalResult keys
PATTERNS = {
    "ppl": r"Mean PPL\(Q\)\s*:\s*([-\d.]+)\s*±\s*([-\d.]+)",
    "base_ppl": r"Mean PPL\(base\)\s*:\s*([-\d.]+)\s*±\s*([-\d.]+)",
    "ln_ppl_ratio": r"Mean ln\(PPL\(Q\)/PPL\(base\)\)\s*:\s*([-\d.]+)\s*±\s*([-\d.]+)",
    "ppl_ratio": r"Mean PPL\(Q\)/PPL\(base\)\s*:\s*([-\d.]+)\s*±\s*([-\d.]+)",
    "delta_ppl": r"Mean PPL\(Q\)-PPL\(base\)\s*:\s*([-\d.]+)\s*±\s*([-\d.]+)",
    "kld_mean": r"Mean    KLD:\s*([-\d.]+)\s*±\s*([-\d.]+)",
    "kld_max": r"Maximum KLD:\s*([-\d.]+)",
    "kld_p99": r"99\.0%   KLD:\s*([-\d.]+)",
    "kld_p90": r"90\.0%   KLD:\s*([-\d.]+)",
    "kld_median": r"Median  KLD:\s*([-\d.]+)",
    "rms_dp": r"RMS Δp    :\s*([-\d.]+)\s*±\s*([-\d.]+) %",
    "top1": r"Same top p:\s*([-\d.]+)\s*±\s*([-\d.]+) %",
}
TOTAL_TIME = r"llama_perf_context_print:\s+total time =\s*([\d.]+) ms"
SHOWN = ["ppl", "base_ppl", "ppl_ratio", "delta_ppl", "kld_mean", "kld_median", "kld_p90", "kld_p99", "kld_max",
         "top1", "rms_dp"]
GOALS = {"ppl", "kld_mean", "top1"}


def run_llama(exe: Path, args: list[str]) -> tuple[str, float]:
    """The tool's log and its "total time" in seconds (printed only with --perf -v)."""
    proc = subprocess.run([str(exe), *args, "--perf", "-v"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"llama-perplexity failed ({proc.returncode}):\n{proc.stdout[-3000:]}")
    m = re.search(TOTAL_TIME, proc.stdout)
    if not m:
        raise SystemExit("llama-perplexity printed no 'total time' line")
    return proc.stdout, float(m.group(1)) / 1000


def parse(log: str) -> dict[str, float]:
    out = {}
    for key, pat in PATTERNS.items():
        m = re.search(pat, log)
        if m:
            out[key] = float(m.group(1))
            if m.lastindex and m.lastindex > 1:
                out[key + "_err"] = float(m.group(2))
    return out


def run_llmquant(base: Path, models: list[Path], text: Path, ctx: int, chunks: int | None, threads: int,
                 compat: bool) -> list[dict]:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(base), str(text), str(ctx),
                           str(chunks) if chunks else "-", str(threads), "1" if compat else "0",
                           *map(str, models)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"llmquant eval failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def make_files(types: list[str], folder: Path) -> tuple[Path, list[Path]]:
    from gguf import LlamaFileType

    from llmquant.models import default_model_path
    from llmquant.quantize import quantize_model

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name in ["F32", *types]:
        dst = folder / f"smollm2-135m-{name}.gguf"
        if not dst.is_file():
            ftype = LlamaFileType.ALL_F32 if name == "F32" else LlamaFileType[f"MOSTLY_{name}"]
            quantize_model(default_model_path(), dst, ftype, threads=2)
        out.append(dst)
    return out[0], out[1:]


def rel(a: float, b: float) -> str:
    if b == 0:
        return "   exact" if a == 0 else "     inf"
    return f"{100 * (a - b) / abs(b):+7.3f}%"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", default="Q8_0,Q4_0")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--text", default=None, help="text file or folder (default: llmquant's built-in text)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each tool; throughput is the best run")
    args = ap.parse_args()

    from llmquant.measure.eval import DEFAULT_TEXT, load_text

    exe = build_tool()
    base, models = make_files(args.types.split(","), CACHE / "eval-models")
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(args.text) if args.text else DEFAULT_TEXT
        if text.is_dir():  # llama-perplexity takes one file: give it llmquant's concatenation
            content, _ = load_text(text)
            text = Path(tmp) / "text.txt"
            text.write_text(content + "\n", encoding="utf-8")
        common = ["-c", str(args.ctx), "-t", str(args.threads)] + (["--chunks", str(args.chunks)] if args.chunks else [])
        kld_file = Path(tmp) / "base.kld"
        llama_times, ours_times, theirs, ours, fa = [], [], [], [], ""
        for _ in range(args.repeat):  # interleaved, so that load from other processes hits both alike
            log, seconds = run_llama(exe, ["-m", str(base), "-f", str(text), "--kl-divergence-base", str(kld_file), *common])
            fa = fa or ("auto -> on" if "FLASH_ATTN_EXT" in log else "off")
            stats = []
            for m in models:
                log, t = run_llama(exe, ["-m", str(m), "--kl-divergence-base", str(kld_file), "--kl-divergence", *common])
                seconds += t
                stats.append(parse(log))
            theirs = theirs or stats
            llama_times.append(seconds)
            res = run_llmquant(base, models, text, args.ctx, args.chunks, args.threads, compat=False)
            ours = ours or res
            ours_times.append(res[0]["base_seconds"] + sum(r["seconds"] for r in res))
        compat = run_llmquant(base, models, text, args.ctx, args.chunks, args.threads, compat=True)

    n_chunks = ours[0]["n_chunks"]
    print(f"llama-perplexity: {exe}")
    print(f"base {base.name}; text {args.text or 'llmquant built-in'}; ctx {args.ctx}, {n_chunks} chunks, "
          f"{ours[0]['n_tokens_scored']} tokens scored per model; {args.threads} threads; "
          f"flash attention: llama-perplexity {fa}, llmquant on\n")
    for m, t, e, c in zip(models, theirs, ours, compat):
        print(f"{m.name}")
        print(f"  {'statistic':12} {'llama-perplexity':>17} {'llmquant':>12} {'diff':>9}   {'llmquant compat':>15} {'diff':>9}")
        for key in SHOWN:
            if key not in t:
                print(f"  {key:12} {'(not printed)':>17}")
                continue
            flag = "  <- over the 1% goal" if key in GOALS and abs(e[key] - t[key]) > 0.01 * abs(t[key]) else ""
            print(f"  {key:12} {t[key]:17.6f} {e[key]:12.6f} {rel(e[key], t[key])}   {c[key]:15.6f} {rel(c[key], t[key])}{flag}")
        print()
    tokens = n_chunks * args.ctx * (1 + len(models))
    llama_time, ours_time = min(llama_times), min(ours_times)
    print(f"eval throughput (base + {len(models)} models, {tokens} tokens decoded; best of {args.repeat}):")
    print(f"  llama-perplexity {llama_time:7.2f} s  {tokens / llama_time:7.1f} tokens/s  (sum of its 'total time' lines; "
          f"runs: {', '.join(f'{t:.1f}' for t in llama_times)} s)")
    print(f"  llmquant         {ours_time:7.2f} s  {tokens / ours_time:7.1f} tokens/s  (decoding + statistics; "
          f"runs: {', '.join(f'{t:.1f}' for t in ours_times)} s)")
    print(f"  ratio llmquant/llama-perplexity tokens/s: {llama_time / ours_time:.3f}  (goal >= 0.95)")


if __name__ == "__main__":
    main()
