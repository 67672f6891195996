"""quantize --refine: calibrated values in ordinary ggml blocks.

References: libggml (through ctypes) decodes every block we pack and encodes the llama.cpp imatrix
baseline; llama.cpp's own ``llama_model_quantize`` plans the comparison file; llama-cpp-python loads
and runs the refined file.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from llmquant.calib import refine as R
from llmquant.calib.gptq import hessian_update
from llmquant.calibrate import codec as _codec
from llmquant.formats import get_format
from llmquant.runtime.reference import dequantize as ggml_dequantize
from llmquant.runtime.reference import quantize_chunk

BLOCK_TYPES = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.IQ4_NL]
K_TYPES = [T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]


def _layer(rows=48, cols=512, n=4096, seed=0):
    """W, and H = 2/n XᵀX of inputs with correlated columns and a few loud channels (as real
    attention/FFN inputs have)."""
    rng = np.random.default_rng(seed)
    W = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
    mix = rng.standard_normal((cols, cols)) * 0.3 + np.eye(cols)
    X = rng.standard_normal((n, cols)) @ mix * np.exp(rng.standard_normal(cols))
    H, _ = hessian_update(None, 0, X.astype(np.float32))
    return W, H


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_packed_blocks_decode_in_libggml_to_the_grid_values(qtype):
    rng = np.random.default_rng(int(qtype))
    grid = R.BlockGrid(qtype)
    rows, nb = 5, 7
    codes = rng.integers(grid.lo, grid.hi + 1, size=(rows, nb, 32)).astype(np.int32)
    d = R._f16(rng.uniform(-0.1, 0.1, (rows, nb)))
    m = R._f16(rng.uniform(-0.2, 0.0, (rows, nb))) if grid.kind == "asym" else None
    data = R.pack_blocks(qtype, codes, d, m)
    assert data.shape == (rows, get_format(qtype).row_size(nb * 32))
    want = np.stack([grid.values(codes[:, k], R.BlockParams(d[:, k], None if m is None else m[:, k]))
                     for k in range(nb)], axis=1).reshape(rows, -1)
    theirs = ggml_dequantize(qtype, data.reshape(-1), rows * nb * 32).reshape(rows, -1)
    np.testing.assert_array_equal(theirs, want)
    np.testing.assert_array_equal(get_format(qtype).dequantize(data, (rows, nb * 32)), want)


@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
def test_k_codes_replaced_in_place_decode_in_libggml_as_the_grid_says(qtype):
    rng = np.random.default_rng(int(qtype))
    W = (rng.standard_normal((6, 512)) * 0.05).astype(np.float32)
    encode, decode = _codec(qtype)
    top = R.K_CODES[qtype][0]
    grid = R.KGrid(qtype, encode, decode)
    for k in range(2):
        p = grid.fit(W[:, k * 256:(k + 1) * 256])
        codes = rng.integers(0, top + 1, size=(6, 256))
        data = R.pack_k_codes(qtype, p.data, codes)
        # scales and mins untouched: re-encoding the values gives back exactly these codes
        theirs = ggml_dequantize(qtype, data.reshape(-1), 6 * 256).reshape(6, 256)
        np.testing.assert_array_equal(decode(data, (6, 256)), theirs)
        np.testing.assert_allclose(theirs, p.v0 + p.step * codes, rtol=0, atol=1e-6 * np.abs(theirs).max())
        np.testing.assert_array_equal(grid.codes(theirs, p), np.where(p.step != 0, codes, 0))
        # the non-code bytes (d, dmin, sub-block scales) are the encoder's
        assert (data != p.data).any()


@pytest.mark.parametrize("qtype", BLOCK_TYPES + K_TYPES, ids=lambda t: t.name)
def test_refine_beats_llama_cpp_imatrix_on_the_layer_output(qtype):
    """On a small matrix with known inputs X, tr(ΔHΔᵀ) of the refined encoding is below that of
    libggml's own imatrix-weighted encoding (importance E[x²]) of the same matrix."""
    W, H = _layer(seed=int(qtype))
    encode, decode = _codec(qtype)
    imatrix = (np.diag(H) / 2).astype(np.float32)
    theirs = quantize_chunk(qtype, W, imatrix if get_format(qtype).uses_importance else None)
    e_llama = R.output_error(W - ggml_dequantize(qtype, theirs.reshape(-1), W.size).reshape(W.shape), H)
    r = R.refine_tensor(W, H, qtype, encode, decode, plain=theirs)
    got = ggml_dequantize(qtype, r.data.reshape(-1), W.size).reshape(W.shape)
    np.testing.assert_array_equal(got, r.values)
    e_refined = R.output_error(W - got, H)
    print(f"{qtype.name}: layer-output error llama.cpp imatrix {e_llama:.5g}, refined {e_refined:.5g} "
          f"({e_llama / e_refined:.2f}x lower); feedback ratio {r.feedback_ratio:.3f}")
    assert r.kept and r.data.shape == theirs.shape
    assert e_refined < 0.8 * e_llama
    # what quantize --refine runs: feedback on H shrunk toward its diagonal, still judged on the true H
    s = R.refine_tensor(W, R.shrink_hessian(H, R.DEFAULT_SHRINK), qtype, encode, decode, plain=theirs)
    e_shrunk = R.output_error(W - ggml_dequantize(qtype, s.data.reshape(-1), W.size).reshape(W.shape), H)
    print(f"{qtype.name}: with shrink {R.DEFAULT_SHRINK}: {e_shrunk:.5g} ({e_llama / e_shrunk:.2f}x lower)")
    assert e_shrunk < e_llama


