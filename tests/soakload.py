"""A bounded soak of ``llmquant serve`` on loopback (shared by tests/test_soak.py and bench/soak.py).

N concurrent clients send a fixed, seeded mix of requests: chat and completion (JSON and SSE
streaming), embeddings, clients that hang up mid-stream, and prompts over the context. Recorded:
every status code, each request's latency, the server's RSS after the first ``warmup`` requests
and at the end, and its slots once all clients are done.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import random
import select
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

KINDS = ("chat", "completion", "chat_stream", "completion_stream", "embedding", "hangup", "over_context",
         "over_context_embedding")
WEIGHTS = (5, 4, 4, 3, 3, 2, 2, 1)
PROMPTS = ["The capital of France is", "1, 2, 3, 4,", "Once upon a time", "def fibonacci(n):",
           "Water boils at", "My favourite colour is"]


@contextlib.contextmanager
def running_server(home: Path, *, ctx: int = 512, parallel: int = 2, threads: int = 1, extra: tuple[str, ...] = ()):
    """``llmquant serve --port 0`` as a subprocess; yields (base url, Popen, log path)."""
    env = {**os.environ, "LLMQUANT_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    env.pop("LLMQUANT_API_KEY", None)
    log_path = home / "server.log"
    home.mkdir(parents=True, exist_ok=True)
    log = log_path.open("w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmquant", "serve", "--port", "0", "--parallel", str(parallel), "--threads",
         str(threads), "--ctx", str(ctx), *extra], stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    url = None
    deadline = time.monotonic() + 120
    try:
        while url is None and time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 1.0)
            if ready:
                line = proc.stdout.readline()
                if not line:
                    break
                if "http://" in line:
                    url = line.split("http://", 1)[1].split()[0].removesuffix("/v1")
        if url is None:
            log.seek(0)
            raise RuntimeError(f"server did not start: {log.read()[-2000:]}")
        yield f"http://{url}", proc, log_path
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def rss_bytes(pid: int) -> int:
    import psutil

    return psutil.Process(pid).memory_info().rss


@dataclass
class SoakResult:
    requests: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    by_kind: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    rss_warm: int = 0
    rss_end: int = 0
    slots_idle: int = -1
    slots_total: int = -1
    seconds: float = 0.0

    def p(self, q: float) -> float:
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else 0.0

    def summary(self) -> dict:
        return {"requests": self.requests, "statuses": self.statuses, "by_kind": self.by_kind,
                "failures": len(self.failures), "first_failures": self.failures[:5],
                "p50_s": round(self.p(0.50), 3), "p99_s": round(self.p(0.99), 3), "max_s": round(max(self.latencies, default=0), 3),
                "rss_after_warmup_mib": round(self.rss_warm / 2**20, 1), "rss_end_mib": round(self.rss_end / 2**20, 1),
                "rss_growth_pct": round(100 * (self.rss_end - self.rss_warm) / max(self.rss_warm, 1), 2),
                "slots_idle_at_end": self.slots_idle, "slots_total": self.slots_total, "seconds": round(self.seconds, 1)}


def _post(host: str, port: int, path: str, body: dict, timeout: float = 300) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def _hangup(host: str, port: int, body: dict) -> int:
    """Start a streamed answer, read until the first token event, then drop the connection."""
    sock = socket.create_connection((host, port), timeout=300)
    try:
        raw = json.dumps(body).encode()
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(raw)}\r\n\r\n".encode() + raw)
        got = b""
        while got.count(b"data: ") < 2:
            chunk = sock.recv(4096)
            if not chunk:
                break
            got += chunk
        status = int(got.split(b" ", 2)[1]) if got.startswith(b"HTTP/") else 0
    finally:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST
        sock.close()
    return status


def one_request(base: str, kind: str, rng: random.Random) -> tuple[int, str]:
    """(HTTP status, problem or '') for one request of ``kind``."""
    host, port = base.removeprefix("http://").rsplit(":", 1)
    port_i = int(port)
    prompt = rng.choice(PROMPTS)
    n = rng.randint(1, 6)  # short answers: the soak is about concurrency, not generation speed
    if kind in ("chat", "chat_stream"):
        body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": n, "temperature": 0.7,
                "seed": rng.randint(0, 1000), "stream": kind == "chat_stream"}
        status, data = _post(host, port_i, "/v1/chat/completions", body)
    elif kind in ("completion", "completion_stream"):
        body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "stream": kind == "completion_stream",
                "stream_options": {"include_usage": True} if kind == "completion_stream" else None}
        status, data = _post(host, port_i, "/v1/completions", body)
    elif kind == "embedding":
        status, data = _post(host, port_i, "/v1/embeddings", {"input": [prompt, prompt[::-1]]})
    elif kind == "hangup":
        status = _hangup(host, port_i, {"messages": [{"role": "user", "content": "Tell me a long story."}],
                                        "max_tokens": 200, "stream": True})
        return status, "" if status == 200 else f"hangup got {status}"
    elif kind == "over_context":
        status, data = _post(host, port_i, "/v1/completions", {"prompt": "hello world " * 600, "max_tokens": 4})
        if status != 400 or b"context_length_exceeded" not in data:
            return status, f"over_context: {status} {data[:200]!r}"
        return status, ""
    else:  # over_context_embedding
        status, data = _post(host, port_i, "/v1/embeddings", {"input": "hello world " * 2000})
        if status != 400:
            return status, f"over_context_embedding: {status} {data[:200]!r}"
        return status, ""
    if status != 200:
        return status, f"{kind}: {status} {data[:200]!r}"
    if kind.endswith("_stream"):
        if not data.rstrip().endswith(b"data: [DONE]") or b'"error"' in data:
            return status, f"{kind}: stream did not finish cleanly: {data[-200:]!r}"
    else:
        doc = json.loads(data)
        if kind == "embedding":
            if len(doc["data"]) != 2 or not doc["data"][0]["embedding"]:
                return status, f"embedding: bad body {data[:200]!r}"
        elif not doc.get("choices"):
            return status, f"{kind}: no choices {data[:200]!r}"
    return status, ""


def soak(base: str, pid: int, *, n_requests: int = 300, clients: int = 16, warmup: int = 50, seed: int = 0) -> SoakResult:
    rng = random.Random(seed)
    plan = rng.choices(KINDS, weights=WEIGHTS, k=n_requests)
    for i, kind in enumerate(KINDS):  # every kind appears within the warm-up (the embedder loads lazily)
        plan[i * 3 % warmup] = kind
    res = SoakResult()
    lock = threading.Lock()
    done = [0]
    warm_seen = threading.Event()

    def work(i: int) -> None:
        kind = plan[i]
        r = random.Random(seed * 100_003 + i)
        t0 = time.perf_counter()
        try:
            status, problem = one_request(base, kind, r)
        except Exception as exc:  # noqa: BLE001 — a dropped connection or timeout is a failure too
            status, problem = 0, f"{kind}: {type(exc).__name__}: {exc}"
        dt = time.perf_counter() - t0
        with lock:
            res.requests += 1
            res.statuses[str(status)] = res.statuses.get(str(status), 0) + 1
            res.by_kind[kind] = res.by_kind.get(kind, 0) + 1
            if kind not in ("hangup",):
                res.latencies.append(dt)
            if problem or status >= 500:
                res.failures.append(problem or f"{kind}: {status}")
            done[0] += 1
            if done[0] == warmup:
                res.rss_warm = rss_bytes(pid)
                warm_seen.set()

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        list(pool.map(work, range(n_requests)))
    res.seconds = time.perf_counter() - t0
    # slots come back once each hung-up generation notices (at its next token)
    host, port = base.removeprefix("http://").rsplit(":", 1)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        conn.request("GET", "/health")
        health = json.loads(conn.getresponse().read())
        conn.close()
        res.slots_idle, res.slots_total = health["slots_idle"], health["slots_total"]
        if res.slots_idle == res.slots_total:
            break
        time.sleep(0.2)
    res.rss_end = rss_bytes(pid)
    return res
