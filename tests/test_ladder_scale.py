"""The ladder at real sizes: one rung at a time against base logits on disk, resumable after a
SIGKILL, Hugging Face folders in, free-space refusal, --keep, and output a log can read."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from gguf import LlamaFileType
from helpers import default_model_path

from llmquant.errors import DiskSpaceError
from llmquant.measure.report import plain_table, rows

CTX, CHUNKS = 64, 1
RUNGS = ("Q8_0", "Q5_1", "Q5_0", "Q4_0")


@pytest.fixture(scope="module")
def f16_source(tmp_path_factory) -> Path:
    """A 16-bit source: the base of comparison is the file itself (no F32 rendering)."""
    from llmquant.quantize import quantize_model

    path = tmp_path_factory.mktemp("src") / "smollm2-F16.gguf"
    quantize_model(default_model_path(), path, LlamaFileType.MOSTLY_F16, threads=2)
    return path


def ladder(src, out, rungs=RUNGS, **kw):
    from llmquant.measure.ladder import run_ladder

    steps: list[str] = []
    result = run_ladder(src, rungs=rungs, out_dir=out, ctx=CTX, chunks=CHUNKS, threads=2, speed=False,
                        step=lambda desc, frac: steps.append(desc), **kw)
    return result, steps


CHILD = r"""
import sys
from llmquant.measure.ladder import run_ladder
run_ladder(sys.argv[1], rungs=tuple(sys.argv[3].split(",")), out_dir=sys.argv[2], ctx=int(sys.argv[4]), chunks=1,
           threads=2, speed=False, step=lambda desc, frac: print(desc, flush=True))
