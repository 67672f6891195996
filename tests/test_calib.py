"""llmquant imatrix: the shipped calibration text, the accumulation (imatrix.cpp's loops written out
plainly as the reference), both file formats read back by our reader and by libggml's own GGUF
parser, and every kind of bad input."""

from __future__ import annotations

import ctypes
import hashlib
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import default_model_path

from llmquant.calib.stats import (
    ImatrixStats,
    collect_imatrix,
    default_calibration_path,
    plan_chunks,
    read_text,
)
from llmquant.calibrate import make_imatrix, merge_files
from llmquant.errors import CalibrationError, DestinationError, ModelFileError
from llmquant.gguf.imatrix import load_imatrix, load_imatrix_raw, save_imatrix
from llmquant.gguf.writer import TEMP_PREFIX
from llmquant.runtime import reference

EVAL_TEXT = Path(__file__).parent.parent / "src" / "llmquant" / "data" / "eval.txt"


@pytest.fixture(scope="module")
def vocab():
    from llmquant.runtime.llama import Model

    with Model(default_model_path(), vocab_only=True) as m:
        yield m


# -- the calibration text ---------------------------------------------------------------------------

def _windows(tokens: list[int], n: int = 64) -> set[bytes]:
    a = np.asarray(tokens, dtype=np.int32)
    return {a[i:i + n].tobytes() for i in range(len(a) - n + 1)}


def test_calibration_text_size_mix_and_disjoint_from_eval(vocab):
    path = default_calibration_path()
    assert path.stat().st_size < 1_000_000
    text = path.read_text(encoding="utf-8")
    tokens = vocab.tokenize(text, add_bos=False)
    assert len(tokens) >= 100_000, len(tokens)
    # mixed: code, dialogue, lists, numbers, several scripts
    assert "def " in text and "return " in text
    assert "Customer:" in text and "\n- " in text and "\n1. " in text
    assert sum(c.isdigit() for c in text) > 20_000
    for script, probe in (("CJK", "的"), ("Cyrillic", "и"), ("Greek", "α"), ("Arabic", "ال"), ("Latin accents", "é")):
        assert probe in text, script
    # no 64-token window of the evaluation text occurs in the calibration text
    ev = _windows(vocab.tokenize(EVAL_TEXT.read_text(encoding="utf-8"), add_bos=False))
    cal = np.asarray(tokens, dtype=np.int32)
    shared = [i for i in range(len(cal) - 63) if cal[i:i + 64].tobytes() in ev]
    assert not shared, f"{len(shared)} shared 64-token windows, first at token {shared[0]}"


def test_notice_names_the_sources_and_licenses():
    notice = (default_calibration_path().parent / "NOTICE").read_text()
    assert "calibration.txt" in notice and "PSF" in notice and "CC0" in notice


# -- accumulation: imatrix.cpp's loops, plainly ----------------------------------------------------------

class _Inp:
    def __init__(self, name, op, x, weight_ne, ids=None):
        self.name, self.op, self.x, self.weight_ne, self.ids = name, op, x, weight_ne, ids


def _add_rows(acc: np.ndarray, rows: np.ndarray) -> None:
    for row in rows:  # acc[j] += x[j]*x[j] in float32: the product rounded, then the sum
        acc[:] = acc + row * row


def test_dense_accumulation_is_imatrix_cpp():
    rng = np.random.default_rng(0)
    s = ImatrixStats()
    ref = np.zeros(48, np.float32)
    for n in (20, 33):
        x = rng.standard_normal((1, 1, n, 48)).astype(np.float32) * 3
        s.add(_Inp("blk.0.attn_q.weight", "MUL_MAT", x, (48, 8, 1, 1)))
        _add_rows(ref, x[0, 0])
    e = s.entries["blk.0.attn_q.weight"]
    assert e.counts.tolist() == [53]
    np.testing.assert_array_equal(e.sums[0], ref)


