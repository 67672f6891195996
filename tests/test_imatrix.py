"""Importance matrices as llama-quantize --imatrix reads them: both file formats written here as
llama.cpp's imatrix tool writes them, the per-tensor vectors as quantize.cpp computes them, and the
quantized tensors byte-identical to llama_model_quantize given the same vectors."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType, GGUFWriter
from gguf import LlamaFileType as F
from helpers import default_model_path
from tinymodel import write_tiny_llama

from llmquant.runtime import reference
from llmquant.errors import ModelFileError, TensorDataError
from llmquant.formats import registered_types
from llmquant.gguf.imatrix import load_imatrix
from llmquant.quantize import quantize_model
from llmquant.gguf.source import GGUFSource

CHUNK_SIZE = 512
FTYPES = {"Q4_0": F.MOSTLY_Q4_0, "Q5_1": F.MOSTLY_Q5_1}
if T.Q4_K in registered_types() and T.Q6_K in registered_types():
    FTYPES["Q4_K_M"] = F.MOSTLY_Q4_K_M


# -- writing imatrix files as tools/imatrix/imatrix.cpp does -------------------------------------------

class Stats:
    """What llama-imatrix accumulates per weight: sums of squared activations (n_mat rows of
    n_per_row, one per expert) and how many activations each row summed."""

    def __init__(self, sums: np.ndarray, counts: np.ndarray):
        self.sums = np.asarray(sums, np.float32).reshape(len(counts), -1)
        self.counts = np.asarray(counts, np.int64)


def write_gguf_imatrix(path, stats: dict[str, Stats], *, datasets=("calibration.txt",), chunk_count=8,
                       chunk_size=CHUNK_SIZE, skip_keys=()) -> Path:
    """IMatrixCollector::save_imatrix: general.type, imatrix.* keys, then per name (sorted)
    ``<name>.in_sum2`` [n_per_row, n_mat] and ``<name>.counts`` [1, n_mat], both F32."""
    w = GGUFWriter(str(path), "imatrix")
    w.kv_data[0].pop("general.architecture")  # imatrix.cpp writes no architecture
    w.add_string("general.type", "imatrix")
    if "imatrix.datasets" not in skip_keys:
        w.add_array("imatrix.datasets", list(datasets))
    if "imatrix.chunk_count" not in skip_keys:
        w.add_uint32("imatrix.chunk_count", chunk_count)
    if "imatrix.chunk_size" not in skip_keys:
        w.add_uint32("imatrix.chunk_size", chunk_size)
    for name in sorted(stats):
        s = stats[name]
        w.add_tensor(f"{name}.in_sum2", s.sums)  # numpy (n_mat, n_per_row) = ggml [n_per_row, n_mat]
        w.add_tensor(f"{name}.counts", s.counts.astype(np.float32).reshape(-1, 1))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


def legacy_values(s: Stats, chunk_size=CHUNK_SIZE) -> tuple[int, np.ndarray]:
    """IMatrixCollector::save_imatrix_legacy: ncall = ceil(max count / chunk size) and
    (sum / count) * ncall per value, with 1 for rows whose count is 0."""
    ncall = int((s.counts.max() + chunk_size - 1) // chunk_size)
    count = np.repeat(s.counts.astype(np.float32), s.sums.shape[1])
    value = s.sums.reshape(-1).copy()
    zero = count == 0
    value[zero], count[zero] = 1, 1
    return ncall, ((value / count) * np.float32(ncall)).astype(np.float32)


def write_legacy_imatrix(path, stats: dict[str, Stats], *, last_call=8, dataset="calibration.txt",
                         trailer=True) -> Path:
    """int32 n_entries; per entry int32 len, name, int32 ncall, int32 nval, float32[nval];
    then int32 last_call, int32 len, dataset name."""
    out = [struct.pack("<i", len(stats))]
    for name in sorted(stats):
        ncall, values = legacy_values(stats[name])
        raw = name.encode()
        out += [struct.pack("<i", len(raw)), raw, struct.pack("<ii", ncall, values.size), values.tobytes()]
    if trailer:
        out += [struct.pack("<i", last_call), struct.pack("<i", len(dataset.encode())), dataset.encode()]
    Path(path).write_bytes(b"".join(out))
    return Path(path)


def expected_gguf(s: Stats) -> np.ndarray:
    """quantize.cpp load_imatrix for a GGUF entry, written as plainly as possible."""
    n_mat, ne0 = s.sums.shape
    e = np.empty(n_mat * ne0, np.float32)
    for j in range(n_mat):
        count = np.float32(s.counts[j])
        for i in range(ne0):
            e[j * ne0 + i] = s.sums[j, i] / count if count > 0 else np.float32(1)
    return e


def expected_legacy(s: Stats) -> np.ndarray:
    ncall, values = legacy_values(s)
    return (values / np.float32(ncall)).astype(np.float32) if ncall > 0 else values


def model_stats(model: Path, *, seed=0, n_tokens=CHUNK_SIZE * 8, zero_rows=()) -> dict[str, Stats]:
    """Plausible statistics for every matrix llama-imatrix sees (2-D+ weights but token_embd,
    which is a row lookup): heavy-tailed column energies, one count per expert."""
    rng = np.random.default_rng(seed)
    out = {}
    with GGUFSource(model) as src:
        for t in src.tensors:
            if len(t.shape) < 2 or t.name == "token_embd.weight" or "ffn_gate_inp" in t.name:
                continue
            n_mat = t.shape[2] if len(t.shape) > 2 else 1
            energy = (rng.pareto(2.0, (n_mat, t.shape[0])) + 0.05) * n_tokens
            counts = np.full(n_mat, n_tokens, np.int64)
            if t.name in zero_rows:
                counts[zero_rows[t.name]] = 0
                energy[zero_rows[t.name]] = 0
            out[t.name] = Stats(energy, counts)
    return out


def assert_same_tensors(ours: Path, theirs: Path, what: str) -> None:
    a, b = GGUFSource(ours), GGUFSource(theirs)
    # the same tensors in the same order: llama-quantize writes them in llama_model_loader's order
    # (layer, then name), whatever the source's order was
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors], f"{what}: tensor order"
    for ta in a.tensors:
        tb = b.info(ta.name)
        assert (ta.type, ta.shape) == (tb.type, tb.shape), f"{what}: {ta.name}"
        if not np.array_equal(a.raw(ta.name), b.raw(ta.name)):
            differ = int((a.raw(ta.name) != b.raw(ta.name)).sum())
            raise AssertionError(f"{what}: tensor {ta.name} ({ta.type.name}) differs in {differ} of {ta.n_bytes} bytes")


# -- fixtures -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("imatrix-tiny")
    return write_tiny_llama(folder / "tiny.gguf", n_embd=256, n_ff=512, n_head=4, n_head_kv=2, n_vocab=256)


@pytest.fixture(scope="module")
def tiny_files(tiny, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("imatrix-files")
    stats = model_stats(tiny)
    return {"gguf": write_gguf_imatrix(folder / "tiny.imatrix.gguf", stats),
            "legacy": write_legacy_imatrix(folder / "tiny.imatrix.dat", stats)}


# -- (i) the values llama-quantize computes ---------------------------------------------------------------

def test_gguf_values_are_sums_over_counts_per_expert(tmp_path):
    stats = {
        "blk.0.ffn_up.weight": Stats(np.arange(1, 33, dtype=np.float32) * 3.7, [7]),
        # 3 experts; the second never routed (count 0 -> all ones)
        "blk.0.ffn_up_exps.weight": Stats(np.linspace(0.5, 90, 3 * 32), [1000, 0, 3]),
    }
    path = write_gguf_imatrix(tmp_path / "a.gguf", stats, datasets=("wiki.train.raw", "code.txt"),
                              chunk_count=12, chunk_size=256)
    im = load_imatrix(path)
    assert im.format == "gguf" and im.path == path
    assert im.datasets == ["wiki.train.raw", "code.txt"]
    assert (im.chunk_count, im.chunk_size) == (12, 256)
    assert sorted(im.entries) == sorted(stats)
    for name, s in stats.items():
        got = im.entries[name]
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, expected_gguf(s))
    assert (im.entries["blk.0.ffn_up_exps.weight"][32:64] == 1).all()
    np.testing.assert_array_equal(im.for_tensor("blk.0.ffn_up_exps.weight", 32, 3), expected_gguf(stats["blk.0.ffn_up_exps.weight"]))
    assert im.for_tensor("blk.9.attn_q.weight", 32) is None


def test_gguf_counts_are_rounded_like_lround(tmp_path):
    """common_imatrix_load reads counts with std::lround (halves away from zero); quantize.cpp then
    treats any count that is not > 0 (0, negative, NaN or Inf -> LONG_MIN) as 'no data' -> 1."""
    counts = np.array([2.5, 0.4, -1.0, np.nan, np.inf, 3.0, 0.5, 1e30], np.float32)
    sums = np.full((counts.size, 32), 6.0, np.float32)
    w = GGUFWriter(str(tmp_path / "r.gguf"), "imatrix")
    w.kv_data[0].pop("general.architecture")
    w.add_array("imatrix.datasets", ["d"])
    w.add_uint32("imatrix.chunk_count", 1)
    w.add_uint32("imatrix.chunk_size", 512)
    w.add_tensor("x.in_sum2", sums)
    w.add_tensor("x.counts", counts.reshape(-1, 1))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    got = load_imatrix(tmp_path / "r.gguf").entries["x"].reshape(counts.size, 32)[:, 0]
    np.testing.assert_array_equal(got, np.float32([6 / 3, 1, 1, 1, 1, 2, 6, 1]))


def test_legacy_values_are_divided_by_ncall(tmp_path):
    stats = {"blk.0.attn_q.weight": Stats(np.linspace(1, 500, 64), [4000]),
             "blk.0.ffn_gate_exps.weight": Stats(np.linspace(1, 9, 2 * 32), [300, 0])}
    im = load_imatrix(write_legacy_imatrix(tmp_path / "a.dat", stats, last_call=9, dataset="data/wiki.txt"))
    assert im.format == "legacy"
    assert (im.datasets, im.chunk_count, im.chunk_size) == (["data/wiki.txt"], 9, 0)
    for name, s in stats.items():
        np.testing.assert_array_equal(im.entries[name], expected_legacy(s))
    # ncall <= 0: the stored values as they are
    raw = np.float32([0.25, 4.0, 9.5, 1.0] * 8)
    body = struct.pack("<i", 1) + struct.pack("<i", 1) + b"w" + struct.pack("<ii", 0, raw.size) + raw.tobytes()
    (tmp_path / "b.dat").write_bytes(body)  # no trailer: it is optional
    im = load_imatrix(tmp_path / "b.dat")
    np.testing.assert_array_equal(im.entries["w"], raw)
    assert (im.datasets, im.chunk_count) == ([], 0)


def test_both_formats_agree(tiny_files):
    g, d = load_imatrix(tiny_files["gguf"]), load_imatrix(tiny_files["legacy"])
    assert sorted(g.entries) == sorted(d.entries) and len(g.entries) == 15  # 7 per layer + output
    for name in g.entries:
        np.testing.assert_allclose(g.entries[name], d.entries[name], rtol=1e-6)
    assert g.provenance("x.gguf") == {
        "quantize.imatrix.file": ("x.gguf", GGUFValueType.STRING),
        "quantize.imatrix.dataset": ("calibration.txt", GGUFValueType.STRING),
        "quantize.imatrix.entries_count": (15, GGUFValueType.UINT32),
        "quantize.imatrix.chunks_count": (8, GGUFValueType.UINT32),
    }
    assert d.provenance()["quantize.imatrix.file"] == (str(tiny_files["legacy"]), GGUFValueType.STRING)
    # llama-quantize copies at most 127 bytes of each string (char val_str[128])
    assert len(g.provenance("a" * 300)["quantize.imatrix.file"][0]) == 127


# -- (ii) end to end against llama_model_quantize -----------------------------------------------------------

@pytest.mark.parametrize("kind", ["gguf", "legacy"])
@pytest.mark.parametrize("name", list(FTYPES))
def test_tiny_model_matches_llama_quantize_with_imatrix(tiny, tiny_files, tmp_path, name, kind):
    ftype = FTYPES[name]
    im = load_imatrix(tiny_files[kind])
    ours, theirs, plain = tmp_path / "ours.gguf", tmp_path / "theirs.gguf", tmp_path / "plain.gguf"
    result = quantize_model(tiny, ours, ftype, importance=im.entries, metadata=im.provenance())
    reference.model_quantize(tiny, theirs, ftype, imatrix=im.entries)
    assert_same_tensors(ours, theirs, f"{name} with {kind} imatrix")
    # the weights were used: every converted matrix but token_embd, and the bytes changed
    quantized = {p.name for p in result.plans if p.converts and len(p.shape) == 2 and p.name != "token_embd.weight"}
    assert set(result.importance_tensors) == quantized
    quantize_model(tiny, plain, ftype)
    a, b = GGUFSource(ours), GGUFSource(plain)
    for tensor in result.importance_tensors:
        assert not np.array_equal(a.raw(tensor), b.raw(tensor)), f"{tensor}: importance changed nothing"
    assert a.get("quantize.imatrix.file") == str(tiny_files[kind])
    assert a.fields["quantize.imatrix.entries_count"].type == GGUFValueType.UINT32
    assert a.get("quantize.imatrix.entries_count") == 15 and a.get("quantize.imatrix.chunks_count") == 8
    assert a.get("quantize.imatrix.dataset") == "calibration.txt"
    assert "quantize.imatrix.file" not in b.fields and "quantize.imatrix.entries_count" not in b.fields


def test_embedded_model_matches_llama_quantize_with_imatrix(tmp_path):
    """SmolLM2 (Q4_1, requantized from its F32 rendering by both sides) with a GGUF imatrix that,
    like real ones, has no token_embd entry; a stray wrong-sized token_embd entry is ignored by
    both (llama.cpp's exception for embeddings)."""
    src = default_model_path()
    stats = model_stats(src, seed=3)
    path = write_gguf_imatrix(tmp_path / "smol.imatrix.gguf", stats)
    im = load_imatrix(path)
    assert len(im.entries) == 30 * 7
    entries = {**im.entries, "token_embd.weight": np.ones(100, np.float32)}
    ours, theirs = tmp_path / "ours.gguf", tmp_path / "theirs.gguf"
    result = quantize_model(src, ours, F.MOSTLY_Q4_0, importance=entries, threads=2)
    reference.model_quantize(src, theirs, F.MOSTLY_Q4_0, imatrix=entries, allow_requantize=True, threads=2)
    assert_same_tensors(ours, theirs, "SmolLM2 Q4_0 with imatrix")
    # with an imatrix the first n_layer/8 ffn_down stay Q4_1 (llama.cpp's guard), here copied as stored
    kept = sorted(p.name for p in result.plans if len(p.shape) == 2 and not p.converts)
    assert kept == ["blk.0.ffn_down.weight", "blk.1.ffn_down.weight", "blk.2.ffn_down.weight", "token_embd.weight"]
    assert len(result.importance_tensors) == 30 * 7 - 3


def _moe_llama(path: Path, n_expert=4, n_embd=256, n_ff=256, n_layer=2, n_vocab=256) -> Path:
    """A tiny llama with expert FFNs (3-D tensors ne = [n_per_row, rows, n_expert])."""
    rng = np.random.default_rng(5)

    def w(*shape):
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    g = GGUFWriter(str(path), "llama")
    for add, v in [(g.add_block_count, n_layer), (g.add_context_length, 256), (g.add_embedding_length, n_embd),
                   (g.add_feed_forward_length, n_ff), (g.add_head_count, 4), (g.add_head_count_kv, 4),
                   (g.add_rope_dimension_count, n_embd // 4), (g.add_layer_norm_rms_eps, 1e-5),
                   (g.add_vocab_size, n_vocab), (g.add_expert_count, n_expert), (g.add_expert_used_count, 2),
                   (g.add_file_type, 0)]:
        add(v)
    g.add_tokenizer_model("none")
    g.add_tensor("token_embd.weight", w(n_vocab, n_embd))
    for i in range(n_layer):
        g.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(n_embd, np.float32))
        for t in ("attn_q", "attn_k", "attn_v", "attn_output"):
            g.add_tensor(f"blk.{i}.{t}.weight", w(n_embd, n_embd))
        g.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(n_embd, np.float32))
        g.add_tensor(f"blk.{i}.ffn_gate_inp.weight", w(n_expert, n_embd))
        g.add_tensor(f"blk.{i}.ffn_gate_exps.weight", w(n_expert, n_ff, n_embd))
        g.add_tensor(f"blk.{i}.ffn_up_exps.weight", w(n_expert, n_ff, n_embd))
        g.add_tensor(f"blk.{i}.ffn_down_exps.weight", w(n_expert, n_embd, n_ff))
    g.add_tensor("output_norm.weight", np.ones(n_embd, np.float32))
    g.add_tensor("output.weight", w(n_vocab, n_embd))
    g.write_header_to_file(), g.write_kv_data_to_file(), g.write_tensors_to_file(), g.close()
    return path


