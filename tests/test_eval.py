"""llmquant.measure.eval: statistics against a plain numpy reference written from the definitions, the
chunking of llama-perplexity, lockstep evaluation of several models, and input validation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from gguf import LlamaFileType
from helpers import default_model_path
from tinymodel import write_tiny_llama

from llmquant.errors import EvalError, EvalTextError
from llmquant.measure.eval import (
    DEFAULT_TEXT,
    BaseProbs,
    Statistics,
    compare,
    evaluate,
    evaluate_many,
    load_text,
    token_nll,
    token_stats,
)

REL = 1e-6


# -- the reference: definitions, written plainly --------------------------------------------------

def ref_log_softmax(logits):
    z = np.asarray(logits, dtype=np.float64)
    out = np.empty_like(z)
    for r in range(z.shape[0]):
        m = z[r].max()
        out[r] = z[r] - m - math.log(np.exp(z[r] - m).sum())
    return out


def ref_statistics(base_chunks, model_chunks, target_chunks):
    """PPL, KLD, same top, RMS Δp over several chunks, straight from the definitions."""
    nll, nll_base, kld, same, dp = [], [], [], [], []
    for base, model, targets in zip(base_chunks, model_chunks, target_chunks):
        lp, lq = ref_log_softmax(base), ref_log_softmax(model)
        for r, t in enumerate(targets):
            p = np.exp(lp[r])
            kld.append(float(np.sum(p * (lp[r] - lq[r]))))
            nll.append(-lq[r, t])
            nll_base.append(-lp[r, t])
            same.append(int(np.argmax(base[r]) == np.argmax(model[r])))
            dp.append(math.exp(lq[r, t]) - math.exp(lp[r, t]))
    nll, nll_base, kld, dp = map(np.array, (nll, nll_base, kld, dp))
    n = len(nll)
    return {
        "ppl": math.exp(nll.mean()),
        "ppl_err": math.exp(nll.mean()) * nll.std() / math.sqrt(n - 1),
        "base_ppl": math.exp(nll_base.mean()),
        "kld_mean": kld.mean(),
        "kld_err": kld.std() / math.sqrt(n - 1),
        "kld_values": kld,
        "dp_values": dp,
        "top1": 100 * np.mean(same),
        "rms_dp": 100 * math.sqrt(np.mean(dp ** 2)),
        "n": n,
    }


def llama_percentile(sorted_values, fraction):
    """perplexity.cpp's ``percentile`` lambda."""
    if fraction <= 0:
        return sorted_values[0]
    if fraction >= 1:
        return sorted_values[-1]
    p = fraction * (len(sorted_values) - 1)
    ip = int(p)
    p -= ip
    return (1 - p) * sorted_values[ip] + p * sorted_values[min(ip + 1, len(sorted_values) - 1)]


def close(a, b, rel=REL):
    return abs(a - b) <= rel * max(abs(b), 1e-300)


def random_pair(seed, n=48, n_vocab=3000, noise=0.2):
    rng = np.random.default_rng(seed)
    base = (rng.standard_normal((n, n_vocab)) * 4).astype(np.float32)
    model = (base + noise * rng.standard_normal((n, n_vocab))).astype(np.float32)
    targets = rng.integers(0, n_vocab, n)
    return base, model, targets


# -- statistics on synthetic logits (fast) --------------------------------------------------------