def test_shrink_hessian_moves_only_the_off_diagonal():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((300, 8))
    H, _ = hessian_update(None, 0, X)
    np.testing.assert_array_equal(R.shrink_hessian(H, 0.0), H)
    np.testing.assert_array_equal(R.shrink_hessian(H, 1.0), np.diag(np.diag(H)))
    half = R.shrink_hessian(H, 0.5)
    np.testing.assert_allclose(half, (H + np.diag(np.diag(H))) / 2, rtol=1e-15)
    assert np.linalg.eigvalsh(half).min() > 0
    with pytest.raises(ValueError, match="shrink 1.5"):
        R.shrink_hessian(H, 1.5)


def test_refine_keeps_the_plain_encoding_when_it_is_better():
    """With H = I (no correlation, no importance) feedback has nothing to work with; whatever
    the refined result, the kept one is never worse than the plain encoding."""
    rng = np.random.default_rng(3)
    W = (rng.standard_normal((16, 256)) * 0.05).astype(np.float32)
    H = np.eye(256) * 2.0
    encode, decode = _codec(T.Q4_K)
    plain = encode(W, None)
    r = R.refine_tensor(W, H, T.Q4_K, encode, decode, plain=plain)
    assert r.error <= r.plain_error
    if not r.kept:
        np.testing.assert_array_equal(r.data, plain)


def test_feedback_ratio_is_one_without_correlation_and_small_with_it():
    assert R.feedback_ratio(np.diag(np.linspace(1, 3, 64)), damp=0.0) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    base = rng.standard_normal((2000, 4))
    X = base @ rng.standard_normal((4, 64)) + 0.05 * rng.standard_normal((2000, 64))  # rank ~4 + noise
    H, _ = hessian_update(None, 0, X)
    assert R.feedback_ratio(H) < 0.1


