"""Server soak on loopback: ``llmquant serve`` (embedded model) under N concurrent clients sending
a seeded mix of chat / completion (JSON and SSE), embeddings, mid-stream hang-ups and over-context
prompts (tests/soakload.py). Prints statuses, failures, p50/p99 latency, RSS after the warm-up and
at the end, and the slots free at the end.

    python bench/soak.py                       # 16 clients, 300 requests, 2 slots
    python bench/soak.py --requests 1000 --clients 32 --parallel 4
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from soakload import running_server, soak  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        with running_server(Path(tmp) / "home", ctx=args.ctx, parallel=args.parallel, threads=args.threads) as (base, proc, log):
            result = soak(base, proc.pid, n_requests=args.requests, clients=args.clients, warmup=args.warmup)
        tracebacks = log.read_text().count("Traceback")
    summary = {**result.summary(), "server_tracebacks": tracebacks, "clients": args.clients, "slots": args.parallel}
    print(json.dumps(summary, indent=2))
    ok = (not result.failures and not any(s.startswith("5") for s in result.statuses)
          and result.slots_idle == result.slots_total and summary["rss_growth_pct"] <= 5 and not tracebacks)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
