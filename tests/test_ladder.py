"""Ladder orchestration: recommendation and inversion rules on synthetic results, and the whole
main job on the embedded model (slow)."""

from __future__ import annotations

import json

import pytest

from llmquant.measure.ladder import RungResult, find_inversions, recommend


def rung(name, mib, ppl_ratio, kld, fallback=0.0, types=None, fallbacks=None):
    return RungResult(
        name=name, path=f"/x/{name}.gguf", reused=False, file_bytes=int(mib * 2**20), bits_per_weight=mib / 10,
        quantize_seconds=0.0, types=types or {name: {"tensors": 1, "bytes": 1, "params": 100}},
        fallback_share=fallback, fallbacks=fallbacks or {},
        eval={"ppl_ratio": ppl_ratio, "kld_mean": kld, "kld_err": kld / 100, "top1": 95.0, "ppl": 10 * ppl_ratio},
    )


def test_recommend_smallest_within_threshold_for_small_models():
    rungs = [rung("Q8_0", 140, 1.001, 0.001), rung("Q5_K_M", 100, 1.008, 0.01), rung("Q4_K_M", 90, 1.025, 0.03)]
    pick, reasons = recommend(rungs, model_params=135_000_000)
    assert pick == "Q5_K_M"
    assert "Q4_K_M" in reasons[1] and "small model" in reasons[2]
    # a 7B model tolerates the usual sweet spot
    pick, _ = recommend(rungs, model_params=7_000_000_000)
    assert pick == "Q4_K_M"


def test_recommend_when_nothing_is_good_enough():
    pick, reasons = recommend([rung("Q2_K", 50, 1.5, 0.5), rung("Q3_K_M", 60, 1.2, 0.2)], 135_000_000)
    assert pick == "Q3_K_M" and "no rung" in reasons[0]


def test_inversion_is_flagged_and_explained():
    big = rung("Q5_K_M", 100, 1.02, 0.02, fallback=0.8,
               types={"Q5_1": {"tensors": 166, "bytes": 1, "params": 78}, "Q6_K": {"tensors": 14, "bytes": 1, "params": 12}},
               fallbacks={"Q5_K -> Q5_1": 166})
    small = rung("Q4_K_M", 95, 1.01, 0.01, fallback=0.8,
                 types={"Q5_0": {"tensors": 166, "bytes": 1, "params": 78}, "Q4_K": {"tensors": 16, "bytes": 1, "params": 14}},
                 fallbacks={"Q4_K -> Q5_0": 166})
    flags = find_inversions([big, small], source_type="Q4_1")
    assert len(flags) == 1
    text = flags[0]
    assert "Q5_K_M" in text and "Q4_K_M" in text and "Q5_1" in text and "Q5_0" in text and "Q4_1 grid" in text
    assert find_inversions([rung("Q8_0", 140, 1.0, 0.001), rung("Q4_0", 80, 1.05, 0.05)], None) == []


@pytest.mark.slow
def test_ladder_main_job_on_default_model(tmp_path):
    """The README's main job on a short run: every output written and consistent."""
    from llmquant.measure.ladder import run_ladder
    from llmquant.measure.report import write_all

    result = run_ladder(rungs=("Q8_0", "Q4_K_M", "Q2_K"), out_dir=tmp_path, chunks=3, threads=2, speed=True)
    paths = write_all(result, tmp_path)
    data = json.loads(open(paths["json"]).read())
    assert [r["name"] for r in data["rungs"]] == ["Q8_0", "Q4_K_M", "Q2_K"]
    klds = [r["eval"]["kld_mean"] for r in data["rungs"]]
    assert klds[0] < klds[1] < klds[2], klds
    assert data["source_was_quantized"] and "Q4_1" in " ".join(data["notes"])
    assert all(r["speed"]["tg_tps"] > 0 and r["speed"]["peak_rss"] > 0 for r in data["rungs"])
    assert data["rungs"][1]["fallback_share"] > 0.5  # 576-column tensors cannot take Q4_K
    md = open(paths["md"]).read()
    assert "| rung |" in md and "recommendation" in md
    png = open(paths["png"], "rb").read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    # a second run reuses the identical outputs
    again = run_ladder(rungs=("Q8_0",), out_dir=tmp_path, chunks=1, threads=2, speed=False)
    assert again.rungs[0].reused
