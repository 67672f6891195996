"""Measure what a llama-cpp-python process really uses: ``python -m llmquant.measure.memprobe MODEL --ctx N
--batch N --kv-type T --prompt P --gen G`` loads MODEL through the runtime, evaluates a prompt of P
tokens, generates G more and prints one JSON line with the process's peak RSS (getrusage) and the
speed it saw. ``--baseline`` only imports the runtime and llama_cpp (fit's RUNTIME_BASELINE).

Run it in a fresh process: peak RSS is a per-process high-water mark. Nothing is subtracted: the
figure includes the interpreter, the imports, the mmap'd weights and every buffer llama.cpp touched.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time


def peak_rss() -> int:
    """The process's peak resident set size in bytes.

    On Linux this is ``VmHWM`` from /proc/self/status: ``ru_maxrss`` survives ``exec``, so a child
    started by a large parent (pytest, the ladder holding several models) would report the
    parent's peak instead of its own. Elsewhere ru_maxrss (KiB on Linux, bytes on macOS)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(value) if sys.platform == "darwin" else int(value) * 1024


def prompt_ids(n: int, n_vocab: int) -> list[int]:
    """A deterministic prompt of ``n`` ordinary token ids (memory does not depend on which)."""
    return [100 + (i * 7919) % max(n_vocab - 200, 1) for i in range(n)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m llmquant.measure.memprobe")
    ap.add_argument("model", nargs="?")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--kv-type", default=None)
    ap.add_argument("--prompt", type=int, default=16, help="prompt tokens (-1: fill the context)")
    ap.add_argument("--gen", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--baseline", action="store_true")
    args = ap.parse_args(argv)

    import llama_cpp  # noqa: F401  (the import is part of the baseline)

    from ..runtime import llama as runtime

    out: dict = {"baseline_rss_bytes": peak_rss()}
    if args.baseline or not args.model:
        out["peak_rss_bytes"] = out["baseline_rss_bytes"]
        print(json.dumps(out))
        return 0
    t0 = time.perf_counter()
    with runtime.Model(args.model, n_ctx=args.ctx, n_batch=args.batch, threads=args.threads,
                       kv_type=args.kv_type) as m:
        out["load_seconds"] = round(time.perf_counter() - t0, 3)
        out["rss_after_load_bytes"] = peak_rss()
        n_prompt = m.n_ctx - args.gen if args.prompt < 0 else args.prompt
        ids = prompt_ids(n_prompt, m.n_vocab)
        t1 = time.perf_counter()
        stamps = []
        for _ in m.stream_tokens(ids, max_tokens=args.gen):
            stamps.append(time.perf_counter())
        out.update(
            n_ctx=m.n_ctx, prompt_tokens=n_prompt, generated=len(stamps),
            prompt_seconds=round((stamps[0] if stamps else time.perf_counter()) - t1, 3),
            gen_tok_s=round((len(stamps) - 1) / (stamps[-1] - stamps[0]), 2) if len(stamps) > 2 else None,
        )
    out["peak_rss_bytes"] = peak_rss()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