@pytest.mark.parametrize("kind", ["gguf", "legacy"])
def test_expert_tensors_take_one_slice_per_expert(tmp_path, kind):
    """3-D expert weights: the entry holds n_per_row values per expert and llama.cpp quantizes the
    rows of expert e with slice e (an expert with count 0 gets ones)."""
    src = _moe_llama(tmp_path / "moe.gguf")
    stats = model_stats(src, seed=7, zero_rows={"blk.1.ffn_down_exps.weight": 2})
    write = write_gguf_imatrix if kind == "gguf" else write_legacy_imatrix
    im = load_imatrix(write(tmp_path / f"moe-imatrix.{kind}", stats))
    assert im.entries["blk.0.ffn_up_exps.weight"].size == 4 * 256
    assert (im.entries["blk.1.ffn_down_exps.weight"][2 * 256:3 * 256] == 1).all()
    ours, theirs = tmp_path / "ours.gguf", tmp_path / "theirs.gguf"
    result = quantize_model(src, ours, F.MOSTLY_Q4_0, importance=im.entries)
    reference.model_quantize(src, theirs, F.MOSTLY_Q4_0, imatrix=im.entries)
    assert_same_tensors(ours, theirs, f"MoE Q4_0 with {kind} imatrix")
    assert "blk.0.ffn_gate_exps.weight" in result.importance_tensors


