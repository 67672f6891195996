"""Volume fuzzing: >= 1M seeded mutations per target (tests/fuzzing.py), each target in its own
child process under RLIMIT_AS = (its address space after imports) + 1 GiB, each case under a
5 s timer. A case may return or raise one LlmquantError; anything else (a traceback, a
MemoryError, a timeout, the child dying) is a finding, saved under tests/fuzz_regressions/.

    python bench/fuzz.py                       # 1M cases per target
    python bench/fuzz.py --cases 100000 --targets gguf_header chat_template --jobs 1
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
EXTRA_BYTES = 1 << 30


def _vm_size() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    return 0


def child(target: str, cases: int, seed: int, progress: str | None = None) -> dict:
    import fuzzing

    seeds = fuzzing.seeds()[target]
    pool = [s for t in fuzzing.seeds().values() for s in t]
    fuzzing.run_case(target, seeds[0])  # import everything the target touches first
    limit = _vm_size() + EXTRA_BYTES
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    rng = random.Random(seed)
    refused = findings = 0
    kinds: dict[str, int] = {}
    t0 = time.perf_counter()

    def summary(done: int) -> dict:
        seconds = time.perf_counter() - t0
        return {"target": target, "cases": done, "seed": seed, "refused": refused,
                "accepted": done - refused - findings, "findings": findings, "outcomes": kinds,
                "seconds": round(seconds, 1), "cases_per_s": round(done / max(seconds, 1e-9)),
                "rlimit_as_gib": round(limit / 2**30, 2),
                "max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}

    for i in range(cases):
        if progress and i and i % 10_000 == 0:  # a run cut short still says what it did
            Path(progress).write_text(json.dumps(summary(i)) + "\n")
        data = fuzzing.mutate(rng.choice(seeds), fuzzing.random_ops(rng), rng.choice(pool))
        try:
            err = fuzzing.run_case(target, data)
        except BaseException as exc:  # noqa: BLE001 — every other outcome is a finding
            if isinstance(exc, KeyboardInterrupt):
                raise
            findings += 1
            name = type(exc).__name__
            kinds[name] = kinds.get(name, 0) + 1
            if findings <= 20:
                fuzzing.save_regression(target, data, traceback.format_exc())
            continue
        if err is not None:
            refused += 1
            kinds[type(err).__name__] = kinds.get(type(err).__name__, 0) + 1
    return summary(cases)


def main() -> None:
    import fuzzing

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=1_000_000)
    ap.add_argument("--targets", nargs="*", default=list(fuzzing.TARGETS))
    ap.add_argument("--seed", type=int, default=19)
    ap.add_argument("--jobs", type=int, default=2, help="targets fuzzed at once")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--progress", help="write each target's running totals to PROGRESS-<target>.json every 10k cases")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.cases, args.seed, args.progress)))
        if args.progress:
            Path(args.progress).unlink(missing_ok=True)
        return
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    pending = list(args.targets)
    running: list[tuple[str, subprocess.Popen]] = []
    results = []
    while pending or running:
        while pending and len(running) < args.jobs:
            t = pending.pop(0)
            cmd = [sys.executable, __file__, "--child", t, "--cases", str(args.cases), "--seed", str(args.seed)]
            if args.progress:
                cmd += ["--progress", f"{args.progress}-{t}.json"]
            running.append((t, subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)))
        t, proc = running.pop(0)
        out, _ = proc.communicate()
        if proc.returncode != 0:  # killed (memory, signal) or crashed outside a case
            results.append({"target": t, "cases": args.cases, "findings": 1, "error": f"child exited {proc.returncode}"})
        else:
            results.append(json.loads(out.strip().splitlines()[-1]))
        r = results[-1]
        if not args.json:
            print(f"{r['target']:20} {r['cases']:>9,} cases  findings {r['findings']}  "
                  f"refused {r.get('refused', '-')}  {r.get('cases_per_s', '-')} cases/s  "
                  f"max RSS {r.get('max_rss_mib', '-')} MiB  RLIMIT_AS {r.get('rlimit_as_gib', '-')} GiB", flush=True)
    if args.json:
        print(json.dumps(results, indent=2))
    sys.exit(1 if any(r["findings"] for r in results) else 0)


if __name__ == "__main__":
    main()