def test_hessians_share_one_matrix_for_one_input_and_refuse_a_changed_one():
    from types import SimpleNamespace

    rng = np.random.default_rng(0)
    stats = R.HessianStats()
    x = rng.standard_normal((1, 1, 32, 8)).astype(np.float32)
    for name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.attn_v.weight"):
        stats.add(SimpleNamespace(name=name, op="MUL_MAT", x=x, weight_ne=(8, 8, 1, 1)))
    y = rng.standard_normal((1, 1, 32, 8)).astype(np.float32)
    stats.add(SimpleNamespace(name="blk.0.attn_output.weight", op="MUL_MAT", x=y, weight_ne=(8, 8, 1, 1)))
    stats.flush()
    x2 = x + 1
    stats.add(SimpleNamespace(name="blk.0.attn_q.weight", op="MUL_MAT", x=x2, weight_ne=(8, 8, 1, 1)))
    with pytest.raises(Exception, match="attn_k.*no longer"):
        stats.add(SimpleNamespace(name="blk.0.attn_k.weight", op="MUL_MAT", x=x2 * 2, weight_ne=(8, 8, 1, 1)))
    assert set(stats.hessians) == {"blk.0.attn_q.weight", "blk.0.attn_output.weight"}
    # the running sums over two batches, scaled once: GPTQ's add_batch H over the same rows
    H, n = hessian_update(None, 0, x.reshape(-1, 8))
    H, n = hessian_update(H, n, x2.reshape(-1, 8))
    # (a float32 product per batch, summed in float64)
    np.testing.assert_allclose(stats.get("blk.0.attn_v.weight"), H, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(stats.get("blk.0.attn_output.weight"), hessian_update(None, 0, y.reshape(-1, 8))[0],
                               rtol=1e-6, atol=1e-6)
    assert stats.counts["blk.0.attn_q.weight"] == 64
    with pytest.raises(RuntimeError, match="final"):
        stats.add(SimpleNamespace(name="blk.0.attn_output.weight", op="MUL_MAT", x=y, weight_ne=(8, 8, 1, 1)))


@pytest.fixture(scope="module")
def tiny_vocab_model(tmp_path_factory):
    from tinymodel import write_tiny_llama_with_vocab

    return write_tiny_llama_with_vocab(tmp_path_factory.mktemp("refine") / "tiny-vocab.gguf")


@pytest.mark.parametrize("ftype", ["Q4_K_M", "Q4_0", "Q3_K_S"])
def test_refined_file_is_llama_cpp_layout_valid_ggml_and_runs(tiny_vocab_model, tmp_path, ftype):
    """The refined file has llama.cpp's tensor table for FTYPE (names, types, shapes, tensor bytes
    of llama_model_quantize with an imatrix), every tensor decodes identically in libggml and in
    our dequantizer, llama-cpp-python loads it and generates, and the refined tensors' layer
    outputs are closer to the source's than those of llama.cpp's imatrix file."""
    from llmquant.calibrate import collect_hessians, refine_model
    from llmquant.gguf.recipes import parse_ftype
    from llmquant.gguf.source import GGUFSource
    from llmquant.runtime.reference import model_quantize

    ours = tmp_path / f"refined-{ftype}.gguf"
    result = refine_model(tiny_vocab_model, ours, parse_ftype(ftype), chunks=4, n_ctx=256)
    assert result.refine["tensors_refined"] >= 10
    stats = collect_hessians(tiny_vocab_model, chunks=4, n_ctx=256)
    importance = {n: (np.diag(stats.get(n)) / 2).astype(np.float32) for n in [*stats.hessians, *stats.alias]}
    theirs = tmp_path / f"llama-{ftype}.gguf"
    model_quantize(tiny_vocab_model, theirs, parse_ftype(ftype), imatrix=importance)
    with GGUFSource(ours) as a, GGUFSource(theirs) as b, GGUFSource(tiny_vocab_model) as src:
        assert {t.name: (tuple(t.shape), t.type) for t in a.tensors} == {t.name: (tuple(t.shape), t.type) for t in b.tensors}
        assert a.tensor_bytes == b.tensor_bytes
        assert a.get("llmquant.refine", "").startswith("gptq")
        better = 0
        for t in a.tensors:
            raw = a.raw(t.name)
            n = int(np.prod(t.shape))
            mine = get_format(t.type).dequantize(raw, tuple(reversed(t.shape))).reshape(-1)
            np.testing.assert_array_equal(ggml_dequantize(t.type, raw.reshape(-1), n), mine, err_msg=t.name)
            H = stats.get(t.name)
            if H is not None and t.type != T.F32:
                W = src.read(t.name).reshape(-1, t.shape[0])
                mine = result.folded.unfold(t.name, mine.reshape(W.shape))  # back to the source's space
                e_ours = R.output_error(W - mine, H)
                e_theirs = R.output_error(W - b.read(t.name).reshape(W.shape), H)
                assert e_ours <= e_theirs * 1.0001, t.name
                better += e_ours < e_theirs
        assert better >= 10
    from llama_cpp import Llama

    llm = Llama(str(ours), n_ctx=128, verbose=False)
    out = llm("The capital of France is", max_tokens=8, temperature=0.0)
    assert out["usage"]["completion_tokens"] > 0


def test_ladder_refine_rows_beside_plain_and_imatrix(tiny_vocab_model, tmp_path):
    from llmquant.measure.ladder import run_ladder
    from llmquant.measure.report import columns, kld_gain, rows

    from llmquant.calib.stats import default_calibration_path
    from llmquant.calibrate import make_imatrix
    from llmquant.gguf.source import GGUFSource

    text = tmp_path / "calib.txt"
    text.write_text(default_calibration_path().read_text()[:24000])
    imat = make_imatrix(tiny_vocab_model, text, tmp_path / "imatrix.gguf", n_ctx=512).path
    kw = dict(rungs=("Q4_0",), out_dir=tmp_path / "ladder", speed=False, imatrix=imat, refine=True, calib=text,
              chunks=4, keep="all")
    res = run_ladder(tiny_vocab_model, **kw)
    by = {r.name: r for r in res.rungs}
    assert set(by) == {"Q4_0", "Q4_0+imat", "Q4_0+refine"}
    sizes = set()
    for r in res.rungs:
        with GGUFSource(r.path) as g:
            sizes.add(g.tensor_bytes)
    assert len(sizes) == 1
    assert "KLD gain" in columns(res)
    for name in ("Q4_0+imat", "Q4_0+refine"):
        gain = kld_gain(res, name)
        assert gain is not None
        assert gain == pytest.approx(1 - by[name].eval["kld_mean"] / by["Q4_0"].eval["kld_mean"])
    at = columns(res).index("KLD gain")
    assert [row[at] for row in rows(res)][0] == "-"
    # a second run reuses every measurement
    again = run_ladder(tiny_vocab_model, **kw)
    assert all(r.resumed for r in again.rungs)


def test_cli_refine_json_verbose_and_bad_options(tiny_vocab_model, tmp_path):
    """A real subprocess: --refine --json reports every refined tensor; --refine with --imatrix and
    --calib without --refine are refused in one line, nothing written."""
    import json
    import os
    import subprocess
    import sys

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "llmquant", *map(str, args)], capture_output=True, text=True,
                              timeout=600, env={**os.environ, "COLUMNS": "200"})

    text = tmp_path / "calib.txt"
    from llmquant.calib.stats import default_calibration_path

    text.write_text(default_calibration_path().read_text()[:12000])
    dst = tmp_path / "out.gguf"
    p = cli("quantize", tiny_vocab_model, dst, "Q4_K_M", "--refine", "--calib", text, "--json")
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert res["refine"]["tensors_refined"] + res["refine"]["tensors_kept_plain"] == len(res["refine"]["tensors"]) >= 14
    assert {t["method"] for t in res["refine"]["tensors"]} == {"gptq"}
    assert all(0 < t["feedback_ratio"] <= 1 for t in res["refine"]["tensors"])
    p = cli("quantize", tiny_vocab_model, tmp_path / "v.gguf", "Q4_0", "--refine", "--calib", text, "--verbose")
    assert p.returncode == 0, p.stderr
    assert "feedback ratio" in p.stdout and "blk.1.ffn_down.weight Q4_0" in p.stdout
    assert "scales folded into blk.1.attn_norm.weight: alpha" in p.stdout
    assert res["refine"]["folds"] and "folds=0" not in res["refine"]["settings"]
    p = cli("quantize", tiny_vocab_model, tmp_path / "n.gguf", "Q4_K_M", "--refine", "--calib", text, "--no-fold",
            "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["refine"]["folds"] == []
    for args, needle in (((tmp_path / "x.gguf", "Q4_0", "--refine", "--imatrix", "auto"), "--imatrix"),
                         ((tmp_path / "x.gguf", "Q4_0", "--calib", text), "--calib"),
                         ((tmp_path / "x.gguf", "Q4_0", "--no-fold"), "--no-fold")):
        p = cli("quantize", tiny_vocab_model, *args)
        assert p.returncode != 0 and "Traceback" not in p.stderr
        assert needle in p.stderr.strip().splitlines()[-1]
        assert not (tmp_path / "x.gguf").exists()


def test_refine_on_two_threads_writes_the_same_bytes_and_a_failure_leaves_nothing(tiny_vocab_model, tmp_path):
    """Tensors are refined two at a time on two threads: the file is byte for byte the one-thread
    file; a tensor that fails (NaN in the source) stops the run with its name and no output file."""
    import shutil

    from gguf import GGUFReader

    from llmquant.calibrate import collect_hessians, refine_model
    from llmquant.errors import TensorDataError
    from llmquant.gguf.recipes import parse_ftype

    stats = collect_hessians(tiny_vocab_model, chunks=4, n_ctx=256)
    one, two = tmp_path / "one.gguf", tmp_path / "two.gguf"
    refine_model(tiny_vocab_model, one, parse_ftype("Q4_K_M"), stats=stats, threads=1)
    refine_model(tiny_vocab_model, two, parse_ftype("Q4_K_M"), stats=stats, threads=2)
    assert one.read_bytes() == two.read_bytes()

    bad = tmp_path / "nan.gguf"
    shutil.copy(tiny_vocab_model, bad)
    offset = next(t.data_offset for t in GGUFReader(bad).tensors if t.name == "blk.1.ffn_up.weight")
    with open(bad, "r+b") as f:
        f.seek(offset + 4 * 5)
        f.write(np.float32("nan").tobytes())
    out = tmp_path / "out" / "nan-Q4_K_M.gguf"
    out.parent.mkdir()
    with pytest.raises(TensorDataError, match="blk.1.ffn_up.weight.*NaN"):
        refine_model(bad, out, parse_ftype("Q4_K_M"), stats=stats, threads=2)
    assert list(out.parent.iterdir()) == []


def test_fold_scale_picks_loud_channels_and_ties_v_rows_to_their_q_heads():
    """On inputs with loud channels the α search scales them up (s rises with rms(x)), the folded
    plain encoding's layer-output error is below the unfolded one's, and a v -> o scale is one
    value per v row repeated over the q heads that share the kv head."""
    from llmquant.calib.fold import expand, fold_scale

    W, H = _layer(rows=64, cols=256, seed=3)
    s, alpha, e0, e = fold_scale([(W, *_codec(T.Q4_0))], H, shrink=0.7)
    assert alpha > 0 and e < e0 * 0.95, (alpha, e0, e)
    rms = np.sqrt(np.diag(H) / 2)
    assert np.corrcoef(np.log(s), np.log(rms))[0, 1] > 0.99
    s, alpha, _, _ = fold_scale([(W, *_codec(T.Q5_0))], H, shrink=0.7, tie=(2, 2, 64))
    assert s.shape == (128,)
    cols = expand(s, (2, 2, 64))
    np.testing.assert_array_equal(cols.reshape(2, 2, 64)[:, 0], s.reshape(2, 64))
    np.testing.assert_array_equal(cols.reshape(2, 2, 64)[:, 1], s.reshape(2, 64))


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q5_1, T.IQ4_NL, T.Q8_0])
def test_block_grid_compiled_loop_is_the_generic_loop(qtype):
    """GPTQ on a ggml 32-block grid through its compiled column loop (``BlockGrid.feedback``)
    against gptq's generic numpy loop on the same grid: the same scales and values up to the
    summation order of the updates (a near-tie may flip a block), the same layer-output error."""
    from llmquant.calib.gptq import gptq, hessian_inverse_upper

    W, H = _layer(rows=96, cols=256, seed=5)
    W[:2, :32] = 0.0  # all-zero blocks: scale 0
    hinv = hessian_inverse_upper(H, 0.01)
    fast_grid = R.BlockGrid(qtype, R._weights(H, "ldl", R.QK, hinv[0]))
    slow_grid = R.BlockGrid(qtype, fast_grid.weights)
    slow_grid.feedback = None  # gptq falls back to its generic loop
    fast = gptq(W, H, fast_grid, R.QK, hinv_upper=hinv)
    slow = gptq(W, H, slow_grid, R.QK, hinv_upper=hinv)
    d_fast = np.stack([p.d for p in fast.params], axis=1)
    d_slow = np.stack([p.d for p in slow.params], axis=1)
    assert np.mean(d_fast == d_slow) > 0.99 and np.mean(fast.weight == slow.weight) > 0.99
    blocks = fast.weight.reshape(W.shape[0], -1, R.QK)
    for k, p in enumerate(fast.params):  # every value sits on its block's grid
        np.testing.assert_array_equal(fast_grid.values(fast_grid.codes(blocks[:, k], p), p), blocks[:, k])
    assert R.output_error(W - fast.weight, H) == pytest.approx(R.output_error(W - slow.weight, H), rel=1e-3)