# -- (iii) bad files and mismatches --------------------------------------------------------------------------

def _legacy_head(n_entries, name=b"w", ncall=1, nval=32):
    return struct.pack("<ii", n_entries, len(name)) + name + struct.pack("<ii", ncall, nval)


@pytest.mark.parametrize("content, needle", [
    (b"", "not an imatrix: only 0 bytes"),
    (b"hello, world\n" * 20, "not an imatrix"),
    (struct.pack("<i", 0), "claims 0 entries"),
    (struct.pack("<i", 2**31 - 1) + bytes(64), "claims 2147483647 entries"),
    (struct.pack("<ii", 1, -5) + bytes(64), "name of -5 bytes"),
    (struct.pack("<ii", 1, 2**30) + bytes(64), "name of 1073741824 bytes"),
    (_legacy_head(1, nval=2**31 - 1) + bytes(64), "claims 2147483647 values"),
    (_legacy_head(1, nval=0) + bytes(64), "claims 0 values"),
    (_legacy_head(1, nval=32) + bytes(100), "truncated legacy imatrix: entry 'w' claims 32 values"),
    (_legacy_head(1, nval=1) + bytes(4) + b"\x01\x00", "truncated"),  # half a trailer
    (_legacy_head(1, nval=1) + struct.pack("<f", float("nan")), "non-finite"),
])
def test_bad_legacy_files(tmp_path, content, needle):
    path = tmp_path / "bad.dat"
    path.write_bytes(content)
    with pytest.raises(ModelFileError, match="bad.dat") as e:
        load_imatrix(path)
    assert needle in str(e.value)


