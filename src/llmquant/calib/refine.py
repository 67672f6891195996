"""Calibrated refinement of GGUF tensors: better values in ordinary ggml blocks (``quantize --refine``).

Pure math on numpy arrays. A tensor W (rows = output channels, columns = input channels) is encoded
against its layer's input statistics H = 2/n·XᵀX (``HessianStats``), so that the layer output
error tr(ΔHΔᵀ) is small, not each block's own weighted error as llama.cpp's imatrix encoders do:

- 32-block types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL): GPTQ column by column (``gptq.gptq``) on
  ``BlockGrid``, whose per-block scale (and min) is chosen at the block's first column by a wide
  search with a weighted least-squares refit given the codes (AutoRound's GGUF gain is mostly this),
  already rounded to the f16 the runtime reads; codes are then packed into the block layout by
  ``pack_blocks`` (the same bytes ggml's dequantizer reads back as the values GPTQ saw).
- 256-block K types (Q2_K … Q6_K): GPTQ column by column on ``KGrid``: at each super-block's first
  column the exact ggml encoder (``formats``) picks its scales and mins on the error-updated
  weights, with the diagonal of the block's effective Hessian as importance; the codes are then
  rounded column by column and written into the encoder's bytes by ``pack_k_codes``.

Error feedback acts on H shrunk toward its diagonal (``shrink_hessian``, 0.7 by default): the full
XᵀX of a few thousand calibration tokens lets GPTQ cancel errors along directions the text barely
spans, which halves the layer-output error on the calibration text and yet raised the end-to-end KLD
on SmolLM2 (0.91x of llama.cpp's imatrix quant with the full H, 0.61x shrunk). Each refined tensor is
kept only if its layer-output error under that H is below that of the plain imatrix encoding of the
same tensor (``Refined.kept``), so refinement never makes a tensor worse on the objective it
optimises. Before any of this ``calib.fold`` may fold AWQ-style per-channel scales into the
weights (``Refiner.folded``): the Refiner then sees the folded weights and uses H/(s sᵀ), the
statistics of the folded inputs. ``feedback_ratio`` is the diagnostic of how much error feedback can help a
layer: Σ 1/U_jj² / Σ H_jj (1: nothing; small: a lot).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
from numba import njit

from ..errors import CalibrationError
from ..formats import _kernels as K
from .gptq import gptq, hessian_inverse_upper, spread

QK = 32
DEFAULT_SHRINK = 0.7  # shrink_hessian's default: measured on SmolLM2 Q4_K_M (RESULTS.md)
IQ4NL_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.float32)

# type -> (kind, lowest code, highest code): codes as the dequantizer multiplies them
_LEGACY = {
    T.Q4_0: ("sym", -8, 7),
    T.Q5_0: ("sym", -16, 15),
    T.Q8_0: ("sym", -127, 127),  # not -128: ggml's AVX2 int8 dot takes |q| with sign tricks
    T.Q4_1: ("asym", 0, 15),
    T.Q5_1: ("asym", 0, 31),
    T.IQ4_NL: ("table", 0, 15),
}
K_TYPES = (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K)
BLOCK_TYPES = tuple(_LEGACY)
REFINABLE = BLOCK_TYPES + K_TYPES


def _f16(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, np.float32).astype(np.float16).astype(np.float32)


def _nearest_table(t: np.ndarray) -> np.ndarray:
    """Index of the nearest IQ4_NL value to each element of ``t`` (ties to the lower one)."""
    mid = (IQ4NL_VALUES[1:] + IQ4NL_VALUES[:-1]) * 0.5
    return np.searchsorted(mid, t, side="left").astype(np.int32)


@dataclass(frozen=True)
class BlockParams:
    d: np.ndarray  # (rows,) float32, f16-representable
    m: np.ndarray | None  # (rows,) float32 (asymmetric types), f16-representable


@dataclass
class BlockGrid:
    """One ggml 32-block type as a GPTQ grid (``gptq.Grid`` plus ``fit_group``).

    ``weights`` (columns,) are the per-column importances the scale search weights the squared error
    by; ``factors`` are the candidate scales relative to the block's plain one (max|w|/nmax for
    symmetric types, (max − min)/nmax for asymmetric ones), each only the start of a least-squares
    refit. (0.5 … 2.0 lowers the weighted error of the default model's Q5_0 blocks 12 % by re-finding
    its Q4_1 grid, and without error feedback its KLD 8 %, but with feedback raised it 9 %:
    RESULTS.md.)"""

    qtype: T
    weights: np.ndarray | None = None
    factors: np.ndarray = field(default_factory=lambda: np.linspace(0.55, 1.25, 71, dtype=np.float32))

    def __post_init__(self):
        if self.qtype not in _LEGACY:
            raise ValueError(f"{self.qtype.name} is not a 32-block type")
        self.kind, self.lo, self.hi = _LEGACY[self.qtype]

    # -- the Grid protocol -------------------------------------------------------------------
    def fit(self, w: np.ndarray) -> BlockParams:
        return self.fit_group(w, None)

    def fit_group(self, w: np.ndarray, group: int | None) -> BlockParams:
        w = np.asarray(w, np.float32)
        if group is None or self.weights is None:
            qw = np.ones(w.shape[-1], np.float32)
        else:
            qw = np.asarray(self.weights[group * QK:(group + 1) * QK], np.float32)
        return search_scale(w, qw, self.qtype, self.factors)

    def round(self, w: np.ndarray, p: BlockParams, j: int = 0) -> np.ndarray:
        return self.values(self.codes(w, p), p)

    def feedback(self, W1, U1, Q1, Err, p: BlockParams, lo: int, hi: int) -> None:
        """``gptq``'s compiled column loop (``gptq._grid_feedback``) over columns lo..hi of a block,
        all (block columns, rows), on ``p``: each column rounded as ``round`` rounds it."""
        m = p.m if p.m is not None else np.zeros_like(p.d)
        _feedback_columns(W1, U1, Q1, Err, np.ascontiguousarray(p.d, np.float32), np.ascontiguousarray(m, np.float32),
                          lo, hi, _KINDS[self.kind], self.lo, self.hi, IQ4NL_VALUES)

    # -- codes ------------------------------------------------------------------------------
    def codes(self, w: np.ndarray, p: BlockParams) -> np.ndarray:
        """Nearest codes of ``w`` ((rows,) or (rows, k)) on ``p``."""
        d = p.d if w.ndim == 1 else p.d[:, None]
        safe = np.where(d != 0, d, 1.0)
        if self.kind == "sym":
            q = np.where(d != 0, np.rint(w / safe), 0)
        elif self.kind == "asym":
            m = p.m if w.ndim == 1 else p.m[:, None]
            q = np.where(d != 0, np.rint((w - m) / safe), 0)
        else:
            return np.where(d != 0, _nearest_table(w / safe), _nearest_table(np.zeros_like(w)))
        return np.clip(q, self.lo, self.hi).astype(np.int32)

    def values(self, q: np.ndarray, p: BlockParams) -> np.ndarray:
        """What ggml's dequantizer gives for codes ``q`` on ``p`` (float32, same operation order)."""
        d = p.d if q.ndim == 1 else p.d[:, None]
        if self.kind == "sym":
            return (q.astype(np.float32) * d).astype(np.float32)
        if self.kind == "asym":
            m = p.m if q.ndim == 1 else p.m[:, None]
            return (q.astype(np.float32) * d + m).astype(np.float32)
        return (IQ4NL_VALUES[q] * d).astype(np.float32)