def test_fold_scale_local_search_finds_the_grid_s_best_on_a_unimodal_curve():
    """The α search encodes only some grid points; where the error over the whole grid (each point
    encoded by ``fold_error``) falls then rises, it returns that grid's best point and its error,
    and the error at α = 0 as computed there."""
    from llmquant.calib.fold import ALPHAS, fold_error, fold_scale

    W, H = _layer(rows=64, cols=256, seed=3)
    weights = [(W, *_codec(T.Q4_0))]
    Hs = R.shrink_hessian(H, 0.7).astype(np.float32)
    for alphas in (ALPHAS, np.linspace(0, 1, 11)):
        curve = [fold_error(weights, H, a, Hs=Hs)[1] for a in alphas]
        best = int(np.argmin(curve))
        assert all(np.diff(curve[:best + 1]) < 0) and all(np.diff(curve[best:]) > 0), curve  # unimodal
        s, alpha, e0, e = fold_scale(weights, H, shrink=0.7, alphas=alphas)
        print(f"grid {len(alphas)} points: errors {np.round(curve, 2)}, chose alpha {alpha}")
        assert alpha == pytest.approx(alphas[best]) and e == curve[best] and e0 == curve[0]
        assert 0 < best
    with pytest.raises(ValueError, match="starting at 0"):
        fold_scale(weights, H, shrink=0.7, alphas=[0.2, 0.3])


