"""GPTQ (Frantar et al., arXiv 2210.17323) as a pure function on numpy arrays, the grid a parameter.

Follows IST-DASLab ``gptq.py`` (``fasterquant``) and llm-compressor ``modifiers/gptq/gptq_quantize.py``:
H = 2/n XᵀX (accumulated by the caller with ``hessian_update``), dead columns zeroed, damping
``damp · mean(diag H)`` on the diagonal, the upper Cholesky factor U of H⁻¹, then columns quantized
left to right, each one's error ``(w − q) / U[i, i]`` spread over the columns still to come (inside
a block of ``block_size`` columns at once; to the rest of the matrix once per block, the "lazy batch").

The grid is a ``Grid`` object (``fit`` a group of columns → its parameters, ``round`` one column on
them), so the same error-feedback loop serves integer groups (``IntGrid``, what GPTQ/AWQ checkpoints
store) and ggml's block encoders (a block of 32 input columns is a group).

Act-order (llm-compressor's names):
- ``"none"``: columns in order; a group's parameters are fitted when its first column comes up, on the
  error-updated weights (original GPTQ).
- ``"static"`` (``ActivationOrdering.WEIGHT``): groups stay contiguous in the original column order, their
  parameters are fitted on the original weights up front, and the columns are quantized in order of
  decreasing diag(H); nothing extra on disk (g_idx = column // group).
- ``"group"`` (classic ``desc_act=True``): columns in decreasing diag(H), groups contiguous in *that*
  order and fitted on the updated weights; ``g_idx`` maps each original column to its group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from numba import njit

ACT_ORDERS = ("none", "static", "group")


class Grid(Protocol):
    """A quantization grid over groups of input columns."""

    def fit(self, w: np.ndarray) -> Any:
        """Parameters for one group: ``w`` is (rows, group) float32."""

    def round(self, w: np.ndarray, params: Any, j: int) -> np.ndarray:
        """Column ``j`` of the group (``w``: (rows,)) rounded onto the grid, dequantized."""


@dataclass(frozen=True)
class IntParams:
    scale: np.ndarray  # (rows,) float32, already rounded to the storage dtype
    zero: np.ndarray  # (rows,) float32 holding integers in [0, 2^bits - 1]


@dataclass(frozen=True)
class IntGrid:
    """b-bit integers per group, w ≈ (q − z)·s with q ∈ [0, 2^b − 1].

    Same parameters as AutoGPTQ's ``Quantizer.find_params`` and compressed-tensors'
    ``calculate_qparams`` (min/max observer): symmetric s = 2·max|w| / (2^b − 1), z = 2^(b−1);
    asymmetric s = (max(w,0) − min(w,0)) / (2^b − 1), z = round(−min/s). ``scale_dtype`` is the dtype
    the checkpoint stores the scales in: they are rounded to it before any weight is rounded on them,
    so the grid GPTQ sees is the one a loader dequantizes with."""

    bits: int = 4
    sym: bool = True
    scale_dtype: Any = np.float32
    clip: float = 1.0  # shrink factor on the range (AWQ's clip search sets it per group)

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    def fit(self, w: np.ndarray, clip: np.ndarray | float | None = None) -> IntParams:
        return self.fit_range(w.min(axis=-1), w.max(axis=-1), clip)

    def fit_range(self, wmin: np.ndarray, wmax: np.ndarray, clip: np.ndarray | float | None = None) -> IntParams:
        """``fit`` from each group's smallest and largest weight."""
        c = self.clip if clip is None else clip
        if self.sym:
            amax = np.maximum(-wmin, wmax) * c  # max |w|
            scale = 2.0 * amax / self.maxq
            zero = np.full(scale.shape, float(1 << (self.bits - 1)), np.float32)
        else:
            lo = np.minimum(wmin, 0.0) * c
            hi = np.maximum(wmax, 0.0) * c
            scale = (hi - lo) / self.maxq
        scale = _storable(scale.astype(np.float32), self.scale_dtype)
        if not self.sym:
            zero = np.clip(np.rint(-lo / scale), 0, self.maxq).astype(np.float32)
        return IntParams(scale, zero)

    def round(self, w: np.ndarray, params: IntParams, j: int = 0) -> np.ndarray:
        s, z = params.scale, params.zero
        if w.ndim > s.ndim:  # a block of columns
            s, z = s[..., None], z[..., None]
        q = (w / s).astype(np.float32, copy=False)  # then in place: the same values, half the time
        np.rint(q, out=q)
        q += z
        np.clip(q, 0, self.maxq, out=q)
        q -= z
        q *= s
        return q

    def codes(self, w: np.ndarray, params: IntParams) -> np.ndarray:
        """The integers of already-rounded values ``w`` (rows, k) on ``params``."""
        q = np.rint(w / params.scale[:, None]) + params.zero[:, None]
        return np.clip(q, 0, self.maxq).astype(np.int32)