_KINDS = {"sym": 0, "asym": 1, "table": 2}


@njit(cache=True, nogil=True)
def _feedback_columns(W1, U1, Q1, Err, D, M, lo, hi, kind, qlo, qhi, table):  # pragma: no cover - compiled
    """Columns lo..hi of a GPTQ block, all (block columns, rows): round column i per row on its
    (d, m) exactly as ``BlockGrid.codes`` and ``values`` do, spread (w − ŵ)/U[i, i] over the block's
    later columns; float32 throughout, along the rows (contiguous here)."""
    rows = W1.shape[1]
    a = np.float32(qlo)
    b = np.float32(qhi)
    for i in range(lo, hi):
        u = U1[i, i]
        wi, qi, ei = W1[i], Q1[i], Err[i]
        for r in range(rows):
            w = wi[r]
            d = D[r]
            if kind == 0:
                v = _code_sym(w / d, a, b) * d if d != 0 else np.float32(0.0)
            elif kind == 1:
                v = (_code_sym((w - M[r]) / d, a, b) * d if d != 0 else np.float32(0.0)) + M[r]
            else:
                v = _code_table(w / d if d != 0 else np.float32(0.0), table) * d
            qi[r] = v
            ei[r] = (w - v) / u
        spread(W1, U1, ei, i)


# search_scale's loops (``_search_scaled`` for symmetric and IQ4_NL blocks, ``_search_asym``), float32
# throughout with reciprocal products instead of divisions (the asymmetric refit's normal equations in
# float64): 3-5x faster than float64 sums, and the same scale for all but ~1 block in 10⁴ (near-ties).

@njit(nogil=True, cache=True, fastmath=True, inline="always")
def _peak(x):  # pragma: no cover - compiled
    """The value of largest magnitude (the first of equals)."""
    peak = x[0]
    for j in range(x.shape[0]):
        if abs(x[j]) > abs(peak):
            peak = x[j]
    return peak


@njit(nogil=True, cache=True, fastmath=True, inline="always")
def _code_sym(t, lo, hi):  # pragma: no cover - compiled
    """t rounded to the nearest integer code in lo … hi."""
    return min(max(np.rint(t), lo), hi)