def test_strided_and_3d_weights():
    """A non-contiguous src1 view, and a 3-D weight: one row of sums per matrix, counts per matrix."""
    rng = np.random.default_rng(1)
    base = rng.standard_normal((1, 2, 17, 40)).astype(np.float32)
    x = base[..., :32]  # rows padded (nb1 > ne0 * 4)
    s = ImatrixStats()
    s.add(_Inp("blk.1.w.weight", "MUL_MAT", x, (32, 4, 2, 1)))
    e = s.entries["blk.1.w.weight"]
    assert e.sums.shape == (2, 32) and e.counts.tolist() == [17]
    for m in range(2):
        ref = np.zeros(32, np.float32)
        _add_rows(ref, x[0, m])
        np.testing.assert_array_equal(e.sums[m], ref)


def test_moe_accumulation_per_expert():
    """MUL_MAT_ID: src1 [ne0, ne1, n_tokens], ids [n_used, n_tokens]; expert ex gets the token's
    row idx % ne1, counts[ex] += 1 per routed token (imatrix.cpp's loop, idx outer)."""
    rng = np.random.default_rng(2)
    n_tok, n_used, n_as, ne0 = 24, 2, 5, 16
    ids = np.stack([rng.choice(n_as - 1, n_used, replace=False) for _ in range(n_tok)]).astype(np.int32)
    s = ImatrixStats()
    for ne1 in (1, n_used):  # ffn_up/gate (one row, broadcast) and ffn_down (one row per slot)
        x = rng.standard_normal((1, n_tok, ne1, ne0)).astype(np.float32)
        name = f"blk.0.ffn_{'up' if ne1 == 1 else 'down'}_exps.weight"
        s.add(_Inp(name, "MUL_MAT_ID", x, (ne0, 7, n_as, 1), ids))
        sums = np.zeros((n_as, ne0), np.float32)
        counts = np.zeros(n_as, np.int64)
        for idx in range(n_used):
            for row in range(n_tok):
                ex = ids[row, idx]
                _add_rows(sums[ex], x[0, row, idx % ne1][None])
                counts[ex] += 1
        e = s.entries[name]
        np.testing.assert_array_equal(e.sums, sums)
        np.testing.assert_array_equal(e.counts, counts)
        assert e.counts[n_as - 1] == 0  # never routed


def test_non_finite_activation_is_an_error():
    s = ImatrixStats()
    x = np.ones((1, 1, 16, 8), np.float32)
    x[0, 0, 3, 2] = np.inf
    with pytest.raises(CalibrationError, match="blk.0.attn_q.weight.*non-finite"):
        s.add(_Inp("blk.0.attn_q.weight", "MUL_MAT", x, (8, 8, 1, 1)))


def test_selection_and_chunk_plan():
    s = ImatrixStats()
    assert s.wants("blk.3.ffn_down.weight") and not s.wants("output.weight") and not s.wants("token_embd.weight")
    assert ImatrixStats(process_output=True).wants("output.weight")
    assert plan_chunks(2048, 512, None) == 4 and plan_chunks(5000, 512, 3) == 3 and plan_chunks(1024, 512, 9) == 2
    with pytest.raises(CalibrationError, match="1023 tokens.*at least 1024"):
        plan_chunks(1023, 512, None)


class _FakeTap:
    """The runtime's side, for the orchestration alone: chunks are recorded, no matmul reported
    (a model without blk.* matrix multiplications)."""

    n_seq, add_bos, bos = 4, True, 1

    def __init__(self, n_tokens):
        self.n_tokens, self.groups = n_tokens, []

    def tokenize(self, text, parse_special=False):
        return np.arange(100, 100 + self.n_tokens, dtype=np.int32)

    def decode_chunks(self, chunks):
        self.groups.append([c.copy() for c in chunks])