def _storable(scale: np.ndarray, dtype) -> np.ndarray:
    """``scale`` rounded to ``dtype`` (and never 0 there), returned as float32."""
    tiny = 6.2e-5 if dtype in (np.float16, "float16") else 1e-30  # fp16: smallest normal
    scale = np.where(scale > tiny, scale, np.where(scale > 0, tiny, 1.0)).astype(np.float32)
    if dtype == "bfloat16":  # round to nearest even on the 16 high bits, as torch's .to(torch.bfloat16)
        n = scale.view(np.uint32).astype(np.uint64)
        return (((n + 0x7FFF + ((n >> 16) & 1)) >> 16) << 16).astype(np.uint32).view(np.float32)
    return scale.astype(np.dtype(dtype)).astype(np.float32)


@dataclass
class GPTQResult:
    weight: np.ndarray  # (rows, cols) float32, dequantized, original column order
    params: list[Any]  # one per group, in group-index order
    g_idx: np.ndarray  # (cols,) int32: group of each original column
    perm: np.ndarray | None  # column order used (None: in order)
    damp: float  # the damping fraction that made H positive definite
    codes: np.ndarray | None = None  # (rows, cols) int32 on an IntGrid, where the loop kept them


def hessian_update(H: np.ndarray | None, n: int, x: np.ndarray, *, product=np.float64) -> tuple[np.ndarray, int]:
    """Running H = 2/n Σ xxᵀ over the rows of ``x`` (tokens, cols), as GPTQ's ``add_batch``; H is
    updated in place (float64). ``product``: the dtype of the batch's xᵀx (float32 is twice as
    fast; the sum over batches stays float64)."""
    x = np.asarray(x, product).reshape(-1, x.shape[-1])
    m = x.shape[0]
    if H is None:
        H = np.zeros((x.shape[1], x.shape[1]), np.float64)
    H *= n / (n + m)
    n += m
    H += (x.T @ x).astype(np.float64, copy=False) * (2.0 / n)
    return H, n


