"""vLLM deployment plans: the KV-cache block count and maximum concurrency are vLLM's own formulas
(vllm/v1/core/kv_cache_utils.py get_num_blocks / get_max_concurrency_for_kv_cache_config,
vllm/v1/kv_cache_interface.py FullAttentionSpec.page_size_bytes), checked against three
configurations whose vLLM start-up logs are published:

1. meta-llama/Llama-3.1-8B-Instruct on an RTX 3090, --max-model-len 20000 (vllm-project/vllm#10517):
   "kv_cache_size=3.81GiB ... # GPU blocks: 1952 ... Maximum concurrency for 20000 tokens per request: 1.56x"
2. the same at --max-model-len 29000 (same comment): "kv_cache_size=2.89GiB ... # GPU blocks: 1478 ...
   Maximum concurrency for 29000 tokens per request: 0.82x ... maximum number of tokens that can be
   stored in KV cache (23648)"
3. Qwen/Qwen3-14B on one GPU, max_model_len 32768 (LMCache/LMCache#1739, vLLM v1 log lines):
   "Available KV cache memory: 6.51 GiB / GPU KV cache size: 42,656 tokens / Maximum concurrency for
   32,768 tokens per request: 1.30x"

vLLM prints memory rounded to 0.01 GiB, so the block count is checked to lie within what the
rounded figure allows, and the concurrency exactly as printed (two decimals).
"""

from __future__ import annotations

import math

import pytest

from llmquant.fit.vllm import (BLOCK_SIZE, kv_heads_per_gpu, max_concurrency, num_blocks, page_size_bytes,
                               parse_gpu, plan)

GiB = 1 << 30
# (name, layers, kv heads, head dim, printed GiB, published blocks, max_model_len, printed concurrency, engine)
PUBLISHED = [
    ("Llama-3.1-8B-Instruct 20k", 32, 8, 128, 3.81, 1952, 20000, "1.56", "v0"),
    ("Llama-3.1-8B-Instruct 29k", 32, 8, 128, 2.89, 1478, 29000, "0.82", "v0"),
    ("Qwen3-14B 32k", 40, 8, 128, 6.51, 42656 // BLOCK_SIZE, 32768, "1.30", "v1"),
]


@pytest.mark.parametrize("name,layers,kv,hd,gib,blocks,max_len,conc,engine", PUBLISHED, ids=[p[0] for p in PUBLISHED])
def test_block_counts_and_concurrency_match_published_vllm_logs(name, layers, kv, hd, gib, blocks, max_len, conc, engine):
    page = page_size_bytes(kv, hd, 2)  # bf16 cache
    assert page == 2 * 16 * kv * hd * 2
    lo = num_blocks(int((gib - 0.005) * GiB), page, layers)
    hi = num_blocks(int((gib + 0.005) * GiB), page, layers)
    assert lo <= blocks <= hi, (lo, blocks, hi)
    if engine == "v1":
        assert f"{max_concurrency(blocks, max_len):.2f}" == conc
        assert blocks * BLOCK_SIZE == 42656  # "GPU KV cache size" in tokens
    else:  # the v0 engine printed num_blocks * block_size / max_model_len
        assert f"{blocks * BLOCK_SIZE / max_len:.2f}" == conc
        if max_len == 29000:
            assert blocks * BLOCK_SIZE == 23648  # "maximum number of tokens that can be stored in KV cache"
    # v1's formula rounds the request up to whole blocks: never more than the plain ratio
    assert max_concurrency(blocks, max_len) <= blocks * BLOCK_SIZE / max_len


def test_plan_for_a_preset_on_two_a100s():
    from llmquant.fit.catalog import load_spec

    gpu, n = parse_gpu("A100-80G:2")
    assert gpu.name == "a100-80gb" and n == 2
    spec = load_spec("llama-3-8b")
    p = plan(spec, gpu, n, max_model_len=8192)
    assert p.weights_per_gpu == p.weights_bytes // 2 and p.weights_bytes == spec.n_params * 2
    assert p.page_size == page_size_bytes(kv_heads_per_gpu(8, 2), 128, 2)
    assert p.num_blocks == p.available_kv_bytes // p.page_size // spec.n_layer
    assert p.max_concurrency == p.num_blocks / math.ceil(8192 / 16) and p.fits
    assert "--tensor-parallel-size 2" in p.command and "--max-model-len 8192" in p.command
    fp8 = plan(spec, gpu, n, max_model_len=8192, kv_cache_dtype="fp8")
    assert fp8.num_blocks in (2 * p.num_blocks, 2 * p.num_blocks + 1)  # half the bytes per block
    small, _ = parse_gpu("rtx-4090")
    huge = plan(load_spec("70B"), small, 1)  # 140 GB of bf16 weights on one 24 GB card
    assert not huge.fits and huge.num_blocks == 0 and any("refuses to start" in n for n in huge.notes)


def test_kv_heads_are_replicated_past_their_count_and_bad_splits_refused():
    from llmquant.fit.catalog import load_spec
    from llmquant.fit.vllm import VllmPlanError

    assert kv_heads_per_gpu(8, 16) == 1 and kv_heads_per_gpu(8, 4) == 2
    gpu, _ = parse_gpu("h100-80gb")
    with pytest.raises(VllmPlanError, match="cannot split evenly"):
        plan(load_spec("llama-3-8b"), gpu, 3)
    with pytest.raises(VllmPlanError, match="not a catalog GPU"):
        parse_gpu("B200-192G")


def test_cli_prints_the_vllm_serve_command():
    import json
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "llmquant", "fit", "qwen2.5-7b", "--engine", "vllm", "--gpu",
                        "h100-80gb:2", "--max-model-len", "32768", "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["tp"] == 2 and d["command"].startswith("vllm serve qwen2.5-7b --tensor-parallel-size 2")
    assert d["num_blocks"] * 16 == d["kv_tokens"] and d["fits"]