def test_chunks_bos_and_a_model_without_blk_matmuls():
    tap = _FakeTap(512 * 6 + 100)
    with pytest.raises(CalibrationError, match="no matrix multiplication with a 'blk"):
        collect_imatrix(tap, "text", n_ctx=512)
    assert [len(g) for g in tap.groups] == [4, 2]  # n_seq chunks per decode
    chunks = [c for g in tap.groups for c in g]
    for i, c in enumerate(chunks):
        assert len(c) == 512 and c[0] == 1  # the first token of every chunk becomes BOS
        np.testing.assert_array_equal(c[1:], np.arange(100 + i * 512 + 1, 100 + (i + 1) * 512))


# -- files ---------------------------------------------------------------------------------------------------

def _stats() -> ImatrixStats:
    rng = np.random.default_rng(3)
    s = ImatrixStats(chunk_size=512)
    s.merge("blk.0.attn_q.weight", (rng.pareto(2, 64) * 4096).astype(np.float32), [4096])
    s.merge("blk.0.ffn_up_exps.weight", (rng.pareto(2, 3 * 32) * 100).astype(np.float32), [1000, 0, 37])
    s.merge("output.weight", (rng.pareto(2, 64) * 4096).astype(np.float32), [4096])
    s.datasets.append("calib.txt")
    return s


def _save(s: ImatrixStats, path: Path, fmt: str) -> Path:
    return save_imatrix(path, {n: (e.sums, e.counts) for n, e in s.entries.items()}, datasets=s.datasets,
                        chunk_count=s.chunk_count, chunk_size=s.chunk_size, output_format=fmt)


def test_gguf_round_trip_ours_and_libggml(tmp_path):
    s = _stats()
    path = _save(s, tmp_path / "i.gguf", "gguf")
    raw = load_imatrix_raw(path)
    assert (raw.chunk_count, raw.chunk_size, raw.datasets, raw.is_legacy) == (8, 512, ["calib.txt"], False)
    for name, e in s.entries.items():
        np.testing.assert_array_equal(raw.entries[name][0], e.sums.reshape(-1))
        np.testing.assert_array_equal(raw.entries[name][1], e.counts.astype(np.float32))
    im = load_imatrix(path)
    np.testing.assert_allclose(im.entries["blk.0.attn_q.weight"], s.entries["blk.0.attn_q.weight"].sums[0] / np.float32(4096), rtol=0)
    assert (im.entries["blk.0.ffn_up_exps.weight"][32:64] == 1).all()  # the expert without data
    # libggml's own parser (gguf_init_from_file, what common_imatrix_load calls)
    lib = reference.ggml()

    class InitParams(ctypes.Structure):
        _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]

    lib.gguf_init_from_file.restype = ctypes.c_void_p
    lib.gguf_init_from_file.argtypes = [ctypes.c_char_p, InitParams]
    for fn, res, args in (("gguf_get_n_tensors", ctypes.c_int64, [ctypes.c_void_p]),
                          ("gguf_get_tensor_name", ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_int64]),
                          ("gguf_get_tensor_type", ctypes.c_int, [ctypes.c_void_p, ctypes.c_int64]),
                          ("gguf_get_tensor_size", ctypes.c_size_t, [ctypes.c_void_p, ctypes.c_int64]),
                          ("gguf_find_key", ctypes.c_int64, [ctypes.c_void_p, ctypes.c_char_p]),
                          ("gguf_get_val_u32", ctypes.c_uint32, [ctypes.c_void_p, ctypes.c_int64]),
                          ("gguf_get_val_str", ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_int64]),
                          ("gguf_get_arr_n", ctypes.c_size_t, [ctypes.c_void_p, ctypes.c_int64]),
                          ("gguf_free", None, [ctypes.c_void_p])):
        getattr(lib, fn).restype, getattr(lib, fn).argtypes = res, args
    ctx = lib.gguf_init_from_file(str(path).encode(), InitParams(True, None))
    assert ctx, "libggml refuses the file"
    try:
        names = [lib.gguf_get_tensor_name(ctx, i).decode() for i in range(lib.gguf_get_n_tensors(ctx))]
        assert names == [f"{n}{suf}" for n in sorted(s.entries) for suf in (".in_sum2", ".counts")]
        assert all(lib.gguf_get_tensor_type(ctx, i) == 0 for i in range(len(names)))  # F32
        assert lib.gguf_get_tensor_size(ctx, names.index("blk.0.ffn_up_exps.weight.in_sum2")) == 3 * 32 * 4
        assert lib.gguf_get_val_str(ctx, lib.gguf_find_key(ctx, b"general.type")) == b"imatrix"
        assert lib.gguf_get_val_u32(ctx, lib.gguf_find_key(ctx, b"imatrix.chunk_count")) == 8
        assert lib.gguf_get_val_u32(ctx, lib.gguf_find_key(ctx, b"imatrix.chunk_size")) == 512
        assert lib.gguf_get_arr_n(ctx, lib.gguf_find_key(ctx, b"imatrix.datasets")) == 1
        assert lib.gguf_find_key(ctx, b"general.architecture") == -1
    finally:
        lib.gguf_free(ctx)


