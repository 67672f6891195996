"""llmquant imatrix against llama.cpp's own tools, built from the vendored source (the same llama.cpp
as the runtime): llama-imatrix on the default model's F32 rendering and the shipped text gives the
same entries, counts and sums; llama-quantize takes our file and writes the bytes it writes with its
own; llama-imatrix reads our GGUF and .dat back (its --in-file loader) without change.

The tools are built once by bench/_llama_build.py when missing (one cmake build shared by every test
here; about 25-40 minutes on 2 cores, seconds when $LLMQUANT_LLAMA_CACHE already holds them). The
comparison itself (two 8-chunk collections, two llama-quantize runs per type) took 19.4 minutes on
the shared machine at load ~20; on 2 idle cores it should be about 2-3 minutes.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import LlamaFileType
from helpers import default_model_path

from llmquant.calib.stats import default_calibration_path
from llmquant.calibrate import make_imatrix
from llmquant.gguf.imatrix import load_imatrix, load_imatrix_raw
from llmquant.quantize import quantize_model

pytestmark = pytest.mark.slow

ROOT = Path(__file__).parent.parent
CHUNKS, CTX, THREADS = 8, 512, 2


@pytest.fixture(scope="module")
def tools() -> dict[str, Path]:
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from _llama_build import build_tool
    finally:
        sys.path.pop(0)
    return {t: build_tool(f"llama-{t}") for t in ("imatrix", "quantize")}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("imatrix-oracle")


@pytest.fixture(scope="module")
def f32(work) -> Path:
    return quantize_model(default_model_path(), work / "smollm2-F32.gguf", LlamaFileType.ALL_F32,
                          threads=THREADS).destination


@pytest.fixture(scope="module")
def pair(tools, f32, work) -> dict[str, Path]:
    """Our file and llama-imatrix's, same model, text (given as the same path string), ctx, chunks,
    threads; each in its own folder under the same name."""
    text = str(default_calibration_path())
    (work / "ours").mkdir()
    (work / "theirs").mkdir()
    subprocess.run([str(tools["imatrix"]), "-m", str(f32), "-f", text, "-o", str(work / "theirs" / "imatrix.gguf"),
                    "-c", str(CTX), "--chunks", str(CHUNKS), "-t", str(THREADS), "--no-ppl"],
                   check=True, capture_output=True)
    make_imatrix(f32, text, work / "ours" / "imatrix.gguf", n_ctx=CTX, chunks=CHUNKS, threads=THREADS)
    return {"ours": work / "ours" / "imatrix.gguf", "theirs": work / "theirs" / "imatrix.gguf"}


def test_same_entries_counts_and_sums(pair):
    ours, theirs = load_imatrix_raw(pair["ours"]), load_imatrix_raw(pair["theirs"])
    assert sorted(ours.entries) == sorted(theirs.entries)
    assert len(ours.entries) == 30 * 7
    assert (ours.chunk_count, ours.chunk_size, ours.datasets) == (theirs.chunk_count, theirs.chunk_size, theirs.datasets)
    assert ours.chunk_count == CHUNKS
    worst, worst_name, identical = 0.0, "", 0
    for name, (sums, counts) in theirs.entries.items():
        our_sums, our_counts = ours.entries[name]
        np.testing.assert_array_equal(our_counts, counts, err_msg=name)
        assert our_sums.shape == sums.shape, name
        rel = np.abs(our_sums.astype(np.float64) - sums) / np.maximum(np.abs(sums.astype(np.float64)), 1e-30)
        if rel.max() > worst:
            worst, worst_name = float(rel.max()), name
        identical += int(np.array_equal(our_sums, sums))
    assert worst <= 1e-4, f"largest relative difference {worst:.3g} in {worst_name}"
    # the accumulation follows imatrix.cpp's order and rounding: every entry is bit-identical
    # (without this, llama-quantize's weighted searches flip on near-ties; see bench/RESULTS.md)
    assert identical == len(theirs.entries), f"only {identical} of {len(theirs.entries)} entries bit-identical"
    print(f"\n{identical} of {len(theirs.entries)} entries bit-identical; largest relative difference {worst:.3g}")


def test_whole_file_identical(pair):
    """Same sums, same keys, same tensor table (ggml_n_dims dimensions), same padding: the bytes."""
    assert pair["ours"].read_bytes() == pair["theirs"].read_bytes()


@pytest.mark.parametrize("ftype", ["Q4_K_M", "Q2_K"])
def test_llama_quantize_writes_the_same_bytes_with_our_file(tools, f32, pair, work, ftype):
    outs = {}
    for side in ("ours", "theirs"):
        dst = work / side / f"q-{ftype}.gguf"
        # the same relative imatrix path on both sides: quantize.imatrix.file records it verbatim
        subprocess.run([str(tools["quantize"]), "--imatrix", "imatrix.gguf", str(f32), str(dst), ftype, str(THREADS)],
                       check=True, capture_output=True, cwd=work / side)
        outs[side] = dst
    a, b = outs["ours"].read_bytes(), outs["theirs"].read_bytes()
    assert a == b, f"{ftype}: outputs differ in {sum(x != y for x, y in zip(a, b))} bytes"
    # and hence the same greedy text
    from llmquant.runtime.llama import Model

    texts = []
    for side in ("ours", "theirs"):
        with Model(outs[side], n_ctx=256, threads=THREADS) as m:
            texts.append(m.complete("The capital of France is", max_tokens=24).text)
    assert texts[0] == texts[1]


def test_llama_imatrix_reads_our_files_back(tools, pair, work):
    """Our GGUF and .dat through llama-imatrix's loader (--in-file, combine only): it writes back
    the same entries, and our reader reads both as llama-quantize would."""
    ours = load_imatrix_raw(pair["ours"])
    back = work / "back.gguf"
    # llama-imatrix wants -m even when it only combines --in-file matrices (it loads no weights then)
    model = ["-m", str(default_model_path())]
    subprocess.run([str(tools["imatrix"]), *model, "--in-file", str(pair["ours"]), "-o", str(back)], check=True, capture_output=True)
    again = load_imatrix_raw(back)
    assert sorted(again.entries) == sorted(ours.entries) and again.chunk_count == ours.chunk_count
    for n, (sums, counts) in ours.entries.items():
        np.testing.assert_array_equal(again.entries[n][0], sums)
        np.testing.assert_array_equal(again.entries[n][1], counts)

    dat = work / "ours.dat"
    make_imatrix(default_model_path(), None, dat, in_files=[pair["ours"]])
    back_dat = work / "back.dat"
    subprocess.run([str(tools["imatrix"]), *model, "--in-file", str(dat), "--output-format", "dat", "-o", str(back_dat)],
                   check=True, capture_output=True)
    mine, theirs = load_imatrix(dat), load_imatrix(back_dat)
    assert mine.format == theirs.format == "legacy" and sorted(mine.entries) == sorted(theirs.entries)
    for n in mine.entries:  # legacy -> raw (x chunk size) -> legacy again: equal to float32 rounding
        np.testing.assert_allclose(theirs.entries[n], mine.entries[n], rtol=1e-6)
    gg = load_imatrix(pair["ours"])
    for n in mine.entries:
        np.testing.assert_allclose(mine.entries[n], gg.entries[n], rtol=1e-6)


def test_periodic_saves_and_from_chunk_match_llama_imatrix(tools, f32, work):
    """--chunk 1 --save-frequency 2 --output-frequency 3 over 4 chunks: the same files
    (OUT.at_2, OUT.at_4 and OUT, written mid-batch at the same moments) byte for byte."""
    text = str(default_calibration_path())
    for side in ("freq-ours", "freq-theirs"):
        (work / side).mkdir()
    subprocess.run([str(tools["imatrix"]), "-m", str(f32), "-f", text, "-o", str(work / "freq-theirs" / "imatrix.gguf"),
                    "-c", str(CTX), "--chunks", "4", "--chunk", "1", "--save-frequency", "2", "-ofreq", "3",
                    "-t", str(THREADS), "--no-ppl"], check=True, capture_output=True)
    make_imatrix(f32, text, work / "freq-ours" / "imatrix.gguf", n_ctx=CTX, chunks=4, threads=THREADS, from_chunk=1,
                 save_frequency=2, output_frequency=3)
    names = sorted(p.name for p in (work / "freq-theirs").iterdir())
    assert names == ["imatrix.gguf", "imatrix.gguf.at_2", "imatrix.gguf.at_4"]
    assert sorted(p.name for p in (work / "freq-ours").iterdir()) == names
    for name in names:
        assert (work / "freq-ours" / name).read_bytes() == (work / "freq-theirs" / name).read_bytes(), name


@pytest.mark.parametrize("ctx, chunks", [(256, 3), (512, 7)])
def test_uneven_groups_and_short_context_bit_identical(tools, f32, work, ctx, chunks):
    """llama-imatrix decodes batch / ctx chunks together and llama.cpp cuts micro-batches of
    512 // n_sequences tokens of each (split_equal); llmquant hands llama_decode one micro-batch at
    a time. 3 chunks of 256 (3 of 8 sequences: 170 tokens of each per micro-batch, then 86) and
    7 of 512 (a group of 4, then one of 3) must still give the very same bits."""
    text = str(default_calibration_path())
    out = work / f"u{ctx}-{chunks}"
    out.mkdir()
    subprocess.run([str(tools["imatrix"]), "-m", str(f32), "-f", text, "-o", str(out / "theirs.gguf"),
                    "-c", str(ctx), "--chunks", str(chunks), "-t", str(THREADS), "--no-ppl"],
                   check=True, capture_output=True)
    make_imatrix(f32, text, out / "ours.gguf", n_ctx=ctx, chunks=chunks, threads=THREADS)
    ours, theirs = load_imatrix_raw(out / "ours.gguf"), load_imatrix_raw(out / "theirs.gguf")
    assert sorted(ours.entries) == sorted(theirs.entries) and len(theirs.entries) == 210
    differ = [n for n, (s, c) in theirs.entries.items()
              if not (np.array_equal(ours.entries[n][0], s) and np.array_equal(ours.entries[n][1], c))]
    assert not differ, f"{len(differ)} of 210 entries differ, first {differ[0]}"