"""


@pytest.mark.slow
def test_killed_ladder_resumes_with_the_same_table(f16_source, tmp_path):
    """SIGKILL when the fourth rung starts; the restart reuses three measured rungs, redoes the
    fourth and finishes with the table of an uninterrupted run."""
    reference, _ = ladder(f16_source, tmp_path / "whole")
    assert reference.base == str(f16_source) and reference.base_type == "F16"  # the source itself

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(f16_source), str(out), ",".join(RUNGS), str(CTX)],
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seen = []
    for line in proc.stdout:
        seen.append(line.strip())
        if line.startswith(f"quantize {RUNGS[3]}"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, seen
    state = json.loads((out / "ladder-state.json").read_text())
    assert sorted(k for k in state["units"] if k.startswith("rung:")) == sorted(f"rung:{r}" for r in RUNGS[:3])
    mtimes = {r: (out / f"{Path(p).name}").stat().st_mtime_ns
              for r, p in ((r, state["units"][f"rung:{r}"]["data"]["path"]) for r in RUNGS[:3])}

    resumed, steps = ladder(f16_source, out)
    assert [r.resumed for r in resumed.rungs] == [True, True, True, False]
    assert not any(s.startswith(("quantize Q8_0", "quantize Q5_1", "quantize Q5_0", "base logits")) for s in steps), steps
    assert f"quantize {RUNGS[3]}" in steps
    assert {r: Path(resumed.rungs[i].path).stat().st_mtime_ns for i, r in enumerate(RUNGS[:3])} == mtimes
    assert rows(resumed) == rows(reference)
    for a, b in zip(resumed.rungs, reference.rungs):
        for key in ("ppl", "kld_mean", "kld_p99", "kld_max", "top1", "rms_dp", "n_tokens_scored"):
            assert a.eval[key] == b.eval[key], (a.name, key)
    assert not list(out.glob(".llmquant-partial-*"))  # the killed run's temporary file is gone


@pytest.mark.slow
def test_hf_folder_in_gives_the_table_of_converting_first(tmp_path):
    from hfmodel import export_default_model

    from llmquant.convert import convert_model

    folder = export_default_model(tmp_path / "SmolLM2-135M-Instruct", shards=1, dtype="F16", card=False)
    direct, steps = ladder(folder, tmp_path / "a", rungs=("Q8_0", "Q4_0"))
    assert any(s.startswith("convert SmolLM2-135M-Instruct") for s in steps)
    gguf = tmp_path / "b" / "converted-F16.gguf"
    gguf.parent.mkdir()
    convert_model(folder, gguf, "auto", threads=2)
    first, _ = ladder(gguf, tmp_path / "b", rungs=("Q8_0", "Q4_0"))
    assert direct.base_type == "F16" and not direct.source_was_quantized
    assert rows(direct) == rows(first)
    again, steps = ladder(folder, tmp_path / "a", rungs=("Q8_0", "Q4_0"))  # converted once
    assert not any(s.startswith("convert") for s in steps) and all(r.resumed for r in again.rungs)


@pytest.mark.slow
def test_disk_space_refusal_leaves_nothing_half_written(f16_source, tmp_path, monkeypatch):
    import llmquant.system

    out = tmp_path / "out"
    logits_size = None

    def free(folder):  # room for the base logits, not for a rung
        return (logits_size or 0) + (100 << 20)

    from llmquant.measure import eval as ev

    tokens, n_vocab, logits_size = ev.base_logits_layout(f16_source, None, CTX, CHUNKS)
    monkeypatch.setattr(llmquant.system, "free_disk_bytes", free)
    with pytest.raises(DiskSpaceError, match=r"Q8_0 file .* needs 0\.13 GiB"):
        ladder(f16_source, out, rungs=("Q8_0",))
    names = sorted(p.name for p in out.iterdir())
    assert len(names) == 2 and names[0].endswith("-base-ctx64.kld") and names[1] == "ladder-state.json", names
    monkeypatch.setattr(llmquant.system, "free_disk_bytes", lambda folder: 1 << 20)
    with pytest.raises(DiskSpaceError, match="base logits"):
        ladder(f16_source, tmp_path / "out2", rungs=("Q8_0",))
    assert [p.name for p in (tmp_path / "out2").iterdir()] == []


@pytest.mark.slow
def test_keep_best_and_none(f16_source, tmp_path):
    best, _ = ladder(f16_source, tmp_path, rungs=("Q8_0", "Q4_0"), keep="best")
    kept = [r.name for r in best.rungs if r.kept]
    assert kept == [best.recommendation] and all(Path(r.path).is_file() == r.kept for r in best.rungs)
    none, steps = ladder(f16_source, tmp_path, rungs=("Q8_0", "Q4_0"), keep="none")
    assert not any(r.kept for r in none.rungs) and not list(tmp_path.glob("*Q*.gguf"))
    assert all(r.resumed for r in none.rungs)  # measurements reused although the files are gone
    assert f16_source.is_file()


def test_plain_table_fits_80_columns():
    from llmquant.measure.ladder import LadderResult, RungResult

    def rung(name, mib):
        return RungResult(name=name, path=f"/x/{name}.gguf", reused=False, file_bytes=int(mib * 2**20),
                          bits_per_weight=4.5, quantize_seconds=1.0, types={}, fallback_share=0.25, fallbacks={},
                          eval={"ppl": 12.3456, "ppl_err": 0.4567, "ppl_ratio": 1.0123, "kld_mean": 0.01234,
                                "kld_p99": 0.1234, "top1": 95.12},
                          speed={"pp_tps": 1234.0, "tg_tps": 56.7, "peak_rss": 5 * 2**30},
                          fit={"total_bytes": 6 * 2**30, "fits": True})

    result = LadderResult(model="m.gguf", model_name="m", source_type="F16", source_was_quantized=False, base="m.gguf",
                          base_type="F16", ctx=512, chunks=10, text="t", threads=2,
                          rungs=[rung("Q8_0", 7000.5), rung("Q4_K_M", 4100.2)], inversions=[],
                          recommendation="Q4_K_M", reasons=[], machine={}, fit_ctx=8192, notes=[], seconds=1.0,
                          out_dir=".")
    text = plain_table(result, width=80)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert lines[0].split()[:2] == ["rung", "size"] and "Q4_K_M *" in text and "0.01234" in text and "95.12%" in text
    wide = plain_table(result, width=200)
    assert "fallback" in wide and "not shown" not in wide


def test_step_lines_for_logs():
    from llmquant.cli.options import StepLines

    buf = io.StringIO()
    lines = StepLines(buf)
    t = iter([0.0, 0.0, 10.0, 12.0, 13.0, 100.0])
    lines.clock = lambda: next(t)
    lines.t0 = lines.clock()
    lines("quantize Q8_0", 0.0)
    lines("evaluate Q8_0: chunk 1/40", 0.25)
    lines("evaluate Q8_0: chunk 2/40", 0.26)  # the same step within a minute: no line
    lines("speed Q8_0", 0.5)
    lines("evaluate Q8_0: chunk 3/40", 0.27)
    out = buf.getvalue().splitlines()
    assert out[0] == "[0:00]   0% quantize Q8_0"
    assert out[1] == "[0:10, ETA 0:30]  25% evaluate Q8_0: chunk 1/40"
    assert out[2].startswith("[0:13, ETA 0:13]  50% speed Q8_0")
    assert len(out) == 4 and out[3].startswith("[1:40")


def test_plain_table_with_imatrix_rungs_fits_80_columns():
    from llmquant.measure.ladder import LadderResult, RungResult

    def rung(name, kld):
        return RungResult(name=name, path=f"/x/{name}.gguf", reused=False, file_bytes=4000 * 2**20,
                          bits_per_weight=4.5, quantize_seconds=1.0, types={}, fallback_share=0.0, fallbacks={},
                          eval={"ppl": 12.3456, "ppl_err": 0.4567, "ppl_ratio": 1.0123, "kld_mean": kld,
                                "kld_p99": 0.1234, "top1": 95.12})

    result = LadderResult(model="m.gguf", model_name="m", source_type="F16", source_was_quantized=False, base="m.gguf",
                          base_type="F16", ctx=512, chunks=10, text="t", threads=2,
                          rungs=[rung("Q4_K_M", 0.02), rung("Q4_K_M+imat", 0.015)], inversions=[],
                          recommendation=None, reasons=[], machine={}, fit_ctx=8192, notes=[], seconds=1.0,
                          out_dir=".")
    text = plain_table(result, width=80)
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "KLD gain" in text.splitlines()[0] and "+25.0%" in text