def test_bad_gguf_files(tiny, tmp_path):
    with pytest.raises(ModelFileError, match="not an imatrix: GGUF without the metadata.*general.architecture is 'llama'"):
        load_imatrix(tiny)  # a model, not an imatrix
    s = {"w": Stats(np.ones(32), [4])}
    with pytest.raises(ModelFileError, match="without the metadata imatrix.chunk_size"):
        load_imatrix(write_gguf_imatrix(tmp_path / "nometa.gguf", s, skip_keys=("imatrix.chunk_size",)))
    good = write_gguf_imatrix(tmp_path / "good.gguf", s)
    raw = good.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(raw[:-40])
    with pytest.raises(ModelFileError, match="cut.gguf: truncated"):
        load_imatrix(tmp_path / "cut.gguf")
    # an in_sum2 without its counts, an F16 tensor, a non-uint32 chunk count, non-finite sums
    for fname, build, needle in [
        ("lonely.gguf", lambda w: w.add_tensor("w.in_sum2", np.ones((1, 32), np.float32)), "not its partner"),
        ("f16.gguf", lambda w: (w.add_tensor("w.in_sum2", np.ones((1, 32), np.float16)),
                                w.add_tensor("w.counts", np.ones((1, 1), np.float32))), "is F16, expected F32"),
        ("nan.gguf", lambda w: (w.add_tensor("w.in_sum2", np.full((1, 32), np.inf, np.float32)),
                                w.add_tensor("w.counts", np.ones((1, 1), np.float32))), "non-finite"),
        ("ragged.gguf", lambda w: (w.add_tensor("w.in_sum2", np.ones((1, 33), np.float32)),
                                   w.add_tensor("w.counts", np.ones((2, 1), np.float32))), "not a multiple"),
        ("none.gguf", lambda w: w.add_tensor("blk.0.attn_q.weight", np.ones((1, 32), np.float32)), "no '<tensor>.in_sum2'"),
    ]:
        w = GGUFWriter(str(tmp_path / fname), "imatrix")
        w.kv_data[0].pop("general.architecture")
        w.add_array("imatrix.datasets", ["d"])
        w.add_uint32("imatrix.chunk_count", 1)
        w.add_uint32("imatrix.chunk_size", 512)
        build(w)
        w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
        with pytest.raises(ModelFileError, match=fname) as e:
            load_imatrix(tmp_path / fname)
        assert needle in str(e.value), str(e.value)
    w = GGUFWriter(str(tmp_path / "i32.gguf"), "imatrix")
    w.add_array("imatrix.datasets", ["d"])
    w.add_int32("imatrix.chunk_count", 1)
    w.add_uint32("imatrix.chunk_size", 512)
    w.add_tensor("w.in_sum2", np.ones((1, 32), np.float32))
    w.add_tensor("w.counts", np.ones((1, 1), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(ModelFileError, match="imatrix.chunk_count is INT32, expected UINT32"):
        load_imatrix(tmp_path / "i32.gguf")
    with pytest.raises(ModelFileError, match="no such file"):
        load_imatrix(tmp_path / "missing.gguf")


def test_imatrix_for_another_model(tiny, tmp_path):
    """An entry whose length is not n_per_row x n_expert: an error naming the file, the tensor and
    both lengths (llama.cpp refuses too); token_embd is the exception and is quantized unweighted."""
    stats = {"blk.0.attn_q.weight": Stats(np.ones(576), [10]), "token_embd.weight": Stats(np.ones(576), [10])}
    path = write_gguf_imatrix(tmp_path / "other.gguf", stats)
    im = load_imatrix(path)
    with pytest.raises(TensorDataError, match=r"blk.0.attn_q.weight.*other.gguf has 576 values.*expected 256"):
        im.for_tensor("blk.0.attn_q.weight", 256)
    with pytest.raises(TensorDataError, match=r"expected 1024 \(256 columns x 4 experts"):
        im.for_tensor("blk.0.attn_q.weight", 256, 4)
    assert im.for_tensor("token_embd.weight", 256) is None
    dst = tmp_path / "out.gguf"
    with pytest.raises(TensorDataError, match="blk.0.attn_q.weight.*576 values"):
        quantize_model(tiny, dst, F.MOSTLY_Q4_0, importance=im.entries)
    with pytest.raises(TensorDataError, match="blk.0.attn_q.weight.*non-finite"):
        quantize_model(tiny, dst, F.MOSTLY_Q4_0, importance={"blk.0.attn_q.weight": np.full(256, np.nan, np.float32)})
    assert not dst.exists()
    with pytest.raises(RuntimeError, match="imatrix size 576 is different from tensor size 256"):
        reference.model_quantize(tiny, dst, F.MOSTLY_Q4_0, imatrix=im.entries)


def test_cli_quantize_with_imatrix(tiny, tiny_files, tmp_path):
    """``llmquant quantize --imatrix FILE``: same bytes as the library call, provenance recorded
    with the path as typed, the count of weighted tensors shown; a bad file is one error line."""
    env = {**os.environ, "COLUMNS": "200"}
    cli = [sys.executable, "-m", "llmquant", "quantize"]
    dst = tmp_path / "cli.gguf"
    proc = subprocess.run([*cli, str(tiny), str(dst), "-q", "Q4_0", "--imatrix", "tiny.imatrix.dat", "-t", "1"],
                          check=False, capture_output=True, text=True, cwd=tiny_files["legacy"].parent, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "importance matrix tiny.imatrix.dat (15 entries, 8 chunks): weighted 15 tensors" in proc.stdout
    im = load_imatrix(tiny_files["legacy"])
    lib = tmp_path / "lib.gguf"
    quantize_model(tiny, lib, F.MOSTLY_Q4_0, importance=im.entries)
    assert_same_tensors(dst, lib, "CLI vs library")
    out = GGUFSource(dst)
    assert out.get("quantize.imatrix.file") == "tiny.imatrix.dat"
    assert out.get("quantize.imatrix.chunks_count") == 8
    bad = tmp_path / "bad.dat"
    bad.write_bytes(b"not an imatrix at all" * 3)
    proc = subprocess.run([*cli, str(tiny), str(tmp_path / "x.gguf"), "--imatrix", str(bad)],
                          check=False, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith(f"error: {bad}: not an imatrix"), proc.stderr
    assert not (tmp_path / "x.gguf").exists()