def test_legacy_round_trip_and_layout(tmp_path):
    s = _stats()
    path = _save(s, tmp_path / "i.dat", "dat")
    blob = path.read_bytes()
    (n_entries,) = struct.unpack_from("<i", blob)
    assert n_entries == 3
    # trailer: int32 last chunk, int32 length, dataset name
    assert blob.endswith(struct.pack("<i", 8) + struct.pack("<i", 9) + b"calib.txt")
    im = load_imatrix(path)
    assert im.format == "legacy" and im.chunk_count == 8 and im.datasets == ["calib.txt"]
    q = s.entries["blk.0.attn_q.weight"]
    ncall = 8  # ceil(4096 / 512)
    want = ((q.sums[0] / np.float32(4096)) * np.float32(ncall)).astype(np.float32) / np.float32(ncall)
    np.testing.assert_array_equal(im.entries["blk.0.attn_q.weight"], want)
    assert (im.entries["blk.0.ffn_up_exps.weight"][32:64] == 1).all()  # "store 1 for partial data"
    # merging a legacy file: sums * chunk size, ncall * chunk size, as IMatrixCollector::load_imatrix
    m = ImatrixStats(chunk_size=512)
    merge_files(m, [path])
    assert m.entries["blk.0.attn_q.weight"].counts.tolist() == [4096]
    np.testing.assert_allclose(m.entries["blk.0.attn_q.weight"].sums[0], q.sums[0], rtol=1e-6)


def test_gguf_merge_adds_sums_and_counts(tmp_path):
    s = _stats()
    a = _save(s, tmp_path / "a.gguf", "gguf")
    m = ImatrixStats(chunk_size=512)
    merge_files(m, [a, a])
    for name, e in s.entries.items():
        np.testing.assert_array_equal(m.entries[name].sums, e.sums + e.sums)
        np.testing.assert_array_equal(m.entries[name].counts, 2 * e.counts)
    assert m.chunk_count == 16 and m.datasets == ["calib.txt", "calib.txt"]


def test_write_is_atomic(tmp_path, monkeypatch):
    s = _stats()
    dst = tmp_path / "i.gguf"
    dst.write_bytes(b"old")
    import llmquant.gguf.imatrix as gi

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(gi, "_write_gguf", boom)
    with pytest.raises(DestinationError, match="disk full"):  # an OSError is one named line
        _save(s, dst, "gguf")
    assert dst.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["i.gguf"]
    with pytest.raises(DestinationError, match="is a folder"):
        _save(s, tmp_path, "gguf")


# -- bad input ---------------------------------------------------------------------------------------------

