"""Legacy 32-element block types Q4_0, Q4_1, Q5_0, Q5_1, Q8_0.

Same arithmetic as ``quantize_row_qN_M_ref`` (no importance) and ``quantize_row_qN_M_impl``
(importance-weighted) in ggml/src/ggml-quants.c, which libggml compiles without FMA contraction:
sequential float32 in source order, so each kernel is a literal numba translation with every
constant pinned to float32. The kernels return the block fields (``d``, ``m``, quants); packing
into bytes and the fp16 rounding of ``d``/``m`` (RNE, as ``GGML_FP32_TO_FP16``) happen in numpy.

    block_q4_0: d:f16 | qs[16]              qs[j] = q[j] | q[j+16] << 4
    block_q4_1: d:f16 | m:f16 | qs[16]
    block_q5_0: d:f16 | qh[4] | qs[16]      bit j of qh = bit 4 of q[j]
    block_q5_1: d:f16 | m:f16 | qh[4] | qs[16]
    block_q8_0: d:f16 | qs[32] (int8)
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from numba import njit

from . import _kernels as K
from .base import QuantFormat

QK = 32
F0 = np.float32(0.0)
F1 = np.float32(1.0)
FLT_MAX = np.float32(np.finfo(np.float32).max)
INT_MIN = -2147483648


@njit(nogil=True, cache=True, inline="always")
def _cvtt_i32(v):
    """C ``(int)v`` as x86 ``cvttss2si`` does it: NaN and out-of-range give INT_MIN."""
    if not (v > np.float32(-2147483904.0) and v < np.float32(2147483648.0)):
        return INT_MIN
    return int(v)


@njit(nogil=True, cache=True, inline="always")
def _as_i8(i):
    """Truncate an int to int8 (two's complement), as a C cast does."""
    b = i & 0xFF
    return b - 256 if b >= 128 else b


@njit(nogil=True, cache=True)
def _sigma2(x):
    # float sum_x2 accumulated in order, as the C loop does
    s = F0
    for j in range(x.shape[0]):
        s += x[j] * x[j]
    return s / np.float32(x.shape[0])


# ---- symmetric types: Q4_0 (nmax 8), Q5_0 (nmax 16) -------------------------------------------

@njit(nogil=True, cache=True)
def _quantize_sym(rows, qw, use_qw, nmax):
    """Returns d (n, nb) float32 and q (n, nb, 32) uint8 in [0, 2*nmax)."""
    n, k = rows.shape
    nb = k // QK
    d_out = np.empty((n, nb), dtype=np.float32)
    q_out = np.empty((n, nb, QK), dtype=np.uint8)
    weight = np.empty(QK, dtype=np.float32)
    L = np.empty(QK, dtype=np.int8)
    fnmax = np.float32(-nmax)
    half = np.float32(nmax) + np.float32(0.5)
    qmax = 2 * nmax - 1
    for r in range(n):
        x = rows[r]
        if use_qw:
            sigma2 = _sigma2(x)
        for ib in range(nb):
            xb = x[ib * QK:(ib + 1) * QK]
            if use_qw:
                for j in range(QK):
                    weight[j] = qw[ib * QK + j] * np.sqrt(sigma2 + xb[j] * xb[j])
                d = K.make_qx_quants(QK, nmax, xb, L, 1, weight)
                d_out[r, ib] = d
                for j in range(QK):
                    q_out[r, ib, j] = L[j] & 0xFF
                continue
            amax = F0
            vmax = F0
            for j in range(QK):
                v = xb[j]
                if amax < abs(v):
                    amax = abs(v)
                    vmax = v
            d = vmax / fnmax
            iD = F1 / d if d != F0 else F0
            d_out[r, ib] = d
            for j in range(QK):
                xi = _as_i8(_cvtt_i32(xb[j] * iD + half))
                q_out[r, ib, j] = min(qmax, xi) & 0xFF
    return d_out, q_out


# ---- asymmetric types: Q4_1 (nmax 15), Q5_1 (nmax 31) ------------------------------------------

@njit(nogil=True, cache=True)
def _quantize_asym(rows, qw, use_qw, nmax, clamp):
    """Returns d, m (n, nb) float32 and q (n, nb, 32) uint8 in [0, nmax]."""
    n, k = rows.shape
    nb = k // QK
    d_out = np.empty((n, nb), dtype=np.float32)
    m_out = np.empty((n, nb), dtype=np.float32)
    q_out = np.empty((n, nb, QK), dtype=np.uint8)
    weight = np.empty(QK, dtype=np.float32)
    L = np.empty(QK, dtype=np.uint8)
    Laux = np.empty(QK, dtype=np.uint8)
    the_min = np.empty(1, dtype=np.float32)
    fnmax = np.float32(nmax)
    half = np.float32(0.5)
    for r in range(n):
        x = rows[r]
        if use_qw:
            sigma2 = _sigma2(x)
        for ib in range(nb):
            xb = x[ib * QK:(ib + 1) * QK]
            if use_qw:
                for j in range(QK):
                    weight[j] = qw[ib * QK + j] * np.sqrt(sigma2 + xb[j] * xb[j])
                d = K.make_qkx3_quants(QK, nmax, xb, weight, L, the_min, Laux,
                                       np.float32(-0.9), np.float32(0.05), 36, False)
                d_out[r, ib] = d
                m_out[r, ib] = -the_min[0]
                for j in range(QK):
                    q_out[r, ib, j] = L[j]
                continue
            vmin = FLT_MAX
            vmax = -FLT_MAX
            for j in range(QK):
                v = xb[j]
                if v < vmin:
                    vmin = v
                if v > vmax:
                    vmax = v
            d = (vmax - vmin) / fnmax
            iD = F1 / d if d != F0 else F0
            d_out[r, ib] = d
            m_out[r, ib] = vmin
            for j in range(QK):
                xi = _as_i8(_cvtt_i32((xb[j] - vmin) * iD + half))
                if clamp:  # Q4_1 clamps with MIN(15, (int8_t)...); Q5_1 casts to uint8_t only
                    xi = min(nmax, xi)
                q_out[r, ib, j] = xi & 0xFF
    return d_out, m_out, q_out


# ---- Q8_0 ----------------------------------------------------------------------------------------

@njit(nogil=True, cache=True)
def _roundf(v):
    """C ``roundf``: half away from zero (exact: a - floor(a) is exact in float32)."""
    a = abs(v)
    f = np.floor(a)
    r = f + np.floor(np.float32(2.0) * (a - f))
    return -r if v < F0 else r


@njit(nogil=True, cache=True)
def _quantize_q8_0(rows):
    n, k = rows.shape
    nb = k // QK
    d_out = np.empty((n, nb), dtype=np.float32)
    q_out = np.empty((n, nb, QK), dtype=np.uint8)
    for r in range(n):
        for ib in range(nb):
            xb = rows[r, ib * QK:(ib + 1) * QK]
            amax = F0
            for j in range(QK):
                amax = max(amax, abs(xb[j]))
            d = amax / np.float32(127.0)
            iD = F1 / d if d != F0 else F0
            d_out[r, ib] = d
            for j in range(QK):
                # int8_t = roundf(float): float -> int8 conversion, x86 cvttss2si + low byte
                q_out[r, ib, j] = _as_i8(_cvtt_i32(_roundf(xb[j] * iD))) & 0xFF
    return d_out, q_out


# ---- packing ----------------------------------------------------------------------------------------

def _f16_bytes(v: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return v.astype(np.float16).view(np.uint8).reshape(*v.shape, 2)


def _nibbles(q: np.ndarray, mask_low: bool) -> np.ndarray:
    """(…, 32) quants -> (…, 16) bytes: low nibble q[j], high nibble q[j+16].

    The Q4 kernels store ``q[j] | q[j+16] << 4`` unmasked, the Q5 ones mask the low part.
    """
    low = q[..., :16] & 0x0F if mask_low else q[..., :16]
    return (low | (q[..., 16:] << 4)).astype(np.uint8)


def _high_bits(q: np.ndarray) -> np.ndarray:
    """(…, 32) 5-bit quants -> (…, 4) bytes of qh (little-endian uint32, bit j = bit 4 of q[j])."""
    return np.packbits((q >> 4) & 1, axis=-1, bitorder="little")


def _importance_args(importance, k):
    if importance is None:
        return np.zeros(k, dtype=np.float32), False
    return importance, True


class Q4_0(QuantFormat, qtype=GGMLQuantizationType.Q4_0):
    uses_importance = True

    @classmethod
    def quantize_rows(cls, rows, importance):
        d, q = _quantize_sym(rows, *_importance_args(importance, rows.shape[1]), 8)
        out = np.concatenate([_f16_bytes(d), _nibbles(q, False)], axis=-1)
        return out.reshape(rows.shape[0], -1)


class Q5_0(QuantFormat, qtype=GGMLQuantizationType.Q5_0):
    uses_importance = True

    @classmethod
    def quantize_rows(cls, rows, importance):
        d, q = _quantize_sym(rows, *_importance_args(importance, rows.shape[1]), 16)
        out = np.concatenate([_f16_bytes(d), _high_bits(q), _nibbles(q, True)], axis=-1)
        return out.reshape(rows.shape[0], -1)


class Q4_1(QuantFormat, qtype=GGMLQuantizationType.Q4_1):
    uses_importance = True

    @classmethod
    def quantize_rows(cls, rows, importance):
        d, m, q = _quantize_asym(rows, *_importance_args(importance, rows.shape[1]), 15, True)
        out = np.concatenate([_f16_bytes(d), _f16_bytes(m), _nibbles(q, False)], axis=-1)
        return out.reshape(rows.shape[0], -1)


class Q5_1(QuantFormat, qtype=GGMLQuantizationType.Q5_1):
    uses_importance = True

    @classmethod
    def quantize_rows(cls, rows, importance):
        d, m, q = _quantize_asym(rows, *_importance_args(importance, rows.shape[1]), 31, False)
        out = np.concatenate([_f16_bytes(d), _f16_bytes(m), _high_bits(q), _nibbles(q, True)], axis=-1)
        return out.reshape(rows.shape[0], -1)


class Q8_0(QuantFormat, qtype=GGMLQuantizationType.Q8_0):
    # quantize_q8_0 ignores quant_weights
    @classmethod
    def quantize_rows(cls, rows, importance):
        d, q = _quantize_q8_0(rows)
        out = np.concatenate([_f16_bytes(d), q], axis=-1)
        return out.reshape(rows.shape[0], -1)