def test_statistics_equal_numpy_reference_over_chunks():
    chunks = [random_pair(seed) for seed in range(3)]
    stats = Statistics()
    for base, model, targets in chunks:
        stats.add(token_stats(base, model, targets, threads=2))
    got = stats.summary()
    ref = ref_statistics(*zip(*chunks))
    assert stats.count == ref["n"] == 3 * 48
    for key in ("ppl", "ppl_err", "base_ppl", "kld_mean", "kld_err", "top1", "rms_dp"):
        assert close(got[key], ref[key]), (key, got[key], ref[key])
    assert close(got["ppl_ratio"], ref["ppl"] / ref["base_ppl"])
    assert close(got["delta_ppl"], ref["ppl"] - ref["base_ppl"])
    # percentiles as llama-perplexity takes them (over float32 values, as it stores them)
    kld = np.sort(ref["kld_values"].astype(np.float32).astype(np.float64))
    assert close(got["kld_max"], kld[-1], 1e-6) and close(got["kld_min"], kld[0], 1e-6)
    for key, frac in (("kld_p99", 0.99), ("kld_p90", 0.90), ("kld_p01", 0.01)):
        assert close(got[key], llama_percentile(kld, frac), 1e-6), key
    n = len(kld)
    assert close(got["kld_median"], 0.5 * (kld[n // 2] + kld[n // 2 - 1]), 1e-6)


def test_ppl_only_equals_reference():
    base, model, targets = random_pair(7)
    stats = Statistics()
    stats.add_nll(token_nll(model, targets))
    got = stats.summary()
    ref = ref_statistics([base], [model], [targets])
    assert set(got) == {"ppl", "ppl_err"}
    assert close(got["ppl"], ref["ppl"]) and close(got["ppl_err"], ref["ppl_err"])


def test_base_probs_are_shared_between_models():
    base, model, targets = random_pair(3)
    probs = BaseProbs.from_logits(base, targets)
    a = compare(probs, model, targets)
    b = compare(probs, base, targets)  # the base against itself, from the same BaseProbs
    ref = ref_statistics([base], [model], [targets])
    assert close(a.kld.mean(), ref["kld_mean"])
    assert np.abs(b.kld).max() < 1e-12 and b.same_top.all()
    # the model's NLL is computed in the same operations as the base's: bit-identical, so Δp is exactly 0
    assert np.array_equal(b.nll, b.nll_base) and not np.any(b.p_diff)


def test_self_comparison_is_zero():
    base, _, targets = random_pair(4)
    s = Statistics()
    s.add(token_stats(base, base, targets))
    got = s.summary()
    # KLD = Σp log p − Σp (z − m) + lse Σp sums three different float64 expressions, so it is zero
    # only up to rounding: pairwise sums of n_vocab terms err by about log2(n_vocab) · ε · Σ|p log p|,
    # ~1e-14 here; 1e-12 leaves room. Same top, NLL and Δp come from identical operations: exact.
    assert abs(got["kld_mean"]) < 1e-12 and got["top1"] == 100.0
    assert got["delta_ppl"] == 0.0 and got["ppl_ratio"] == 1.0 and got["rms_dp"] == 0.0


def test_self_comparison_is_exact_whatever_the_blocking():
    """Row blocks and threads change nothing: every statistic of a row is computed from that row alone."""
    base, _, targets = random_pair(5)
    one = token_stats(base, base, targets, threads=1)
    many = token_stats(base, base, targets, threads=3)
    for field in ("nll", "nll_base", "kld", "same_top", "p_diff"):
        assert np.array_equal(getattr(one, field), getattr(many, field)), field
    assert np.array_equal(one.nll, one.nll_base)


def ref_llama_stored(logits):
    """llama-perplexity's uint16 storage of log-probabilities, from the C code, row by row."""
    out = []
    for row in np.asarray(logits, np.float32):
        mx = np.float32(row.max())
        mn = np.float32(max(row.min(), mx - np.float32(16)))
        lse = np.float32(math.log(float(np.sum(np.exp((row - mx).astype(np.float32)), dtype=np.float64))))
        min_log_prob = np.float32(np.float32(mn - mx) - lse)
        scale = np.float32(np.float32(mx - mn) / np.float32(65535))
        q = np.where(row > mn, np.rint(np.float32(1 / scale) * (row - mn)), 0).astype(np.uint16)
        out.append(scale * q.astype(np.float32) + min_log_prob)
    return np.array(out, dtype=np.float32)


def test_llama_compat_follows_the_tools_storage():
    base, model, targets = random_pair(5, noise=0.05)
    got = token_stats(base, model, targets, llama_compat=True)
    stored = ref_llama_stored(base).astype(np.float64)
    lq = ref_log_softmax(model)
    kld = [np.sum(np.where(stored[r] > -16, np.exp(stored[r]) * (stored[r] - lq[r]), 0.0)) for r in range(len(targets))]
    assert np.allclose(got.kld, kld, rtol=1e-6, atol=1e-12)
    assert np.allclose(got.nll_base, -stored[np.arange(len(targets)), targets], rtol=1e-6)
    assert np.array_equal(got.same_top, np.argmax(stored, axis=1) == np.argmax(model, axis=1))
    exact = token_stats(base, model, targets)
    assert abs(got.kld.mean() / exact.kld.mean() - 1) < 0.01  # the storage costs little


def test_uncertainty_is_zero_for_ten_values_or_fewer():
    base, model, targets = random_pair(6, n=10)
    s = Statistics()
    s.add(token_stats(base, model, targets))
    got = s.summary()
    assert got["kld_err"] == 0.0 and got["ppl_err"] == 0.0  # mean_and_uncertainty's count > 10 rule


def test_mismatched_shapes_are_refused():
    base, model, targets = random_pair(1)
    with pytest.raises(ValueError):
        token_stats(base, model[:, :-1], targets)
    with pytest.raises(ValueError):
        token_nll(model, targets[:-1])
    with pytest.raises(ValueError):
        token_nll(model, targets + model.shape[1])


# -- text and argument validation -------------------------------------------------------------------

def test_default_text_ships_with_attribution():
    text, name = load_text(None)
    assert "Python Software Foundation" in text.splitlines()[0]
    assert (DEFAULT_TEXT.parent / "NOTICE").is_file()
    assert len(text.split()) > 4000 and "built-in" in name


def test_folder_text_concatenates_sorted_text_files(tmp_path):
    (tmp_path / "b.md").write_text("second\n")
    (tmp_path / "a.txt").write_text("first\n")
    (tmp_path / "c.bin").write_bytes(b"\0\1")
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "d.txt").write_text("third\n")
    text, _ = load_text(tmp_path)
    assert text == "first\n\n\nsecond\n\n\nthird"


@pytest.mark.parametrize("kind", ["missing", "empty", "blank", "binary", "latin1", "empty-folder"])
def test_bad_text_is_a_clear_error(tmp_path, kind):
    path = tmp_path / "text.txt"
    if kind == "empty":
        path.write_text("")
    elif kind == "blank":
        path.write_text("  \n\n")
    elif kind == "binary":
        path.write_bytes(b"GGUF\0\0\0\3" + bytes(range(256)))
    elif kind == "latin1":
        path.write_bytes("caf\xe9 au lait".encode("latin-1"))
    elif kind == "empty-folder":
        path = tmp_path / "folder"
        path.mkdir()
        (path / "x.bin").write_bytes(b"1")
    with pytest.raises(EvalTextError) as exc:
        evaluate(default_model_path(), text=path)
    assert str(path) in str(exc.value)
    words = {"missing": "no such", "empty": "empty", "blank": "empty", "binary": "binary", "latin1": "UTF-8",
             "empty-folder": "no .txt"}
    assert words[kind] in str(exc.value)


@pytest.mark.parametrize("ctx", [15, 8, 0, 101, -2])
def test_bad_ctx_is_a_clear_error(ctx):
    with pytest.raises(EvalError, match=f"even number of tokens >= 16, got {ctx}"):
        evaluate(default_model_path(), ctx=ctx)


def test_ctx_beyond_training_is_refused(tmp_path):
    tiny = write_tiny_llama(tmp_path / "tiny.gguf")  # trained context 256
    with pytest.raises(EvalError, match="ctx 512 exceeds the 256 tokens tiny.gguf was trained on"):
        evaluate(tiny, ctx=512)


def test_missing_model_is_a_clear_error(tmp_path):
    from llmquant.errors import ModelFileError

    with pytest.raises(ModelFileError, match="no such file"):
        evaluate(tmp_path / "nope.gguf")


def test_different_vocabularies_are_refused(tmp_path):
    tiny = write_tiny_llama(tmp_path / "tiny.gguf")
    with pytest.raises(EvalError, match=r"different vocabularies \(49152 vs 128 tokens\)"):
        evaluate(default_model_path(), base=tiny, ctx=128)


def test_short_text_names_the_minimum(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("A few words are not enough to fill a context window. " * 10)
    with pytest.raises(EvalError, match=r"tokens; a context of 512 needs at least 1024"):
        evaluate(default_model_path(), text=path)
    with pytest.raises(EvalError, match="chunks must be >= 1"):
        evaluate(default_model_path(), text=path, ctx=16, chunks=0)


def test_default_text_gives_at_least_8_chunks_of_512():
    from llmquant.runtime.llama import Model

    text, _ = load_text(None)
    with Model(default_model_path(), n_ctx=64, threads=1) as m:
        n = len(m.tokenize(text))
    assert n // 512 >= 8, n


# -- real models ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    from llmquant.quantize import quantize_model

    folder = tmp_path_factory.mktemp("eval-models")
    out = {}
    for name, ftype in (("F32", LlamaFileType.ALL_F32), ("Q8_0", LlamaFileType.MOSTLY_Q8_0),
                        ("Q4_0", LlamaFileType.MOSTLY_Q4_0)):
        out[name] = folder / f"{name}.gguf"
        quantize_model(default_model_path(), out[name], ftype, threads=2)
    return out


@pytest.mark.slow
def test_chunk_logits_equal_full_logits(files):
    from llmquant.runtime.llama import Model

    text, _ = load_text(None)
    with Model(files["Q8_0"], n_ctx=64, n_batch=64, threads=2, logits_all=True) as m:
        tokens = m.tokenize(text)[:64]
        full = m.logits(tokens)
        part = m.chunk_logits(tokens, 32)
    assert part.shape == (32, 49152)
    assert np.allclose(part, full[32:], rtol=0, atol=1e-4)


@pytest.mark.slow
def test_evaluation_equals_reference_on_real_logits(files):
    """llama-perplexity's chunking done by hand with full logits, then the reference statistics."""
    from llmquant.runtime.llama import Model

    ctx, n_chunks, first = 64, 3, 32
    res = evaluate(files["Q4_0"], base=files["F32"], ctx=ctx, chunks=n_chunks, threads=2)
    text, _ = load_text(None)
    base_chunks, model_chunks, target_chunks = [], [], []
    with Model(files["F32"], n_ctx=ctx, n_batch=ctx, threads=2, logits_all=True, flash_attn=True) as b, \
            Model(files["Q4_0"], n_ctx=ctx, n_batch=ctx, threads=2, logits_all=True, flash_attn=True) as q:
        tokens = q.tokenize(text)
        for i in range(n_chunks):
            chunk = tokens[i * ctx:(i + 1) * ctx]
            base_chunks.append(b.logits(chunk)[first:ctx - 1])
            model_chunks.append(q.logits(chunk)[first:ctx - 1])
            target_chunks.append(chunk[first + 1:])
    ref = ref_statistics(base_chunks, model_chunks, target_chunks)
    assert res.n_tokens_scored == ref["n"] == n_chunks * (ctx - 1 - first)
    assert res.n_chunks == n_chunks and res.n_ctx == ctx
    for key in ("ppl", "base_ppl", "kld_mean", "top1", "rms_dp"):  # the runtime is deterministic
        assert close(getattr(res, key), ref[key]), (key, getattr(res, key), ref[key])


@pytest.mark.slow
def test_two_contexts_over_one_file_give_identical_logits(files):
    """What test_model_against_itself relies on: llama.cpp's CPU backend computes each output value in
    one thread, in a fixed order, so two contexts over the same file agree to the bit."""
    from llmquant.runtime.llama import Model

    text, _ = load_text(None)
    with Model(files["F32"], n_ctx=64, n_batch=64, threads=2, logits_all=True, flash_attn=True) as a, \
            Model(files["F32"], n_ctx=64, n_batch=64, threads=2, logits_all=True, flash_attn=True) as b:
        tokens = a.tokenize(text)[:64]
        la, lb = a.logits(tokens), b.logits(tokens)
    assert np.array_equal(la, lb), f"{np.count_nonzero(la != lb)} of {la.size} logits differ"


@pytest.mark.slow
def test_model_against_itself(files):
    # identical logits (the test above) and identical NLL arithmetic for model and base (eval._nll):
    # ΔPPL, the PPL ratio and Δp are exactly zero, not merely small
    res = evaluate(files["F32"], base=files["F32"], ctx=64, chunks=2, threads=2)
    assert abs(res.kld_mean) < 1e-12 and res.top1 == 100.0
    assert res.delta_ppl == 0.0 and res.ppl_ratio == 1.0 and res.rms_dp < 1e-9
    assert res.base_is_quantized is False and not res.notes


@pytest.mark.slow
def test_lockstep_ordering_and_consistency(files):
    many = evaluate_many([files["Q8_0"], files["Q4_0"]], files["F32"], ctx=128, chunks=3, threads=2)
    q8, q4 = many
    assert 0 < q8.kld_mean < q4.kld_mean
    assert q8.top1 > q4.top1 and q8.rms_dp < q4.rms_dp
    assert q8.kld_p99 < q4.kld_p99 and q8.kld_median <= q8.kld_p90 <= q8.kld_p99 <= q8.kld_max
    assert q8.base_ppl == q4.base_ppl  # one base pass for both
    assert q8.n_tokens_scored == 3 * 63 and q8.seconds > 0 and q8.tokens_per_second > 0
    alone = evaluate(files["Q4_0"], base=files["F32"], ctx=128, chunks=3, threads=2)
    assert close(alone.kld_mean, q4.kld_mean, 1e-4) and close(alone.ppl, q4.ppl, 1e-5)
    ppl_only = evaluate(files["Q4_0"], ctx=128, chunks=3, threads=2)
    assert ppl_only.kld_mean is None and close(ppl_only.ppl, q4.ppl, 1e-5)
    d = json.loads(json.dumps(q4.to_dict()))
    assert {"ppl", "ppl_err", "base_ppl", "delta_ppl", "ppl_ratio", "ppl_ratio_err", "kld_mean", "kld_err",
            "kld_median", "kld_p90", "kld_p99", "kld_max", "top1", "top1_err", "rms_dp", "n_chunks", "n_ctx",
            "n_tokens_scored", "seconds", "tokens_per_second"} <= set(d)


@pytest.mark.slow
def test_quantized_base_gets_a_note(files):
    res = evaluate(files["Q8_0"], base=default_model_path(), ctx=64, chunks=2, threads=2)
    assert res.base_is_quantized is True and res.base_file_type == "Q4_1"
    assert "itself quantized (Q4_1)" in res.notes[0]


# -- CLI ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_cli_eval_json_and_table(files):
    from typer.testing import CliRunner

    from llmquant.cli import app

    runner = CliRunner()
    r = runner.invoke(app, ["eval", str(files["Q8_0"]), "--base", str(files["F32"]), "--ctx", "64",
                            "--chunks", "2", "--threads", "2", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["n_chunks"] == 2 and d["kld_mean"] > 0 and d["top1"] > 50
    r = runner.invoke(app, ["eval", str(files["Q8_0"]), "--base", str(default_model_path()), "--ctx", "64",
                            "--chunks", "1", "--threads", "2"])
    assert r.exit_code == 0, r.output
    for label in ("PPL(Q)", "PPL(base)", "mean KLD", "99% KLD", "same top p", "RMS Δp", "itself quantized"):
        assert label in r.stdout, label


def test_cli_eval_bad_ctx_is_one_line():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "llmquant", "eval", "--ctx", "15"], capture_output=True, text=True, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == ["error: ctx must be an even number of tokens >= 16, got 15"]