@njit(nogil=True, cache=True, fastmath=True, inline="always")
def _code_table(t, table):  # pragma: no cover - compiled
    """The nearest IQ4_NL value (ties to the lower one)."""
    i = 0
    while i < 15 and t > (table[i] + table[i + 1]) * np.float32(0.5):
        i += 1
    return table[i]


@njit(nogil=True, cache=True, fastmath=True)
def _search_scaled(w, qw, factors, lo_, hi_, table, div, use_table, d_out):  # pragma: no cover - compiled
    """Types whose values are d·code(x/d): symmetric (``_code_sym``; div = lo: the value of largest
    magnitude onto the far end of the codes) and IQ4_NL (``_code_table``; div = table[0]). Base
    d = peak/div, each candidate base × factor refitted by least squares given its codes.
    (``use_table`` is the same for every iteration: LLVM hoists the branch, 5 % slower than two
    functions.)"""
    lo = np.float32(lo_)
    hi = np.float32(hi_)
    for r in range(w.shape[0]):
        x = w[r]
        base = _peak(x) / div
        best = np.float32(np.inf)
        bd = np.float32(0.0)
        for k in range(factors.shape[0]):
            d0 = np.float32(base * factors[k])
            d = np.float32(0.0)
            if d0 != 0:
                inv = np.float32(1.0) / d0
                num = np.float32(0.0)
                den = np.float32(0.0)
                for j in range(x.shape[0]):
                    t = x[j] * inv
                    v = _code_table(t, table) if use_table else _code_sym(t, lo, hi)
                    num += qw[j] * v * x[j]
                    den += qw[j] * v * v
                d = K.fp16_to_fp32(K.fp32_to_fp16(np.float32(num / den) if den > 0 else d0))
            err = np.float32(0.0)
            inv = np.float32(1.0) / d if d != 0 else np.float32(0.0)
            for j in range(x.shape[0]):
                t = x[j] * inv
                e = x[j] - (_code_table(t, table) if use_table else _code_sym(t, lo, hi)) * d
                err += qw[j] * e * e
            if err < best:
                best = err
                bd = d
        d_out[r] = bd


@njit(nogil=True, cache=True, fastmath=True, inline="always")
def _err_asym(x, qw, d, m, lo, hi):  # pragma: no cover - compiled
    err = np.float32(0.0)
    inv = np.float32(1.0) / d if d != 0 else np.float32(0.0)
    for j in range(x.shape[0]):
        e = x[j] - (_code_sym((x[j] - m) * inv, lo, hi) * d + m)
        err += qw[j] * e * e
    return err


@njit(nogil=True, cache=True, fastmath=True)
def _search_asym(w, qw, factors, lo_, hi_, d_out, m_out):  # pragma: no cover - compiled
    """Asymmetric types: d from (max − min)/hi × each factor, then d and m refitted together."""
    lo = np.float32(lo_)
    hi = np.float32(hi_)
    for r in range(w.shape[0]):
        x = w[r]
        mn = x[0]
        mx = x[0]
        for j in range(x.shape[0]):
            mn = min(mn, x[j])
            mx = max(mx, x[j])
        base = (mx - mn) / hi
        best = np.float32(np.inf)
        bd = np.float32(0.0)
        bm = np.float32(0.0)
        for k in range(factors.shape[0]):
            d0 = np.float32(base * factors[k])
            if d0 == 0:
                d = np.float32(0.0)
                m = K.fp16_to_fp32(K.fp32_to_fp16(mn))
            else:
                inv = np.float32(1.0) / d0
                sw = swq = swq2 = swx = swqx = 0.0
                for j in range(x.shape[0]):
                    q = _code_sym((x[j] - mn) * inv, lo, hi)
                    sw += qw[j]
                    swq += qw[j] * q
                    swq2 += qw[j] * q * q
                    swx += qw[j] * x[j]
                    swqx += qw[j] * q * x[j]
                det = swq2 * sw - swq * swq
                if det > 0:
                    d = np.float32((sw * swqx - swq * swx) / det)
                    m = np.float32((swq2 * swx - swq * swqx) / det)
                else:
                    d, m = d0, mn
                d = K.fp16_to_fp32(K.fp32_to_fp16(d))
                m = K.fp16_to_fp32(K.fp32_to_fp16(m))
            err = _err_asym(x, qw, d, m, lo, hi)
            if err < best:
                best = err
                bd = d
                bm = m
        d_out[r] = bd
        m_out[r] = bm


