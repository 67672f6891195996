"""Runtime speed: ``llmquant bench`` vs llama.cpp's ``llama-bench``, and the server's overhead.

1. pp (prompt processing) and tg (generation) tokens/s of ``llmquant bench`` and of ``llama-bench``
   built from the llama.cpp that llama-cpp-python vendors (bench/_llama_build.py, cached in
   bench/.cache/), same model, same threads, flash attention off on both sides (llama-cpp-python's
   default), alternating one repetition of each so that machine noise hits both alike.
   Goal: ours / llama-bench >= 0.95 for pp and tg.
2. tg as a share of the memory-bandwidth limit: bytes of weights read per token (every matrix
   once; bench.model_facts) x tg tokens/s / read bandwidth measured here (numpy sums over a
   512 MiB buffer, one slice per thread).
3. Server overhead: completion tokens / wall second through ``/v1/completions`` of a
   ``llmquant serve`` subprocess (JSON and SSE) vs the same generation called directly
   (run.run_prompt), greedy, same prompt, same threads. Goal: >= 0.9.

    python bench/runtime_speed.py [--model M] [--threads 2] [--repeat 5] [-p 512] [-n 128]
"""

from __future__ import annotations

import argparse
import json
import os
import select
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _llama_build import build_tool

from llmquant.measure.bench import model_facts
from llmquant.store import resolve_model

SERVER_PROMPT = "Here is a long story about a dragon who learned to code:"


def llama_bench(exe: Path, model: Path, n_prompt: int, n_gen: int, threads: int) -> dict[str, float]:
    out = subprocess.run([str(exe), "-m", str(model), "-p", str(n_prompt), "-n", str(n_gen), "-r", "1",
                          "-t", str(threads), "-fa", "0", "-o", "json"], capture_output=True, text=True, check=True)
    rows = json.loads(out.stdout)
    res = {}
    for row in rows:
        key = "pp" if row["n_prompt"] and not row["n_gen"] else "tg"
        res[key] = float(row["avg_ts"])
    return res


def ours(model: Path, n_prompt: int, n_gen: int, threads: int) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-m", "llmquant", "bench", str(model), "-p", str(n_prompt), "-n", str(n_gen),
                          "-r", "1", "-t", str(threads), "--json"], capture_output=True, text=True, check=True)
    data = json.loads(out.stdout)
    return {"pp": data["pp_tps"], "tg": data["tg_tps"]}


def read_bandwidth(threads: int, mib: int = 512, repeat: int = 5) -> float:
    """Bytes/s that ``threads`` threads can stream from memory (best of ``repeat``)."""
    buf = np.ones(mib * 2**20 // 8, dtype=np.float64)
    parts = np.array_split(buf, threads)
    best = 0.0
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(np.sum, parts))  # touch every page first
        for _ in range(repeat):
            t0 = time.perf_counter()
            list(pool.map(np.sum, parts))
            best = max(best, buf.nbytes / (time.perf_counter() - t0))
    return best


def mean_std(v: list[float]) -> str:
    return f"{statistics.fmean(v):8.2f} ± {statistics.stdev(v) if len(v) > 1 else 0:6.2f}"


def start_server(model: Path, threads: int) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "llmquant", "serve", str(model), "--port", "0", "--threads",
                             str(threads), "--parallel", "1", "--ctx", "2048"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if select.select([proc.stdout], [], [], 1.0)[0]:
            line = proc.stdout.readline()
            if "http://" in line:
                return proc, "http://" + line.split("http://", 1)[1].split()[0].removesuffix("/v1")
            if not line:
                break
    proc.kill()
    raise SystemExit("llmquant serve did not start")