def rtn(W: np.ndarray, grid: Grid, group_size: int, clip: np.ndarray | None = None) -> GPTQResult:
    """Round-to-nearest on the same grid, groups of ``group_size`` contiguous columns (``clip``:
    (rows, groups) range factors for an ``IntGrid``, from AWQ's clip search)."""
    W = np.asarray(W, np.float32)
    rows, cols = W.shape
    g = group_size or cols
    g_idx = (np.arange(cols) // g).astype(np.int32)
    if isinstance(grid, IntGrid):  # all groups at once
        blocks = W.reshape(rows, cols // g, g)
        p = grid.fit(blocks, clip)
        out = grid.round(blocks, p).reshape(rows, cols)
        return GPTQResult(out, [IntParams(p.scale[:, k], p.zero[:, k]) for k in range(cols // g)], g_idx, None, 0.0)
    out = np.empty_like(W)
    params = []
    for k in range(0, cols, g):
        p = grid.fit(W[:, k:k + g])
        params.append(p)
        for j in range(min(g, cols - k)):
            out[:, k + j] = grid.round(W[:, k + j], p, j)
    return GPTQResult(out, params, g_idx, None, 0.0)


def range_search(W: np.ndarray, d: np.ndarray, grid: IntGrid, group_size: int, n: int, lowest: float = 0.5) -> np.ndarray:
    """(rows, groups) range factors, one of ``n`` points in [lowest, 1]: per group, the shrink of the
    min/max range whose round-to-nearest error Σ d_j (w_j − q_j)² is least (``d``: diag(H), the
    weight of each input column; the first factor wins a tie). GPTQ's reference ``Quantizer`` has
    this as its ``mse`` option (a grid of 100, |err|^2.4 unweighted); AWQ's clip search is the same
    idea on the layer-output error."""
    rows, cols = W.shape
    blocks = np.ascontiguousarray(W, np.float32).reshape(rows, cols // group_size, group_size)
    wmin, wmax = blocks.min(axis=-1), blocks.max(axis=-1)
    cs = np.linspace(1.0, lowest, n, dtype=np.float32)
    p = grid.fit_range(wmin[None], wmax[None], cs[:, None, None])  # (n, rows, groups) each
    err = _range_errors(blocks, np.asarray(d, np.float32).reshape(cols // group_size, group_size),
                        p.scale, p.zero, float(grid.maxq))
    return cs[np.argmin(err, axis=0)]


@njit(cache=True, nogil=True, fastmath=True)
def _range_errors(blocks, d, S, Z, maxq):  # pragma: no cover - compiled
    """err[c, r, k] = Σ_j d[k, j] (w − q)² of group k of row r on candidate c's (scale, zero), q
    rounded as ``IntGrid.round`` does but through 1/s (a search criterion: fastmath may reorder
    the sum, 4x faster; the chosen range is then rounded by ``IntGrid.round`` itself)."""
    n = S.shape[0]
    rows, groups, g = blocks.shape
    err = np.empty((n, rows, groups), np.float32)
    zero = np.float32(0.0)
    top = np.float32(maxq)
    for c in range(n):
        for r in range(rows):
            for k in range(groups):
                s, z = S[c, r, k], Z[c, r, k]
                inv = np.float32(1.0) / s
                acc = np.float32(0.0)
                for j in range(g):
                    w = blocks[r, k, j]
                    q = min(max(np.float32(np.rint(w * inv)) + z, zero), top)
                    e = w - (q - z) * s
                    acc += d[k, j] * e * e
                err[c, r, k] = acc
    return err


def _upper_cholesky_inverse(H: np.ndarray, damp: float, factor=None) -> tuple[np.ndarray, float]:
    """U with H⁻¹ = UᵀU for H + damp·mean(diag)·I; damping ×10 until H is positive definite.

    ``factor`` maps the damped H (float64) to U, raising ``np.linalg.LinAlgError`` where it is not
    positive definite; by default ``inverse_factor`` (numpy, float64)."""
    factor = factor or inverse_factor
    mean_diag = float(np.mean(np.diag(H)))
    for _ in range(6):
        Hd = H.copy()
        Hd[np.diag_indices_from(Hd)] += damp * mean_diag
        try:
            return factor(Hd), damp
        except np.linalg.LinAlgError:
            damp *= 10
    raise np.linalg.LinAlgError("Hessian is not positive definite even with damping 1e5 x mean(diag)")


def inverse_factor(Hd: np.ndarray) -> np.ndarray:
    """U with Hd⁻¹ = UᵀU (Hd positive definite) in float64 by numpy: one Cholesky factorisation and
    one inverse of a triangle. With R upper and Hd = RRᵀ (the Cholesky factor of Hd with rows and
    columns reversed, reversed back), Hd⁻¹ = R⁻ᵀR⁻¹, so U = R⁻¹ by the uniqueness of the factor —
    the textbook chol(inv(H)) without forming inv(H) (a third of the flops)."""
    R = np.ascontiguousarray(np.linalg.cholesky(Hd[::-1, ::-1])[::-1, ::-1])
    return inverse_upper(R)


def inverse_upper(R, leaf=None, cut: int = 192, zeros=np.zeros_like):
    """R⁻¹ of an upper-triangular R by halves, [[A, B], [0, C]]⁻¹ = [[A⁻¹, −A⁻¹BC⁻¹], [0, C⁻¹]]: two
    matrix products per level instead of a general LU inverse (numpy has no trtri; 3x faster at 1536).
    ``leaf`` inverts a triangle of at most ``cut`` rows (numpy's inverse by default); with a torch
    leaf and ``zeros=torch.zeros_like`` the same recursion runs on torch matrices."""
    n = len(R)
    if n <= cut:
        return leaf(R) if leaf else np.triu(np.linalg.inv(R))
    h = n // 2
    Ai, Ci = inverse_upper(R[:h, :h], leaf, cut, zeros), inverse_upper(R[h:, h:], leaf, cut, zeros)
    out = zeros(R)
    out[:h, :h], out[h:, h:] = Ai, Ci
    out[:h, h:] = -(Ai @ R[:h, h:]) @ Ci
    return out


def hessian_inverse_upper(H: np.ndarray, damp: float = 0.01) -> tuple[np.ndarray, float]:
    """(U, damp used) with (H + damp·mean(diag)·I)⁻¹ = UᵀU, dead columns (diag 0) set to 1 first
    as ``gptq`` does (see ``_upper_cholesky_inverse``)."""
    H = np.array(H, np.float64)
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    return _upper_cholesky_inverse(H, damp)


def gptq(W: np.ndarray, H: np.ndarray, grid: Grid, group_size: int, *, act_order: str = "none",
         damp: float = 0.01, block_size: int = 128, hinv_upper: tuple[np.ndarray, float] | None = None,
         factor=None, range_points: int = 0) -> GPTQResult:
    """Quantize ``W`` (rows = output channels, cols = input channels) against Hessian ``H`` (cols, cols).

    ``group_size`` 0 means one group per row (per-channel). ``hinv_upper``: (U, damp) already
    computed for this H (``hessian_inverse_upper``), with act_order "none". ``factor``: damped H →
    U, the upper Cholesky factor of its inverse (``inverse_factor``, numpy float64, by default).
    ``range_points`` n > 0 (an ``IntGrid``): each group's range is the best of n shrinks of its
    min/max (``range_search``), not min/max itself."""
    if act_order not in ACT_ORDERS:
        raise ValueError(f"act_order {act_order!r}; expected one of {ACT_ORDERS}")
    W = np.array(W, np.float32)
    H = np.array(H, np.float64)
    rows, cols = W.shape
    g = group_size or cols
    if cols % g:
        raise ValueError(f"{cols} columns are not a multiple of the group size {g}")
    # blocks are a multiple of the group (or the group a multiple of the block), so a group is fitted
    # on columns that already carry every earlier column's error
    B = (max(1, block_size // g) * g) if g <= block_size else (block_size if g % block_size == 0 else g)
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    static = None
    perm = None
    if act_order == "static":
        if range_points and isinstance(grid, IntGrid):
            clip = range_search(W, np.diag(H), grid, g, range_points)
            p_all = grid.fit(W.reshape(rows, cols // g, g), clip)
            static = [IntParams(p_all.scale[:, k], p_all.zero[:, k]) for k in range(cols // g)]
        else:
            static = [grid.fit(W[:, k:k + g]) for k in range(0, cols, g)]
    if act_order != "none":
        perm = np.argsort(-np.diag(H), kind="stable")
        W = W[:, perm]
        H = H[np.ix_(perm, perm)]
    if hinv_upper is not None and act_order == "none":
        U, damp = hinv_upper
    else:
        U, damp = _upper_cholesky_inverse(H, damp, factor)
    U = U.astype(np.float32)

    fitted: dict[int, Any] = {}
    fit_group = getattr(grid, "fit_group", None) if act_order == "none" else None  # a grid that weights each group's columns its own way
    if isinstance(grid, IntGrid) and fit_group is None:
        Q, C = _int_feedback(W, U, grid, g, B, static, perm, fitted, np.diag(H), range_points)
        return _result(Q, static, fitted, perm, act_order, g, damp, C, ordered=True)
    Q = np.empty_like(W)
    if fit_group is not None and getattr(grid, "feedback", None) is not None and B % g == 0:
        _grid_feedback(W, U, Q, grid, g, B, fitted)
        return _result(Q, static, fitted, perm, act_order, g, damp)
    p = None
    # inside a block, rank-1 updates only within sub-blocks of ``sub`` columns; each sub-block's errors
    # reach the rest of the block in one product (the same sums, fewer passes over memory)
    sub = 16 if (g % 16 == 0 and B % 16 == 0) else B
    for i1 in range(0, cols, B):
        i2 = min(i1 + B, cols)
        W1 = W[:, i1:i2].copy()
        Err = np.empty_like(W1)
        U1 = U[i1:i2, i1:i2]
        for j1 in range(0, i2 - i1, sub):
            j2 = min(j1 + sub, i2 - i1)
            for i in range(j1, j2):
                c = i1 + i
                if static is not None:
                    orig = perm[c]
                    p, j = static[orig // g], orig % g
                else:
                    j = c % g
                    if j == 0:
                        grp = W1[:, i:i + g] if c + g <= i2 else np.concatenate([W1[:, i:], W[:, i2:c + g]], axis=1)
                        p = fitted[c // g] = fit_group(grp, c // g) if fit_group else grid.fit(grp)
                w = W1[:, i]
                q = grid.round(w, p, j)
                Q[:, c] = q
                err = (w - q) / U1[i, i]
                W1[:, i:j2] -= np.outer(err, U1[i, i:j2])
                Err[:, i] = err
            W1[:, j2:] -= Err[:, j1:j2] @ U1[j1:j2, j2:]
        W[:, i2:] -= Err @ U[i1:i2, i2:]

    return _result(Q, static, fitted, perm, act_order, g, damp)


def _result(Q, static, fitted, perm, act_order, g, damp, C=None, ordered=False) -> GPTQResult:
    """The result of a column loop whose Q (and codes C) are in the loop's column order, or already
    in the original one (``ordered``)."""
    cols = Q.shape[1]
    if act_order == "none":
        C = None if C is None else np.ascontiguousarray(C)
        return GPTQResult(Q, [fitted[k] for k in range(cols // g)], (np.arange(cols) // g).astype(np.int32), None, damp, C)
    inv = np.argsort(perm)
    if not ordered:
        Q = np.ascontiguousarray(Q[:, inv])
        C = None if C is None else np.ascontiguousarray(C[:, inv])
    if act_order == "static":
        return GPTQResult(Q, static, (np.arange(cols) // g).astype(np.int32), perm, damp, C)
    g_idx = (inv // g).astype(np.int32)  # original column c sat at position inv[c]
    return GPTQResult(Q, [fitted[k] for k in range(cols // g)], g_idx, perm, damp, C)


def _int_feedback(W, U, grid: IntGrid, g: int, B: int, static, perm, fitted: dict, diag: np.ndarray,
                  range_points: int) -> tuple[np.ndarray, np.ndarray]:
    """The column loop of ``gptq`` for an ``IntGrid``, compiled (``_feedback_block``), on the
    transposed weights so that a column is contiguous; each block's error reaches the columns after
    it in one product. Groups of act-order "none" / "group" are fitted when their first column comes
    up, on the weights as updated so far (``range_points``: their range by ``range_search`` over the
    columns' diag(H)) — a block is then cut at each group start. The generic loop
    below gives the same values up to the summation order of the block products (a last-bit
    difference in a weight or scale, nothing more: tests/test_calib_math.py compares the two).
    Returns (Q, codes), (rows, cols) each, in the original column order (``perm`` undone on the
    transposed arrays, where a column is a contiguous row: 3x faster than gathering columns)."""
    rows, cols = W.shape
    Wt = np.ascontiguousarray(W.T)  # (cols, rows)
    Qt = np.empty_like(Wt)
    Ct = np.empty(Wt.shape, np.int32)
    maxq = float(grid.maxq)
    if static is not None:
        ss = np.ascontiguousarray(np.stack([p.scale for p in static]))  # (groups, rows)
        zz = np.ascontiguousarray(np.stack([p.zero for p in static]))
    p = None
    for i1 in range(0, cols, B):
        i2 = min(i1 + B, cols)
        W1, Q1, C1 = Wt[i1:i2], Qt[i1:i2], Ct[i1:i2]
        Err = np.empty_like(W1)
        U1 = np.ascontiguousarray(U[i1:i2, i1:i2])
        if static is not None:
            grp = perm[i1:i2] // g
            _feedback_block(W1, U1, Q1, C1, Err, ss[grp], zz[grp], 0, i2 - i1, maxq)
        else:
            S = np.empty_like(W1)
            Z = np.empty_like(W1)
            lo = 0
            while lo < i2 - i1:
                c = i1 + lo
                if c % g == 0:
                    block = Wt[c:c + g].T
                    clip = range_search(block, diag[c:c + g], grid, block.shape[1], range_points)[:, 0] if range_points else None
                    p = fitted[c // g] = grid.fit(block, clip)
                hi = min(i2 - i1, lo + g - c % g)
                S[lo:hi] = p.scale
                Z[lo:hi] = p.zero
                _feedback_block(W1, U1, Q1, C1, Err, S, Z, lo, hi, maxq)
                lo = hi
        if i2 < cols:
            Wt[i2:] -= U[i1:i2, i2:].T @ Err
    if perm is not None:
        inv = np.argsort(perm)
        Qt, Ct = Qt[inv], Ct[inv]
    return np.ascontiguousarray(Qt.T), np.ascontiguousarray(Ct.T)


def _grid_feedback(W, U, Q, grid, g: int, B: int, fitted: dict) -> None:
    """The column loop of ``gptq`` (act-order "none") for a grid with a compiled ``feedback`` (the
    ggml 32-block grids of ``refine.BlockGrid``): as ``_int_feedback``, on the transposed weights,
    each group fitted by ``grid.fit_group`` when its first column comes up, on the weights as updated
    so far. The same values as the generic loop up to the summation order of the updates."""
    rows, cols = W.shape
    Wt = np.ascontiguousarray(W.T)  # (cols, rows)
    Qt = np.empty_like(Wt)
    for i1 in range(0, cols, B):
        i2 = min(i1 + B, cols)
        W1, Q1 = Wt[i1:i2], Qt[i1:i2]
        Err = np.empty_like(W1)
        U1 = np.ascontiguousarray(U[i1:i2, i1:i2])
        for lo in range(0, i2 - i1, g):
            c = i1 + lo
            p = fitted[c // g] = grid.fit_group(Wt[c:c + g].T, c // g)
            grid.feedback(W1, U1, Q1, Err, p, lo, min(lo + g, i2 - i1))
        if i2 < cols:
            Wt[i2:] -= U[i1:i2, i2:].T @ Err
    Q[:] = Qt.T


@njit(cache=True, nogil=True)
def _feedback_block(W1, U1, Q1, C1, Err, S, Z, lo, hi, maxq):  # pragma: no cover - compiled
    """Columns lo..hi of a block, all (block columns, rows): round column i onto its (scale, zero) per
    row, spread (w − q)/U[i, i] over the block's later columns; float32 throughout, as the numpy loop.
    The loops run along the rows (contiguous here), which LLVM vectorizes."""
    rows = W1.shape[1]
    zero = np.float32(0.0)
    top = np.float32(maxq)
    for i in range(lo, hi):
        d = U1[i, i]
        wi, qi, ci, ei, si, zi = W1[i], Q1[i], C1[i], Err[i], S[i], Z[i]
        for r in range(rows):
            w, s, z = wi[r], si[r], zi[r]
            q = np.float32(np.rint(w / s)) + z
            q = min(max(q, zero), top)
            ci[r] = np.int32(q)
            q = (q - z) * s
            qi[r] = q
            ei[r] = (w - q) / d
        spread(W1, U1, ei, i)


@njit(cache=True, nogil=True, inline="always")
def spread(W1, U1, ei, i):  # pragma: no cover - compiled
    """Column i's error ``ei`` (rows,) over the block's later columns: W1[k] −= ei·U1[i, k]."""
    for k in range(i + 1, W1.shape[0]):
        u = U1[i, k]
        wk = W1[k]
        for r in range(W1.shape[1]):
            wk[r] -= ei[r] * u


def int_codes(result: GPTQResult, grid: IntGrid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes (rows, cols) int32, scales (rows, groups) float32, zeros (rows, groups) int32) of an
    ``IntGrid`` result; dequantizing them through ``g_idx`` gives ``result.weight`` back."""
    scales = np.stack([p.scale for p in result.params], axis=1)
    zeros = np.stack([p.zero for p in result.params], axis=1)
    if result.codes is not None:
        return result.codes, scales, zeros.astype(np.int32)
    s, z = scales[:, result.g_idx], zeros[:, result.g_idx]
    codes = np.clip(np.rint(result.weight / s) + z, 0, grid.maxq).astype(np.int32)
    return codes, scales, zeros.astype(np.int32)


def dequantize(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, g_idx: np.ndarray) -> np.ndarray:
    """w = (q − z)·s with each column's group from ``g_idx``."""
    return ((codes - zeros[:, g_idx]).astype(np.float32) * scales[:, g_idx]).astype(np.float32)