def _logits(path, tokens):
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=128, logits_all=True, verbose=False, n_threads=2)
    llm.eval(tokens)
    out = np.array(llm.scores[: len(tokens)], np.float64)
    llm.close()
    return out


def test_folded_scales_leave_the_float_model_s_output_unchanged_in_llama_cpp(tiny_vocab_model, tmp_path):
    """The scales chosen for a Q4_0 refine, folded into an F32 copy of the model (norms divided,
    q/k/v, gate/up, down and, under grouped-query attention, o columns multiplied, up and v rows
    divided), give llama.cpp's logits of the source; folding the columns without the rows does not."""
    from gguf import GGMLQuantizationType as GT

    from llmquant.calibrate import collect_hessians, fold_scales
    from llmquant.gguf.recipes import RecipeOptions, parse_ftype
    from llmquant.gguf.source import GGUFSource
    from llmquant.gguf.writer import AtomicGGUFWriter

    stats = collect_hessians(tiny_vocab_model, chunks=4, n_ctx=256)
    folded = fold_scales(tiny_vocab_model, parse_ftype("Q4_0"), RecipeOptions(has_imatrix=True), stats, shrink=0.7)
    kinds = {r["prev"].split(".")[2] for r in folded.report if r["alpha"] > 0}
    assert {"attn_norm", "ffn_norm", "ffn_up", "attn_v"} <= kinds, folded.report

    def write(dst, rows_too: bool):
        with GGUFSource(tiny_vocab_model) as src:
            w = AtomicGGUFWriter(dst, src.arch, force=True, alignment=src.header.alignment)
            for f in src.fields.values():
                w.add_field(f)
            for t in src.tensors:
                w.add_tensor_info(t.name, t.shape, GT.F32)
            w.start()
            for t in src.tensors:
                v = np.asarray(src.read(t.name), np.float32)
                if rows_too:
                    v = folded.apply(t.name, v)
                elif t.name in folded.columns:
                    v = v * folded.columns[t.name][None, :]
                w.write_tensor(t.name, np.ascontiguousarray(v, np.float32).reshape(-1))
            w.commit()

    good, bad = tmp_path / "folded.gguf", tmp_path / "columns-only.gguf"
    write(good, True)
    write(bad, False)
    from llama_cpp import Llama

    tokens = Llama(str(tiny_vocab_model), vocab_only=True, verbose=False).tokenize(
        b"The quick brown fox jumps over the lazy dog, and then it runs far away into the woods.")
    base = _logits(tiny_vocab_model, tokens)
    scale = np.abs(base).max()
    assert np.abs(_logits(good, tokens) - base).max() < 1e-3 * scale
    assert np.abs(_logits(bad, tokens) - base).max() > 1e-2 * scale