def through_server(url: str, n_gen: int, stream: bool) -> tuple[int, float]:
    body = json.dumps({"prompt": SERVER_PROMPT, "max_tokens": n_gen, "temperature": 0, "stream": stream}).encode()
    req = urllib.request.Request(url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as resp:
        if not stream:
            n = json.loads(resp.read())["usage"]["completion_tokens"]
            return n, time.perf_counter() - t0
        n = 0
        for line in resp:
            if line.startswith(b"data: {") and b'"text": ""' not in line:
                n += 1  # one event per piece; pieces can merge tokens, so count from the direct run
    return n, time.perf_counter() - t0


def direct(model, n_gen: int) -> tuple[int, float]:
    from llmquant.serve.session import run_prompt
    from llmquant.runtime.llama import Sampling

    t0 = time.perf_counter()
    stream = run_prompt(model, SERVER_PROMPT, max_tokens=n_gen, sampling=Sampling(temperature=0)).consume()
    return stream.stats.completion_tokens, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF path or store name (default: the embedded model)")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("-p", "--n-prompt", type=int, default=512)
    ap.add_argument("-n", "--n-gen", type=int, default=128)
    ap.add_argument("--skip-server", action="store_true")
    args = ap.parse_args()
    model = resolve_model(args.model)
    exe = build_tool("llama-bench", jobs=1)
    facts = model_facts(model)
    print(f"model {model} ({facts['desc']}, {facts['tensor_bytes'] / 2**20:.2f} MiB of tensors)")
    print(f"threads {args.threads}, {args.repeat} alternating repetitions, pp{args.n_prompt} / tg{args.n_gen}, flash attention off\n")

    # 1. llmquant bench vs llama-bench -----------------------------------------------------------
    got: dict[str, dict[str, list[float]]] = {"llmquant": {"pp": [], "tg": []}, "llama-bench": {"pp": [], "tg": []}}
    for _ in range(args.repeat):
        for name, fn in (("llama-bench", lambda: llama_bench(exe, model, args.n_prompt, args.n_gen, args.threads)),
                         ("llmquant", lambda: ours(model, args.n_prompt, args.n_gen, args.threads))):
            r = fn()
            for k in ("pp", "tg"):
                got[name][k].append(r[k])
    print(f"{'test':8} {'llmquant t/s':>18} {'llama-bench t/s':>18} {'ratio (mean)':>13} {'ratio (median)':>15}  goal")
    for k, label in (("pp", f"pp{args.n_prompt}"), ("tg", f"tg{args.n_gen}")):
        a, b = got["llmquant"][k], got["llama-bench"][k]
        ratio = statistics.fmean(a) / statistics.fmean(b)
        med = statistics.median(a) / statistics.median(b)
        print(f"{label:8} {mean_std(a):>18} {mean_std(b):>18} {ratio:13.3f} {med:15.3f}  >= 0.95 {'ok' if med >= 0.95 else 'MISSED'}")

    # 2. tg against the memory-bandwidth limit -----------------------------------------------------
    bw = read_bandwidth(args.threads)
    limit = bw / facts["bytes_per_token"]
    tg = statistics.median(got["llmquant"]["tg"])
    print(f"\nread bandwidth {bw / 1e9:.1f} GB/s ({args.threads} threads, numpy); weights read per token "
          f"{facts['bytes_per_token'] / 2**20:.1f} MiB -> limit {limit:.0f} tok/s; "
          f"tg {tg:.1f} tok/s = {100 * tg / limit:.0f}% of the limit")

    if args.skip_server:
        return
    # 3. server overhead --------------------------------------------------------------------------
    from llmquant.serve.session import load

    proc, url = start_server(model, args.threads)
    try:
        m = load(model, ctx=2048, threads=args.threads)
        through_server(url, 8, False)  # warm both
        direct(m, 8)
        d, s, e = [], [], []
        for _ in range(args.repeat):
            n, sec = direct(m, args.n_gen)
            d.append(n / sec)
            n_s, sec = through_server(url, args.n_gen, False)
            assert n_s == n, f"server generated {n_s} tokens, direct {n}"
            s.append(n_s / sec)
            _, sec = through_server(url, args.n_gen, True)
            e.append(n / sec)
        m.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(f"\nend-to-end completion tokens/s ({n} tokens, prompt {SERVER_PROMPT!r}):")
    print(f"  direct (run)                {mean_std(d)}")
    for label, v in (("/v1/completions (JSON)", s), ("/v1/completions (SSE)", e)):
        ratio = statistics.median(v) / statistics.median(d)
        print(f"  {label:27} {mean_std(v)}  ratio {ratio:.3f}  goal >= 0.9 {'ok' if ratio >= 0.9 else 'MISSED'}")


if __name__ == "__main__":
    main()
