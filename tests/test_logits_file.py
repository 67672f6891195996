"""Base logits on disk in llama-perplexity's --kl-divergence-base format: the 16-bit rows against
the C code written out row by row, the layout, validation, and (slow) both directions with the
real llama-perplexity built from the vendored source."""

from __future__ import annotations

import math
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import LlamaFileType
from helpers import default_model_path

from llmquant.errors import LogitsFileError
from llmquant.measure.logits_file import (
    MAGIC,
    LogitsFile,
    LogitsFileWriter,
    decode_rows,
    encode_rows,
    file_size,
    row_width,
)


def ref_row(row: np.ndarray) -> np.ndarray:
    """log_softmax(n_vocab, logits, uint16_t * log_prob, tok) of perplexity.cpp, one row, as written."""
    row = np.asarray(row, np.float32)
    mx = np.float32(row.max())
    mn = np.float32(max(row.min(), mx - np.float32(16)))
    sum_exp = 0.0
    for v in row:
        sum_exp += float(np.exp(np.float32(v - mx)))
    lse = np.float32(math.log(sum_exp))
    min_log_prob = np.float32(np.float32(mn - mx) - lse)
    scale = np.float32(np.float32(mx - mn) / np.float32(65535))
    out = np.zeros(row_width(row.size), np.uint16)
    out[:4] = np.array([scale, min_log_prob], "<f4").view(np.uint16)
    if scale:
        inv = np.float32(np.float32(1) / scale)
        for i, v in enumerate(row):
            out[4 + i] = int(np.rint(np.float32(inv * np.float32(v - mn)))) if v > mn else 0
    return out


@pytest.mark.parametrize("n_vocab", [257, 300])  # odd: one padding value per row; even: none
def test_rows_equal_the_c_code(n_vocab):
    rng = np.random.default_rng(n_vocab)
    logits = (rng.standard_normal((5, n_vocab)) * 6).astype(np.float32)
    logits[1] = 3.0  # a constant row: scale 0, every q 0
    logits[2, 7] = 80.0  # one dominant logit: almost everything floored at max - 16
    got = encode_rows(logits)
    want = np.stack([ref_row(r) for r in logits])
    diff = np.argwhere(got != want)
    assert got.shape == (5, row_width(n_vocab)) and diff.size == 0, f"{len(diff)} values differ, first {diff[:3]}"
    back = decode_rows(got, n_vocab)[0].astype(np.float64)
    z = logits[0].astype(np.float64)
    exact = z - z.max() - np.log(np.exp(z - z.max()).sum())
    kept = z > max(z.min(), z.max() - 16)  # within 16 of the top: one 16/65535 step of error at most
    assert np.abs(back - exact)[kept].max() < 16 / 65535 + 1e-5


def test_layout_and_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    n_ctx, n_vocab, n_chunk = 16, 101, 3
    tokens = rng.integers(0, n_vocab, n_ctx * n_chunk).astype(np.int32)
    chunks = [(rng.standard_normal((7, n_vocab)) * 3).astype(np.float32) for _ in range(n_chunk)]
    path = tmp_path / "base.kld"
    with LogitsFileWriter(path, n_ctx, n_vocab, tokens) as w:
        for c in chunks:
            w.add_chunk(c)
        w.commit()
    raw = path.read_bytes()
    assert len(raw) == file_size(n_ctx, n_vocab, n_chunk) == 20 + 4 * 48 + 3 * 7 * row_width(n_vocab) * 2
    assert raw[:8] == MAGIC and struct.unpack("<Iii", raw[8:20]) == (n_ctx, n_vocab, n_chunk)
    assert np.array_equal(np.frombuffer(raw, "<i4", 48, 20), tokens)
    with LogitsFile(path) as f:
        assert (f.header.n_ctx, f.header.n_vocab, f.header.n_chunk, f.header.n_scored) == (16, 101, 3, 7)
        for i, c in enumerate(chunks):
            assert np.array_equal(f.chunk(i), encode_rows(c))
    assert [p.name for p in tmp_path.iterdir()] == ["base.kld"]


def test_interrupted_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with LogitsFileWriter(tmp_path / "x.kld", 16, 10, np.zeros(32, np.int32)) as w:
            w.add_chunk(np.zeros((7, 10), np.float32))
            w.commit()  # one chunk of two
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("damage, message", [
    (lambda b: b"_logitz_" + b[8:], "does not start with"),
    (lambda b: b[:-2], "expected"),
    (lambda b: b[:10], "truncated"),
    (lambda b: b[:8] + struct.pack("<I", 0) + b[12:], "n_ctx 0"),
    (lambda b: b[:20] + struct.pack("<i", 999) + b[24:], "token ids outside"),
])
def test_bad_files_are_clear_errors(tmp_path, damage, message):
    path = tmp_path / "base.kld"
    with LogitsFileWriter(path, 16, 10, np.zeros(16, np.int32)) as w:
        w.add_chunk(np.zeros((7, 10), np.float32))
        w.commit()
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(LogitsFileError, match=message):
        LogitsFile(path)


# -- real models ------------------------------------------------------------------------------------

CTX, CHUNKS = 128, 3


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path, Path]:
    from llmquant.quantize import quantize_model

    folder = tmp_path_factory.mktemp("kld")
    base, model = folder / "F16.gguf", folder / "Q4_0.gguf"
    quantize_model(default_model_path(), base, LlamaFileType.MOSTLY_F16, threads=2)
    quantize_model(default_model_path(), model, LlamaFileType.MOSTLY_Q4_0, threads=2)
    return base, model, folder