def test_text_inputs(tmp_path):
    with pytest.raises(CalibrationError, match="no such file"):
        read_text(tmp_path / "missing.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CalibrationError, match="holds no text files"):
        read_text(tmp_path / "empty")
    (tmp_path / "bad.txt").write_bytes(b"ok \xff\xfe")
    with pytest.raises(CalibrationError, match="not UTF-8"):
        read_text(tmp_path / "bad.txt")
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.md").write_text("second")
    (folder / "sub" / "a.txt").write_text("third")
    (folder / "a.txt").write_text("first")
    (folder / "skip.bin").write_bytes(b"\0")
    assert read_text(folder) == "first\n\nsecond\n\nthird"


def test_text_shorter_than_two_chunks(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here. " * 20)
    with pytest.raises(CalibrationError, match=r"tokens; a context of 512 needs at least 1024"):
        make_imatrix(default_model_path(), short, tmp_path / "i.gguf", threads=1)
    assert not (tmp_path / "i.gguf").exists()


def test_merge_of_a_file_for_another_model(tmp_path):
    s = ImatrixStats(chunk_size=512)
    s.merge("blk.0.attn_q.weight", np.ones(100, np.float32), [512])  # SmolLM2's attn_q has 576 columns
    bad = _save(s, tmp_path / "other.gguf", "gguf")
    before = hashlib.sha256(bad.read_bytes()).hexdigest()
    text = tmp_path / "t.txt"
    text.write_text(default_calibration_path().read_text(encoding="utf-8")[:20_000])
    with pytest.raises(CalibrationError, match=r"tensor 'blk.0.attn_q.weight': 100 sums .* 1 x 576"):
        make_imatrix(default_model_path(), text, tmp_path / "i.gguf", in_files=[bad], chunks=1, n_batch=512, threads=2)
    assert not (tmp_path / "i.gguf").exists()
    assert hashlib.sha256(bad.read_bytes()).hexdigest() == before
    with pytest.raises(ModelFileError, match="not an imatrix"):
        merge_files(ImatrixStats(), [default_model_path()])


@pytest.mark.slow
def test_kill_mid_run_leaves_nothing(tmp_path):
    """SIGKILL while collecting: no file at the destination, no temporary left, the merge source
    untouched. (~10 s)"""
    from llmquant.gguf.source import GGUFSource

    prev = ImatrixStats(chunk_size=512)
    with GGUFSource(default_model_path()) as m:  # a valid earlier file for this model
        for t in m.tensors:
            if t.name.startswith("blk.") and len(t.shape) == 2:
                prev.merge(t.name, np.full(t.shape[0], 512.0, np.float32), [512])
    prev.datasets.append("prev.txt")
    src = _save(prev, tmp_path / "prev.gguf", "gguf")
    before = src.read_bytes()
    dst = tmp_path / "out.gguf"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent / "src")}
    p = subprocess.Popen([sys.executable, "-m", "llmquant", "imatrix", "-o", str(dst), "--in-file", str(src),
                          "-f", str(default_calibration_path()), "-t", "1", "-b", "512", "--json"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        time.sleep(8)  # loaded, tokenized, decoding
        assert p.poll() is None, p.stderr.read().decode()
        p.send_signal(signal.SIGKILL)
        p.wait(30)
    finally:
        if p.poll() is None:
            p.kill()
    assert not dst.exists()
    assert sorted(x.name for x in tmp_path.iterdir()) == ["prev.gguf"]
    assert not any(x.name.startswith(TEMP_PREFIX) for x in tmp_path.iterdir())
    assert src.read_bytes() == before


# -- --imatrix auto and the ladder's imatrix rungs ----------------------------------------------------------

@pytest.mark.slow
def test_auto_imatrix_is_reused_while_current(tmp_path):
    """(~20 s) collected once, reused while model, text and settings are the same, collected
    again when the text changes."""
    from llmquant.calibrate import auto_imatrix

    text = tmp_path / "calib.txt"
    text.write_text(default_calibration_path().read_text(encoding="utf-8")[:12_000])
    first = auto_imatrix(default_model_path(), tmp_path, text=text, chunks=2, threads=2)
    assert not first.reused and first.path.name == f"{default_model_path().stem}.imatrix.gguf"
    assert first.chunk_count == 2 and first.entries == 210
    stamp = first.path.stat().st_mtime_ns
    again = auto_imatrix(default_model_path(), tmp_path, text=text, chunks=2, threads=2)
    assert again.reused and again.path.stat().st_mtime_ns == stamp
    text.write_text(text.read_text() + "\nmore text")
    third = auto_imatrix(default_model_path(), tmp_path, text=text, chunks=2, threads=2)
    assert not third.reused


@pytest.mark.slow
def test_ladder_rows_with_and_without_imatrix(tmp_path):
    """Every K/legacy rung also made with the imatrix (RUNG+imat), a KLD gain column, the plot; on two
    layers of SmolLM2's shapes with its vocabulary (the main job's test runs the default model itself):
    576 columns, so the IQ4_XS rung falls back to IQ4_NL there as on the default model."""
    from tinymodel import write_tiny_llama_with_vocab

    from llmquant.measure.ladder import run_ladder
    from llmquant.measure.report import columns, kld_gain, markdown, write_all

    model = write_tiny_llama_with_vocab(tmp_path / "tiny-vocab.gguf", n_embd=576, n_head=9, n_head_kv=3, n_ff=1536)
    im = make_imatrix(model, None, tmp_path / "i.gguf", chunks=2, n_batch=1024, threads=2)
    result = run_ladder(model, rungs=("Q8_0", "Q4_0", "IQ4_XS"), out_dir=tmp_path / "lad", chunks=2, threads=2, speed=False,
                        imatrix=im.path)
    # Q8_0 ignores an imatrix; an IQ rung is made only with it
    assert [r.name for r in result.rungs] == ["Q8_0", "Q4_0", "Q4_0+imat", "IQ4_XS+imat"]
    iq = result.rungs[3]
    assert Path(iq.path).name.endswith("-IQ4_XS-imat.gguf") and "IQ4_XS" in iq.types and "IQ4_NL" in iq.types
    assert iq.eval["kld_mean"] > 0
    plain, imat = result.rungs[1], result.rungs[2]
    assert Path(plain.path).read_bytes() != Path(imat.path).read_bytes()
    assert "KLD gain" in columns(result) and "KLD gain" in markdown(result)
    gain = kld_gain(result, "Q4_0+imat")
    assert gain == pytest.approx(1 - imat.eval["kld_mean"] / plain.eval["kld_mean"])
    paths = write_all(result, tmp_path / "lad")
    assert Path(paths["png"]).stat().st_size > 10_000


def test_ladder_default_rungs_gain_iq_rungs_with_an_imatrix(tmp_path):
    """Without --rungs the IQ rungs published beside the K-quants join when there is an imatrix, each
    after the K/legacy rung above it in bits per weight; a rung llama.cpp makes only with an imatrix
    is refused before any work when there is none (nothing written)."""
    from llmquant.errors import LadderError
    from llmquant.measure.ladder import DEFAULT_RUNGS, default_rungs, run_ladder

    assert default_rungs(False) == DEFAULT_RUNGS
    rungs = default_rungs(True)
    assert rungs == ("F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "IQ4_XS", "Q3_K_M", "IQ3_M", "Q2_K", "IQ2_M")
    with pytest.raises(LadderError, match=r"rung IQ2_M: llama.cpp makes blk\.\d+\.\w+\.weight \(IQ2_\w+\) only with an importance matrix; add --imatrix auto"):
        run_ladder(rungs=("Q4_0", "IQ2_M"), out_dir=tmp_path / "lad", chunks=1, threads=2, speed=False)
    assert not (tmp_path / "lad").exists()