def search_scale(w: np.ndarray, qw: np.ndarray, qtype: T, factors: np.ndarray) -> BlockParams:
    """Per row of ``w`` (rows, 32): the f16 scale (and min) with the least Σ qw·(w − ŵ)² over the
    candidate scales ``factors`` × the plain one (max|w|/nmax with the sign that maps the peak onto
    the far end of the codes, as llama.cpp's d = max / −nmax; (max − min)/nmax for asymmetric
    types), each refitted by weighted least squares given its codes, rounded to f16 and its codes
    re-rounded on it."""
    kind, lo, hi = _LEGACY[qtype]
    w = np.ascontiguousarray(w, np.float32)
    d = np.empty(w.shape[0], np.float32)
    m = np.empty(w.shape[0], np.float32)
    qw = np.ascontiguousarray(qw, np.float32)
    factors = np.ascontiguousarray(factors, np.float32)
    if kind == "sym":
        _search_scaled(w, qw, factors, lo, hi, IQ4NL_VALUES, np.float32(lo), False, d)
    elif kind == "asym":
        _search_asym(w, qw, factors, lo, hi, d, m)
    else:
        _search_scaled(w, qw, factors, lo, hi, IQ4NL_VALUES, IQ4NL_VALUES[0], True, d)
    return BlockParams(d, m if kind == "asym" else None)


def pack_blocks(qtype: T, codes: np.ndarray, d: np.ndarray, m: np.ndarray | None = None) -> np.ndarray:
    """ggml block bytes from codes (rows, nb, 32) as the dequantizer multiplies them and per-block
    f16 parameters d, m (rows, nb): uint8 (rows, nb · type_size)."""
    kind, lo, hi = _LEGACY[qtype]
    rows, nb, _ = codes.shape
    _, type_size = GGML_QUANT_SIZES[qtype]
    out = np.zeros((rows, nb, type_size), np.uint8)
    out[..., 0:2] = np.asarray(d, np.float16).reshape(rows, nb, 1).view(np.uint8)
    o = 2
    if kind == "asym":
        out[..., 2:4] = np.asarray(m, np.float16).reshape(rows, nb, 1).view(np.uint8)
        o = 4
    if qtype == T.Q8_0:
        out[..., 2:] = codes.astype(np.int8).view(np.uint8)
        return out.reshape(rows, nb * type_size)
    u = (codes - lo).astype(np.uint32) if kind == "sym" else codes.astype(np.uint32)  # stored 0..2^b-1
    if qtype in (T.Q5_0, T.Q5_1):
        bits = (u >> 4) & 1
        qh = (bits << np.arange(32, dtype=np.uint32)).sum(-1, dtype=np.uint32)
        out[..., o:o + 4] = qh.astype("<u4").reshape(rows, nb, 1).view(np.uint8)
        o += 4
    out[..., o:o + 16] = ((u[..., :16] & 0xF) | ((u[..., 16:] & 0xF) << 4)).astype(np.uint8)
    return out.reshape(rows, nb * type_size)


# -- error measures ---------------------------------------------------------------------------------

def shrink_hessian(H: np.ndarray, shrink: float) -> np.ndarray:
    """(1 − shrink)·H + shrink·diag(H): the input correlations error feedback acts on, pulled toward
    none (0: H itself; 1: its diagonal, no feedback). A full H estimated from a few thousand tokens
    lets GPTQ cancel errors along directions the calibration text barely spans; on SmolLM2 shrink 0.7
    cuts Q4_K_M's mean KLD to 0.61x of llama.cpp's imatrix quant where 0 gives 0.91x (RESULTS.md)."""
    if not 0.0 <= shrink <= 1.0:
        raise ValueError(f"shrink {shrink}: expected a number from 0 to 1")
    H = np.asarray(H, np.float64)
    if shrink == 0.0:
        return H
    out = H * (1.0 - shrink)
    out[np.diag_indices_from(out)] = np.diag(H)
    return out


def output_error(delta: np.ndarray, H: np.ndarray) -> float:
    """tr(Δ H Δᵀ): the layer output error of weight error Δ (rows, cols) under H (cols, cols); the
    product in float32 (2x the float64 rate; relative error ~1e-6), summed in float64."""
    delta = np.asarray(delta, np.float32)
    return float(np.sum((delta @ np.asarray(H, np.float32)) * delta, dtype=np.float64))


def feedback_ratio(H: np.ndarray, damp: float = 0.01, U: np.ndarray | None = None) -> float:
    """Σ_j 1/U_jj² / Σ_j H_jj (H⁻¹ = UᵀU after damping): the share of independent rounding's
    layer-output error left when every column's error is fed forward (1: feedback cannot help)."""
    if U is None:
        U, _ = hessian_inverse_upper(H, damp)
    return float(np.sum(1.0 / np.diag(U).astype(np.float64) ** 2) / np.sum(np.diag(H)))