@pytest.mark.slow
def test_stored_base_equals_llama_compat_lockstep(pair):
    """evaluate against a file we wrote == evaluate(llama_compat=True) with the base in memory."""
    from llmquant.measure.eval import evaluate, write_base_logits

    base, model, folder = pair
    file = folder / "ours.kld"
    info = write_base_logits(base, file, ctx=CTX, chunks=CHUNKS, threads=2)
    assert info.file_bytes == file.stat().st_size == file_size(CTX, 49152, CHUNKS)
    stored = evaluate(model, base_logits=file, threads=2)
    lockstep = evaluate(model, base, ctx=CTX, chunks=CHUNKS, threads=2, llama_compat=True)
    for key in ("ppl", "base_ppl", "kld_mean", "kld_p99", "kld_max", "top1", "rms_dp"):
        assert getattr(stored, key) == pytest.approx(getattr(lockstep, key), rel=1e-9, abs=1e-12), key
    assert stored.n_tokens_scored == lockstep.n_tokens_scored == CHUNKS * (CTX - 1 - CTX // 2)


# llama-perplexity's final statistics (the same patterns bench/eval_parity.py reads)
PATTERNS = {
    "ppl": r"Mean PPL\(Q\)\s*:\s*([-\d.]+)",
    "base_ppl": r"Mean PPL\(base\)\s*:\s*([-\d.]+)",
    "kld_mean": r"Mean    KLD:\s*([-\d.]+)",
    "kld_max": r"Maximum KLD:\s*([-\d.]+)",
    "kld_p99": r"99\.0%   KLD:\s*([-\d.]+)",
    "kld_median": r"Median  KLD:\s*([-\d.]+)",
    "rms_dp": r"RMS Δp    :\s*([-\d.]+)",
    "top1": r"Same top p:\s*([-\d.]+)",
}


def llama_perplexity() -> Path:
    sys.path.insert(0, str(Path(__file__).parent.parent / "bench"))
    from _llama_build import build_tool

    return build_tool("llama-perplexity")


def run_tool(*args: str) -> dict[str, float]:
    proc = subprocess.run([str(llama_perplexity()), *args, "-c", str(CTX), "-t", "2", "--chunks", str(CHUNKS)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:]
    return {k: float(m.group(1)) for k, pat in PATTERNS.items() if (m := re.search(pat, proc.stdout))}


def same(ours, theirs: dict[str, float]) -> None:
    assert set(theirs) == set(PATTERNS), f"llama-perplexity printed only {sorted(theirs)}"
    for key, want in theirs.items():
        got = getattr(ours, key)
        # the tool prints 4-6 decimals; its float32 sums and FMA contraction differ in the last digits
        assert got == pytest.approx(want, rel=2e-3, abs=2e-4), (key, got, want)


@pytest.mark.slow
def test_llama_perplexity_reads_our_file(pair):
    from llmquant.measure.eval import evaluate, write_base_logits

    base, model, folder = pair
    file = folder / "for-llama.kld"
    write_base_logits(base, file, ctx=CTX, chunks=CHUNKS, threads=2)
    theirs = run_tool("-m", str(model), "--kl-divergence-base", str(file), "--kl-divergence")
    same(evaluate(model, base_logits=file, threads=2), theirs)


@pytest.mark.slow
def test_we_read_the_file_llama_perplexity_wrote(pair):
    from llmquant.measure.eval import evaluate, write_base_logits

    base, model, folder = pair
    theirs_file = folder / "by-llama.kld"
    proc = subprocess.run([str(llama_perplexity()), "-m", str(base), "-f",
                           str(Path(__file__).parent.parent / "src/llmquant/data/eval.txt"),
                           "--kl-divergence-base", str(theirs_file), "-c", str(CTX), "-t", "2", "--chunks", str(CHUNKS)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:]
    ours_file = folder / "by-us.kld"
    write_base_logits(base, ours_file, ctx=CTX, chunks=CHUNKS, threads=2)
    with LogitsFile(theirs_file) as a, LogitsFile(ours_file) as b:
        assert a.header == b.header
        assert np.array_equal(a.tokens, b.tokens)  # same text, same tokenizer, same cut
        qa, qb = a.log_probs(0), b.log_probs(0)
        assert np.abs(qa - qb).max() < 1e-3  # the same model decoded by the same kernels
    theirs = run_tool("-m", str(model), "--kl-divergence-base", str(theirs_file), "--kl-divergence")
    same(evaluate(model, base_logits=theirs_file, threads=2), theirs)


@pytest.mark.slow
def test_cli_eval_writes_then_reads_base_logits(pair):
    import json

    from typer.testing import CliRunner

    from llmquant.cli import app

    base, model, folder = pair
    file = folder / "cli.kld"
    runner = CliRunner()
    args = ["eval", str(model), "--base-logits", str(file), "--chunks", "1", "--threads", "2", "--json"]
    r = runner.invoke(app, [*args, "--base", str(base), "--ctx", "64"])
    assert r.exit_code == 0, r.output
    assert file.stat().st_size == file_size(64, 49152, 1) and "MiB to" in r.stderr
    first = json.loads(r.stdout)
    r = runner.invoke(app, args)  # no --base: the file is the base (its ctx 64, not the default 512)
    assert r.exit_code == 0, r.output
    again = json.loads(r.stdout)
    assert again["n_ctx"] == 64 and again["kld_mean"] == first["kld_mean"] and again["ppl"] == first["ppl"]
    r = runner.invoke(app, ["eval", str(model), "--base-logits", str(folder / "missing.kld")])
    assert isinstance(r.exception, LogitsFileError) and "no such file; give a base model" in str(r.exception)
