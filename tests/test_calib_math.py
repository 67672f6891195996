"""GPTQ and AWQ math on small matrices (calib/gptq.py, calib/awq.py): no model, no torch."""

from __future__ import annotations

import numpy as np
import pytest

from llmquant.calib.awq import awq_clip, awq_scales, fold_scales
from llmquant.calib.gptq import IntGrid, dequantize, gptq, hessian_update, int_codes, range_search, rtn


def _correlated(rng, n, cols):
    """Activations with correlated channels and a few loud ones, as in real layers."""
    base = rng.standard_normal((n, cols // 4))
    x = base @ rng.standard_normal((cols // 4, cols)) + 0.3 * rng.standard_normal((n, cols))
    x[:, :3] *= 8.0
    return x.astype(np.float32)


def _out_err(X, W, Q):
    return float(np.sum((X @ (W - Q).T) ** 2))


@pytest.mark.parametrize("bits,sym,act", [(4, True, "none"), (4, False, "none"), (3, True, "static"), (2, False, "group"), (8, True, "none")])
def test_gptq_output_error_not_above_rtn(bits, sym, act):
    rng = np.random.default_rng(bits + 10 * sym)
    X = _correlated(rng, 512, 64)
    W = rng.standard_normal((24, 64)).astype(np.float32)
    H, n = hessian_update(None, 0, X[:200])
    H, n = hessian_update(H, n, X[200:])
    assert n == 512 and np.allclose(H, 2 / 512 * X.astype(np.float64).T @ X)  # running mean == batch
    grid = IntGrid(bits, sym)
    res = gptq(W, H, grid, 16, act_order=act, damp=0.01, block_size=32)
    base = rtn(W, grid, 16)
    e_gptq, e_rtn = _out_err(X, W, res.weight), _out_err(X, W, base.weight)
    assert e_gptq < 0.9 * e_rtn, (e_gptq, e_rtn)
    codes, scales, zeros = int_codes(res, grid)
    assert codes.min() >= 0 and codes.max() <= grid.maxq
    assert np.array_equal(dequantize(codes, scales, zeros, res.g_idx), res.weight)  # on the grid exactly


@pytest.mark.parametrize("act", ["none", "static", "group"])
def test_diagonal_hessian_is_round_to_nearest(act):
    rng = np.random.default_rng(1)
    W = rng.standard_normal((12, 48)).astype(np.float32)
    H = np.diag(rng.uniform(0.5, 3.0, 48))
    grid = IntGrid(4, False)
    res = gptq(W, H, grid, 16, act_order=act, block_size=16)
    if act == "group":
        # groups are contiguous in the act order: RTN of the permuted matrix, scattered back
        base = rtn(W[:, res.perm], grid, 16).weight[:, np.argsort(res.perm)]
        assert not np.array_equal(res.g_idx, np.arange(48) // 16)
    else:
        base = rtn(W, grid, 16).weight
    assert np.array_equal(res.weight, base)


def test_act_order_static_and_group_store_what_they_computed():
    """static keeps contiguous groups (no g_idx on disk), group needs its g_idx: each set of stored
    codes/scales/zeros dequantizes to exactly the weights GPTQ computed, and with the columns
    already in act order both modes are the same computation."""
    rng = np.random.default_rng(2)
    X = _correlated(rng, 256, 32)
    W = rng.standard_normal((8, 32)).astype(np.float32)
    grid = IntGrid(4, True)
    H = 2 / 256 * X.astype(np.float64).T @ X
    st = gptq(W, H, grid, 8, act_order="static")
    gr = gptq(W, H, grid, 8, act_order="group")
    assert np.array_equal(st.g_idx, np.arange(32) // 8)
    for res in (st, gr):
        c, s, z = int_codes(res, grid)
        assert np.array_equal(dequantize(c, s, z, res.g_idx), res.weight)
    order = np.argsort(-np.diag(H), kind="stable")
    Ws, Hs = W[:, order], H[order][:, order]
    a = gptq(Ws, Hs, grid, 8, act_order="group")
    b = gptq(Ws, Hs, grid, 8, act_order="none")
    assert np.array_equal(a.perm, np.arange(32)) and np.array_equal(a.weight, b.weight)
    assert np.array_equal(a.g_idx, np.arange(32) // 8)


class _Generic:
    """An IntGrid behind the generic Grid protocol: gptq runs its numpy column loop on it."""

    def __init__(self, grid):
        self.grid = grid

    def fit(self, w):
        return self.grid.fit(w)

    def round(self, w, p, j=0):
        return self.grid.round(w, p, j)


@pytest.mark.parametrize("act,g,sym,dtype", [("static", 16, True, np.float32), ("none", 16, False, np.float16),
                                             ("group", 32, True, np.float32), ("none", 0, True, np.float32),
                                             ("none", 64, False, "bfloat16")])
def test_compiled_loop_is_the_generic_loop(act, g, sym, dtype):
    """The compiled column loop of an IntGrid (rows contiguous, codes kept) against gptq's generic
    numpy loop: the same weights up to the summation order of the block products, codes that
    dequantize to its weights, the same layer error."""
    rng = np.random.default_rng(7)
    X = _correlated(rng, 512, 128)
    W = rng.standard_normal((40, 128)).astype(np.float32)
    H = 2 / 512 * X.astype(np.float64).T @ X
    grid = IntGrid(4, sym, dtype)
    fast = gptq(W, H, grid, g, act_order=act, block_size=32)
    slow = gptq(W, H, _Generic(grid), g, act_order=act, block_size=32)
    assert fast.codes is not None and slow.codes is None
    assert np.array_equal(fast.g_idx, slow.g_idx)
    assert np.allclose(fast.weight, slow.weight, rtol=0, atol=1e-5 * np.abs(W).max())
    c, s, z = int_codes(fast, grid)
    assert np.array_equal(dequantize(c, s, z, fast.g_idx), fast.weight)
    assert _out_err(X, W, fast.weight) == pytest.approx(_out_err(X, W, slow.weight), rel=1e-4)


def test_range_search_picks_the_least_weighted_error():
    """Per group, the searched range's diag(H)-weighted round-to-nearest error is the least of the
    candidates (min/max among them); one point is min/max itself; GPTQ static stores the searched
    ranges. (Whether they lower GPTQ's layer error depends on the data — on these synthetic
    correlated inputs they do not; on SmolLM2 they halve the KLD: bench/RESULTS.md.)"""
    rng = np.random.default_rng(8)
    X = _correlated(rng, 1024, 128)
    W = (rng.standard_normal((32, 128)) * rng.uniform(0.3, 2.0, 128)).astype(np.float32)
    W[:, ::13] *= 5.0
    H = 2 / 1024 * X.astype(np.float64).T @ X
    d = np.diag(H)
    grid = IntGrid(4, True)
    blocks = W.reshape(32, 4, 32)

    def err(clip):
        q = grid.round(blocks, grid.fit(blocks, clip))
        return (((q - blocks) ** 2) * d.reshape(1, 4, 32)).sum(-1)

    best = range_search(W, d, grid, 32, 11)
    assert best.shape == (32, 4) and best.min() >= 0.5 and best.max() <= 1.0 and (best < 1).mean() > 0.5
    for c in np.linspace(1.0, 0.5, 11, dtype=np.float32):
        assert np.all(err(best) <= err(np.float32(c)) * (1 + 1e-5) + 1e-12)
    assert np.array_equal(range_search(W, d, grid, 32, 1), np.ones((32, 4), np.float32))
    one = gptq(W, H, grid, 32, act_order="static", range_points=1)
    assert np.array_equal(one.weight, gptq(W, H, grid, 32, act_order="static").weight)
    # static: the groups' stored scales are the searched ranges of the original weights
    st = gptq(W, H, grid, 32, act_order="static", range_points=11)
    c, s, z = int_codes(st, grid)
    assert np.array_equal(s, grid.fit(blocks, best).scale) and np.array_equal(dequantize(c, s, z, st.g_idx), st.weight)


def test_fp16_scales_are_the_grid():
    rng = np.random.default_rng(3)
    W = rng.standard_normal((4, 32)).astype(np.float32) * 1e-3
    res = rtn(W, IntGrid(4, True, np.float16), 32)
    s = res.params[0].scale
    assert np.array_equal(s.astype(np.float16).astype(np.float32), s)


def test_awq_scales_and_clip_reduce_the_output_error():
    rng = np.random.default_rng(4)
    X = _correlated(rng, 1024, 64)
    X[:, 5] *= 20  # a salient channel AWQ should protect
    W = rng.standard_normal((32, 64)).astype(np.float32)
    G = X.astype(np.float64).T @ X / len(X)
    xmean = np.abs(X).mean(0)
    grid = IntGrid(4, False)
    base = _out_err(X, W, rtn(W, grid, 16).weight)
    _, _, plain = awq_scales(G, xmean, [W], grid, 16, duo_scaling=False)
    assert plain[0] == pytest.approx(base / len(X), rel=1e-3)  # alpha 0 without duo scaling: s = 1, RTN
    s, alpha, losses = awq_scales(G, xmean, [W], grid, 16)
    assert alpha > 0 and min(losses) < plain[0]
    Ws = W * s
    q = rtn(Ws, grid, 16).weight / s
    assert _out_err(X, W, q) < base
    clip = awq_clip(Ws, G / s[:, None] / s[None, :], grid, 16)
    assert clip.shape == (32, 4) and clip.max() <= 1.0 and clip.min() >= 0.5
    qc = rtn_clip(Ws, grid, 16, clip) / s
    assert _out_err(X, W, qc) <= _out_err(X, W, q) * (1 + 1e-6)


def rtn_clip(W, grid, g, clip):
    out = np.empty_like(W)
    for k in range(W.shape[1] // g):
        p = grid.fit(W[:, k * g:(k + 1) * g], clip[:, k])
        out[:, k * g:(k + 1) * g] = grid.round(W[:, k * g:(k + 1) * g], p)
    return out


def test_fold_scales_keeps_the_function():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((10, 16)).astype(np.float32)
    norm = rng.uniform(0.5, 1.5, 16).astype(np.float32)
    Wq = rng.standard_normal((8, 16)).astype(np.float32)
    s = rng.uniform(0.5, 2.0, 16).astype(np.float32)
    prev, (Wf,) = fold_scales(norm, [Wq], s)
    assert np.allclose((x * prev) @ Wf.T, (x * norm) @ Wq.T, rtol=1e-5, atol=1e-5)
    up = rng.standard_normal((16, 12)).astype(np.float32)  # a previous linear: its output rows are scaled
    prev, (Wf,) = fold_scales(up, [Wq], s)
    h = rng.standard_normal((10, 12)).astype(np.float32)
    assert np.allclose((h @ prev.T) @ Wf.T, (h @ up.T) @ Wq.T, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float16, "bfloat16"])
def test_awq_fused_error_equals_the_numpy_composition(sym, dtype):
    """The fused kernel of the scale search gives exactly W − RTN(W·s)/s, scales rounded to the
    stored dtype, for 2-, 4- and 8-bit grids."""
    from llmquant.calib.awq import _rtn, scaled_error

    rng = np.random.default_rng(7)
    for bits in (2, 4, 8):
        grid = IntGrid(bits, sym, dtype)
        W = (rng.standard_normal((48, 96)) * 0.05).astype(np.float32)
        s = (np.abs(rng.standard_normal(96)) + 0.3).astype(np.float32)
        want = W - _rtn(W * s, grid, 32) / s
        got = scaled_error(W, s, grid, 32)
        assert np.array_equal(got, want), f"{bits} bits: {np.sum(got != want)} of {got.size} differ"