def block_weights(U: np.ndarray, block: int) -> np.ndarray:
    """diag((U_BBᵀU_BB)⁻¹) for each block of ``block`` columns: the diagonal of the effective
    Hessian of a block quantized while the later columns compensate (GPTQ's U, H⁻¹ = UᵀU)."""
    n = U.shape[0]
    out = np.empty(n, np.float64)
    for c in range(0, n, block):
        Ub = U[c:c + block, c:c + block].astype(np.float64)
        inv = np.linalg.inv(Ub)
        out[c:c + block] = np.einsum("ij,ij->i", inv, inv)
    return out


# -- the two encoders -------------------------------------------------------------------------------

@dataclass
class Refined:
    data: np.ndarray  # uint8 (rows, row bytes): the tensor's ggml blocks
    values: np.ndarray  # float32 (rows, cols): what the runtime dequantizes
    error: float  # tr(ΔHΔᵀ) of the kept encoding
    plain_error: float  # tr(ΔHΔᵀ) of the plain imatrix encoding
    feedback_ratio: float
    kept: bool  # True: the refined encoding; False: it was worse, the plain one is kept
    method: str

    @property
    def gain(self) -> float:
        """Layer-output error of the plain encoding over the kept one (≥ 1)."""
        return self.plain_error / self.error if self.error > 0 else float("inf")


Encoder = Callable[[np.ndarray, np.ndarray | None], np.ndarray]
Decoder = Callable[[np.ndarray, tuple[int, int]], np.ndarray]


