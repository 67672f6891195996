"""``llmquant serve`` under load and under generated requests (a real subprocess on loopback).

- soak: 16 concurrent clients, 300 requests mixing chat, completion, streaming, embeddings,
  mid-stream hang-ups and over-context prompts: no 5xx, every slot free at the end, RSS at the end
  within 5 % of RSS after the first 50 requests; p50/p99 latency printed (bench/soak.py records them).
- schemathesis: every operation of the server's OpenAPI schema (FastAPI's, generated from the app's
  routes: the server itself publishes none) with generated bodies: never a 5xx.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("psutil")

from soakload import running_server, soak  # noqa: E402

CTX = 512


@pytest.mark.slow
def test_soak_16_clients_300_requests(tmp_path):
    with running_server(tmp_path / "home", ctx=CTX, parallel=2) as (base, proc, log):
        result = soak(base, proc.pid, n_requests=300, clients=16, warmup=50)
        summary = result.summary()
        print("soak:", json.dumps(summary))
        assert result.requests == 300
        assert result.failures == [], result.failures[:10]
        assert not any(s.startswith("5") for s in result.statuses), result.statuses
        assert result.slots_idle == result.slots_total == 2
        assert summary["rss_growth_pct"] <= 5.0, summary
    logged = log.read_text()
    assert "Traceback" not in logged, logged[-3000:]


def _schema() -> dict:
    from types import SimpleNamespace

    from llmquant.serve.app import create_app

    app = create_app(None, pool=SimpleNamespace())  # the routes alone make the schema; no model is needed
    return app.openapi()


@pytest.mark.slow
def test_schemathesis_finds_no_server_error(tmp_path):
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_dict(_schema())
    failures: list[str] = []
    counts: dict[str, int] = {}
    statuses: dict[int, int] = {}
    with running_server(tmp_path / "home", ctx=128, parallel=1) as (base, proc, log):
        for result in schema.get_all_operations():
            op = result.ok()
            label = f"{op.method.upper()} {op.path}"

            @settings(max_examples=40, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy())
            def run(case):
                response = case.call(base_url=base, timeout=120)
                counts[label] = counts.get(label, 0) + 1
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                if response.status_code >= 500:
                    failures.append(f"{label} -> {response.status_code}: {response.text[:300]} for {case.body!r}")

            run()
        print("schemathesis requests:", counts, "statuses:", dict(sorted(statuses.items())))
        assert proc.poll() is None  # still serving
    assert failures == [], failures[:5]
    assert len(counts) >= 6 and sum(counts.values()) >= 100, counts
    logged = log.read_text()
    assert "Traceback" not in logged, logged[-3000:]