def refine_block_type(W: np.ndarray, H: np.ndarray, qtype: T, *, damp: float = 0.01, weighting: str = "ldl",
                      hinv: tuple[np.ndarray, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ over a 32-block type: (bytes (rows, row bytes), values (rows, cols))."""
    W = np.asarray(W, np.float32)
    rows, cols = W.shape
    if cols % QK:
        raise ValueError(f"{cols} columns are not a multiple of {QK}")
    hinv = hinv or hessian_inverse_upper(H, damp)
    weights = _weights(H, weighting, QK, hinv[0])
    grid = BlockGrid(qtype, weights)
    res = gptq(W, H, grid, QK, damp=damp, hinv_upper=hinv)
    nb = cols // QK
    blocks = res.weight.reshape(rows, nb, QK)
    codes = np.stack([grid.codes(blocks[:, k], p) for k, p in enumerate(res.params)], axis=1)
    d = np.stack([p.d for p in res.params], axis=1)
    m = np.stack([p.m for p in res.params], axis=1) if res.params[0].m is not None else None
    values = np.stack([grid.values(codes[:, k], p) for k, p in enumerate(res.params)], axis=1)
    return pack_blocks(qtype, codes, d, m), values.reshape(rows, cols)


# -- K types: the real encoder picks a super-block's scales, GPTQ picks its codes ------------------

# type -> (highest stored code, code packer)
def _pack_q4_k(b, u):  # d, dmin, scales[12], qs[128]: qs[32·c + l] = L[64c + l] | L[64c + 32 + l] << 4
    v = u.reshape(*u.shape[:-1], 4, 2, 32)
    b[..., 16:144] = (v[..., 0, :] | (v[..., 1, :] << 4)).reshape(*u.shape[:-1], 128)


def _pack_q5_k(b, u):  # d, dmin, scales[12], qh[32], qs[128]
    v = u.reshape(*u.shape[:-1], 4, 2, 32)
    b[..., 48:176] = ((v[..., 0, :] & 0xF) | ((v[..., 1, :] & 0xF) << 4)).reshape(*u.shape[:-1], 128)
    hi = (v >> 4) & 1  # bit 2c of qh[l] for L[64c + l], bit 2c+1 for L[64c + 32 + l]
    shift = (2 * np.arange(4)[:, None] + np.arange(2)[None, :]).astype(np.uint8)[..., None]
    b[..., 16:48] = (hi << shift).sum(axis=(-3, -2), dtype=np.uint8)


def _pack_q6_k(b, u):  # ql[128], qh[64], scales[16], d
    v = u.reshape(*u.shape[:-1], 2, 4, 32)  # two halves of 128, four rows of 32
    lo, hi = v & 0xF, v >> 4
    ql = np.concatenate([lo[..., 0, :] | (lo[..., 2, :] << 4), lo[..., 1, :] | (lo[..., 3, :] << 4)], axis=-1)
    b[..., 0:128] = ql.reshape(*u.shape[:-1], 128)
    shift = (2 * np.arange(4)).astype(np.uint8)[:, None]
    b[..., 128:192] = (hi << shift).sum(axis=-2, dtype=np.uint8).reshape(*u.shape[:-1], 64)


def _pack_2bit_rows(u):  # qs[32·h + l] = L[128h + l] | L[128h+32+l] << 2 | L[..+64] << 4 | L[..+96] << 6
    v = u.reshape(*u.shape[:-1], 2, 4, 32) & 3
    shift = (2 * np.arange(4)).astype(np.uint8)[:, None]
    return (v << shift).sum(axis=-2, dtype=np.uint8).reshape(*u.shape[:-1], 64)


def _pack_q3_k(b, u):  # hmask[32], qs[64], scales[12], d: bit (j // 32) of hmask[j % 32] = bit 2 of L[j]
    hi = ((u >> 2) & 1).reshape(*u.shape[:-1], 8, 32)
    shift = np.arange(8, dtype=np.uint8)[:, None]
    b[..., 0:32] = (hi << shift).sum(axis=-2, dtype=np.uint8)
    b[..., 32:96] = _pack_2bit_rows(u & 3)


def _pack_q2_k(b, u):  # scales[16], qs[64], d, dmin
    b[..., 16:80] = _pack_2bit_rows(u)


K_CODES = {T.Q2_K: (3, _pack_q2_k), T.Q3_K: (7, _pack_q3_k), T.Q4_K: (15, _pack_q4_k),
           T.Q5_K: (31, _pack_q5_k), T.Q6_K: (63, _pack_q6_k)}


def pack_k_codes(qtype: T, data: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """``data`` (rows, nsb · type_size) K-quant bytes with their codes replaced by ``codes`` (rows, nsb · 256,
    stored values 0 … 2^bits − 1; Q3_K's as ``q + 4``), scales untouched."""
    top, pack = K_CODES[qtype]
    _, type_size = GGML_QUANT_SIZES[qtype]
    rows = data.shape[0]
    b = np.array(data, np.uint8).reshape(rows, -1, type_size)
    pack(b, np.clip(codes, 0, top).astype(np.uint8).reshape(rows, b.shape[1], 256))
    return b.reshape(rows, -1)


@dataclass(frozen=True)
class KParams:
    data: np.ndarray  # (rows, type_size): the encoder's bytes (scales are what count)
    v0: np.ndarray  # (rows, 256): value of code 0
    step: np.ndarray  # (rows, 256): value of code 1 minus code 0


@dataclass
class KGrid:
    """A K type as a GPTQ grid over 256-column groups: ``fit_group`` runs the exact ggml encoder on the
    error-updated super-block (with the block's importances) for its scales and mins; the codes
    are then chosen column by column, value = v0 + step·code per element (read off the decoder)."""

    qtype: T
    encode: Encoder
    decode: Decoder
    weights: np.ndarray | None = None

    def fit(self, w: np.ndarray) -> KParams:
        return self.fit_group(w, None)

    def fit_group(self, w: np.ndarray, group: int | None) -> KParams:
        w = np.ascontiguousarray(w, np.float32)
        qw = None if group is None or self.weights is None else np.ascontiguousarray(self.weights[group * 256:(group + 1) * 256])
        data = self.encode(w, qw)
        zero = pack_k_codes(self.qtype, data, np.zeros(w.shape, np.uint8))
        one = pack_k_codes(self.qtype, data, np.ones(w.shape, np.uint8))
        v0 = self.decode(zero, w.shape)
        return KParams(data, v0, self.decode(one, w.shape) - v0)

    def codes(self, w: np.ndarray, p: KParams, j: int | slice = slice(None)) -> np.ndarray:
        step, v0 = p.step[:, j], p.v0[:, j]
        u = np.where(step != 0, np.rint((w - v0) / np.where(step != 0, step, 1.0)), 0)
        return np.clip(u, 0, K_CODES[self.qtype][0]).astype(np.int32)

    def round(self, w: np.ndarray, p: KParams, j: int = 0) -> np.ndarray:
        return (p.v0[:, j] + p.step[:, j] * self.codes(w, p, j)).astype(np.float32)


def refine_k_type(W: np.ndarray, H: np.ndarray, qtype: T, encode: Encoder, decode: Decoder, *,
                  damp: float = 0.01, weighting: str = "ldl", hinv: tuple[np.ndarray, float] | None = None,
                  ) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ over a K type with the real encoder's super-block scales: (bytes, decoded values)."""
    W = np.asarray(W, np.float32)
    rows, cols = W.shape
    hinv = hinv or hessian_inverse_upper(H, damp)
    grid = KGrid(qtype, encode, decode, _weights(H, weighting, 256, hinv[0]))
    res = gptq(W, H, grid, 256, damp=damp, hinv_upper=hinv)
    parts = []
    for k, p in enumerate(res.params):
        codes = grid.codes(res.weight[:, k * 256:(k + 1) * 256], p)
        parts.append(pack_k_codes(qtype, p.data, codes))
    data = np.concatenate(parts, axis=1)
    return data, decode(data, (rows, cols))


def _weights(H: np.ndarray, weighting: str, block: int, U: np.ndarray) -> np.ndarray | None:
    """Per-column importances for the block encoders: ``ldl`` the effective block Hessian's diagonal,
    ``imatrix`` E[x²] = diag(H)/2 (what llama.cpp weights by), ``none`` uniform."""
    if weighting == "none":
        return None
    if weighting == "imatrix":
        return (np.diag(H) / 2).astype(np.float32)
    if weighting == "ldl":
        return block_weights(U, block).astype(np.float32)
    raise ValueError(f"weighting {weighting!r}: expected ldl, imatrix or none")


def refine_tensor(W: np.ndarray, H: np.ndarray, qtype: T, encode: Encoder, decode: Decoder, *,
                  damp: float = 0.01, weighting: str = "ldl", plain: Any = None,
                  hinv: tuple[np.ndarray, float] | None = None) -> Refined:
    """The refined ggml bytes of ``W`` as ``qtype`` against ``H``, or the plain imatrix encoding
    (``encode(W, diag(H)/2)``, or ``plain`` bytes when given) when that has the smaller layer-output
    error."""
    W = np.asarray(W, np.float32)
    H = np.asarray(H, np.float64)
    if plain is None:
        plain = encode(np.ascontiguousarray(W), (np.diag(H) / 2).astype(np.float32))
    plain_values = decode(plain, W.shape)
    e_plain = output_error(W - plain_values, H)
    hinv = hinv or hessian_inverse_upper(H, damp)
    if qtype in BLOCK_TYPES:
        data, values, method = *refine_block_type(W, H, qtype, damp=damp, weighting=weighting, hinv=hinv), "gptq"
    elif qtype in K_TYPES:
        data, values, method = *refine_k_type(W, H, qtype, encode, decode, damp=damp, weighting=weighting,
                                              hinv=hinv), "gptq"
    else:
        raise ValueError(f"{qtype.name} cannot be refined; refinable: {', '.join(t.name for t in REFINABLE)}")
    e = output_error(W - values, H)
    rho = feedback_ratio(H, damp, hinv[0])
    if e <= e_plain:
        return Refined(data, values, e, e_plain, rho, True, method)
    return Refined(np.asarray(plain), plain_values, e_plain, e_plain, rho, False, method)


# -- calibration statistics: each layer's XᵀX from the runtime's forward pass -----------------------

@dataclass
class HessianStats:
    """H = 2/n·XᵀX (float64) per ``blk.*`` weight, from the runtime's matmul inputs (a sink for
    ``runtime.llama.MatmulTap``). Weights fed the very same input tensor one after the other
    (attn_q/attn_k/attn_v, ffn_gate/ffn_up) share one matrix; a weight whose input later differs
    from the one it shared is refused. Experts (MUL_MAT_ID) are not collected. While collecting,
    each matrix holds the plain sum XᵀX (one add per batch, in place); ``hessians`` scales them to
    2/n·XᵀX, once and in place, and after that no input can be added."""

    sums: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    alias: dict[str, str] = field(default_factory=dict)
    _last: tuple[str, Any] | None = None
    _fingerprint: dict[str, Any] = field(default_factory=dict)
    _pending: dict[str, list] = field(default_factory=dict)  # name -> [buffer (rows, in), rows filled]
    _scaled: bool = False

    @staticmethod
    def wants(name: str) -> bool:
        return name.startswith("blk.")

    def add(self, inp: Any) -> None:
        if inp.op != "MUL_MAT":
            return
        if self._scaled:
            raise RuntimeError("HessianStats.add after the matrices were read: the statistics are final")
        x = np.asarray(inp.x)
        x2 = x.reshape(-1, x.shape[-1])
        fp = (x2.ctypes.data, x2.shape, x2[0, :8].tobytes(), x2[-1, -8:].tobytes())
        name = inp.name
        if name in self.alias:
            if self._fingerprint.get(self.alias[name]) != fp:
                raise CalibrationError(f"tensor {name!r}: its input is no longer {self.alias[name]!r}'s; "
                                       "cannot share one Hessian")
            return
        if name not in self.sums and self._last is not None and self._last[1] == fp:
            self.alias[name] = self._last[0]
            return
        if not np.isfinite(x2).all():
            raise CalibrationError(f"tensor {name!r}: NaN or Inf in its input activations")
        if name not in self.sums:
            self.sums[name] = np.zeros((x2.shape[1], x2.shape[1]), np.float64)
            self.counts[name] = 0
        # copied now, multiplied in ``flush`` once the runtime is idle: a BLAS product inside the eval
        # callback competes with the runtime's own worker threads for the cores. Each weight's inputs
        # of one decode (its micro-batches) are stacked in one buffer kept between flushes: one
        # product over 2048 rows runs at 1.4x the rate of four over 512 (OpenBLAS syrk, 1536 wide),
        # and fresh buffers would page-fault every decode (~9 s of 70 s)
        slot = self._pending.setdefault(name, [np.empty((0, x2.shape[1]), np.float32), 0])
        buf, n = slot
        if n + x2.shape[0] > buf.shape[0]:
            grown = np.empty((n + x2.shape[0], x2.shape[1]), np.float32)
            grown[:n] = buf[:n]
            slot[0] = buf = grown
        np.copyto(buf[n:n + x2.shape[0]], x2)
        slot[1] = n + x2.shape[0]
        self._last = (name, fp)
        self._fingerprint[name] = fp

    def flush(self) -> None:
        """Add the inputs collected since the last flush to their sums: XᵀX in float32 (numpy's
        syrk for ``x.T @ x``), added into the float64 sum in one pass."""
        for name, slot in self._pending.items():  # in place: names sharing this matrix see it
            buf, n = slot
            if n:
                x2 = buf[:n]
                np.add(self.sums[name], x2.T @ x2, out=self.sums[name])
                self.counts[name] += n
                slot[1] = 0

    @property
    def hessians(self) -> dict[str, np.ndarray]:
        """Each collected weight's H = 2/n·XᵀX (the sums scaled in place, the first time)."""
        if not self._scaled:
            self.flush()
            for name, S in self.sums.items():
                S *= 2.0 / max(self.counts[name], 1)
            self._scaled = True
            self._pending.clear()
        return self.sums

    def get(self, name: str) -> np.ndarray | None:
        return self.hessians.get(self.alias.get(name, name))

    @property
    def nbytes(self) -> int:
        return sum(h.nbytes for h in self.sums.values())


@dataclass
class TensorReport:
    name: str
    type: str
    method: str
    kept: bool
    gain: float  # plain layer-output error / kept one
    feedback_ratio: float
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


_HINV_KEPT = 4  # factorised Hessians a Refiner keeps: a decoder layer's four distinct inputs


@dataclass
class Refiner:
    """What ``quantize_model(refine=...)`` calls per tensor: refined bytes for a tensor with a
    Hessian and a refinable type, None otherwise (the plain path encodes it). Each Hessian is shrunk
    by ``shrink`` toward its diagonal (``shrink_hessian``) once, for all the tensors that share it."""

    stats: HessianStats
    encoders: Callable[[T], tuple[Encoder, Decoder]]
    damp: float = 0.01
    weighting: str = "ldl"
    shrink: float = DEFAULT_SHRINK
    reports: list[TensorReport] = field(default_factory=list)
    on_tensor: Callable[[TensorReport], None] | None = None
    folded: Any = None  # calib.fold.FoldedScales: the weights come folded, their inputs' H is H/(s sᵀ)
    # the shrunk H and (U, damp) of this layer's last few Hessians by id: q/k/v and gate/up share
    # one, and llama.cpp's tensor order (attn_k, attn_output, attn_q, attn_v, ...) interleaves them
    _hinv: dict[int, tuple[np.ndarray, tuple[np.ndarray, float]]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self):
        self.stats.hessians  # scaled now, once, before any thread reads them  # noqa: B018

    def _column_scale(self, name: str) -> np.ndarray | None:
        return self.folded.hessian_scale(name) if self.folded is not None else None

    def importance(self, name: str) -> np.ndarray | None:
        """E[x²] per input column (llama-imatrix's importance) from the Hessian."""
        H = self.stats.get(name)
        if H is None:
            return None
        c = self._column_scale(name)
        imp = np.diag(H) / 2
        return (imp if c is None else imp / c.astype(np.float64) ** 2).astype(np.float32)

    def __call__(self, name: str, qtype: T, rows: np.ndarray, plain: np.ndarray | None = None) -> np.ndarray | None:
        import time

        H = self.stats.get(name)
        if H is None or qtype not in REFINABLE or H.shape[0] != rows.shape[1]:
            return None
        t0 = time.perf_counter()
        encode, decode = self.encoders(qtype)
        with self._lock:  # tensors are refined on several threads (quantize._refined_tensors)
            cached = self._hinv.get(id(H))
            if cached is None:
                Hs = shrink_hessian(H, self.shrink)
                c = self._column_scale(name)
                if c is not None:  # the tensors sharing H are one fold's linears: one column scale
                    c = c.astype(np.float64)
                    Hs = Hs / np.outer(c, c)
                cached = self._hinv[id(H)] = (Hs, hessian_inverse_upper(Hs, self.damp))
                while len(self._hinv) > _HINV_KEPT:
                    del self._hinv[next(iter(self._hinv))]
        r = refine_tensor(rows, cached[0], qtype, encode, decode, damp=self.damp, weighting=self.weighting,
                          plain=plain, hinv=cached[1])
        rep = TensorReport(name, qtype.name, r.method, r.kept, round(r.gain, 4), round(r.feedback_ratio, 4),
                           round(time.perf_counter() - t0, 3))
        with self._lock:
            self.reports.append(rep)
            if self.on_tensor:
                self.on_tensor(rep)
        return r.data
