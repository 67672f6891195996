"""Legacy 32-element block types Q4_0, Q4_1, Q5_0, Q5_1, Q8_0.

Same arithmetic as ``quantize_row_qN_M_ref`` (no importance) and ``quantize_row_qN_M_impl``
(importance-weighted) in ggml/src/ggml-quants.c, which libggml compiles without FMA contraction:
sequential float32 in source order, so each kernel is a literal numba translation with every
constant pinned to float32, writing whole blocks (``d``/``m`` through ggml's own fp16 rounding).

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


@njit(nogil=True, cache=True, inline="always")
def _store_quants(y, o, q, five_bit):
    """Pack 32 quants at y[o:]: 5-bit types write qh (bit j = bit 4 of q[j]) then masked nibbles;
    4-bit types store ``q[j] | q[j+16] << 4`` unmasked, exactly as the C code does."""
    if five_bit:
        qh = 0
        for j in range(16):
            qh |= ((q[j] & 0x10) >> 4) << j
            qh |= ((q[j + 16] & 0x10) >> 4) << (j + 16)
        for b in range(4):
            y[o + b] = (qh >> (8 * b)) & 0xFF
        o += 4
        for j in range(16):
            y[o + j] = (q[j] & 0x0F) | ((q[j + 16] & 0x0F) << 4)
    else:
        for j in range(16):
            y[o + j] = (q[j] | (q[j + 16] << 4)) & 0xFF


# ---- symmetric types: Q4_0 (nmax 8), Q5_0 (nmax 16) -------------------------------------------

@njit(nogil=True, cache=True)
def _quantize_sym(rows, qw, use_qw, nmax, out):
    """Q4_0 (nmax 8) / Q5_0 (nmax 16) blocks of every row into ``out`` (n, row_size) uint8."""
    n, k = rows.shape
    nb = k // QK
    five_bit = nmax == 16
    type_size = 22 if five_bit else 18
    weight = np.empty(QK, dtype=np.float32)
    L = np.empty(QK, dtype=np.int8)
    q = np.empty(QK, dtype=np.int64)
    fnmax = np.float32(-nmax)
    half = np.float32(nmax) + np.float32(0.5)
    qmax = 2 * nmax - 1
    for r in range(n):
        x = rows[r]
        y = out[r]
        if use_qw:
            sigma2 = _sigma2(x)
        for ib in range(nb):
            if use_qw:  # quantize_row_q4_0_impl / quantize_row_q5_0_impl
                xb = x[ib * QK:(ib + 1) * QK]
                for j in range(QK):
                    weight[j] = qw[ib * QK + j] * np.sqrt(sigma2 + xb[j] * xb[j])
                d = K.make_qx_quants(QK, nmax, xb, L, 1, weight)
                for j in range(QK):
                    q[j] = L[j] & 0xFF
            else:  # quantize_row_q4_0_ref / quantize_row_q5_0_ref
                base = ib * QK
                amax = F0
                vmax = F0
                for j in range(QK):
                    v = x[base + j]
                    if amax < abs(v):
                        amax = abs(v)
                        vmax = v
                d = vmax / fnmax
                iD = F1 / d if d != F0 else F0
                for j in range(QK):
                    # MIN(qmax, (int8_t)(x*id + nmax+0.5f)), stored as uint8_t
                    q[j] = min(qmax, _as_i8(_cvtt_i32(x[base + j] * iD + half))) & 0xFF
            o = ib * type_size
            K.store_fp16(y, o, K.fp32_to_fp16(d))
            _store_quants(y, o + 2, q, five_bit)


# ---- asymmetric types: Q4_1 (nmax 15), Q5_1 (nmax 31) ------------------------------------------

@njit(nogil=True, cache=True)
def _quantize_asym(rows, qw, use_qw, nmax, out):
    """Q4_1 (nmax 15) / Q5_1 (nmax 31) blocks of every row into ``out``."""
    n, k = rows.shape
    nb = k // QK
    five_bit = nmax == 31
    type_size = 24 if five_bit else 20
    weight = np.empty(QK, dtype=np.float32)
    L = np.empty(QK, dtype=np.uint8)
    Laux = np.empty(QK, dtype=np.uint8)
    q = np.empty(QK, dtype=np.int64)
    the_min = np.empty(1, dtype=np.float32)
    fnmax = np.float32(nmax)
    half = np.float32(0.5)
    for r in range(n):
        x = rows[r]
        y = out[r]
        if use_qw:
            sigma2 = _sigma2(x)
        for ib in range(nb):
            if use_qw:  # quantize_row_q4_1_impl / quantize_row_q5_1_impl
                xb = x[ib * QK:(ib + 1) * QK]
                for j in range(QK):
                    weight[j] = qw[ib * QK + j] * np.sqrt(sigma2 + xb[j] * xb[j])
                d = K.make_qkx3_quants(QK, nmax, xb, weight, L, the_min, Laux,
                                       np.float32(-0.9), np.float32(0.05), 36, False)
                m = -the_min[0]
                for j in range(QK):
                    q[j] = L[j]
            else:  # quantize_row_q4_1_ref / quantize_row_q5_1_ref
                base = ib * QK
                vmin = FLT_MAX
                vmax = -FLT_MAX
                for j in range(QK):
                    v = x[base + j]
                    if v < vmin:
                        vmin = v
                    if v > vmax:
                        vmax = v
                d = (vmax - vmin) / fnmax
                iD = F1 / d if d != F0 else F0
                m = vmin
                for j in range(QK):
                    xi = _as_i8(_cvtt_i32((x[base + j] - vmin) * iD + half))
                    if not five_bit:  # Q4_1 clamps with MIN(15, (int8_t)...); Q5_1 casts to uint8_t only
                        xi = min(nmax, xi)
                    q[j] = xi & 0xFF
            o = ib * type_size
            K.store_fp16(y, o, K.fp32_to_fp16(d))
            K.store_fp16(y, o + 2, K.fp32_to_fp16(m))
            _store_quants(y, o + 4, q, five_bit)


# ---- Q8_0 ----------------------------------------------------------------------------------------

@njit(nogil=True, cache=True)
def _roundf(v):
    """C ``roundf``: half away from zero (exact: a - floor(a) is exact in float32)."""
    a = abs(v)
    f = np.floor(a)
    r = f + np.floor(np.float32(2.0) * (a - f))
    return -r if v < F0 else r


@njit(nogil=True, cache=True)
def _quantize_q8_0(rows, out):
    n, k = rows.shape
    nb = k // QK
    for r in range(n):
        y = out[r]
        x = rows[r]
        for ib in range(nb):
            base = ib * QK
            amax = F0
            for j in range(QK):
                amax = max(amax, abs(x[base + j]))
            d = amax / np.float32(127.0)
            iD = F1 / d if d != F0 else F0
            o = ib * 34
            K.store_fp16(y, o, K.fp32_to_fp16(d))
            for j in range(QK):
                # int8_t = roundf(float): float -> int8 conversion, x86 cvttss2si + low byte
                y[o + 2 + j] = _as_i8(_cvtt_i32(_roundf(x[base + j] * iD))) & 0xFF


# ---- dequantization (dequantize_row_q*_0/1 in ggml-quants.c) --------------------------------------

@njit(nogil=True, cache=True)
def _dequantize(blocks, kind, out):
    """blocks (nb, type_size) uint8 -> out (nb*32,) float32. kind: 0 Q4_0, 1 Q4_1, 2 Q5_0, 3 Q5_1, 4 Q8_0."""
    nb = blocks.shape[0]
    for ib in range(nb):
        b = blocks[ib].astype(np.int64)
        d = K.fp16_to_fp32(b[0] | (b[1] << 8))
        y = out[ib * QK:(ib + 1) * QK]  # one view per block: cheap next to its 32 values
        if kind == 4:
            for j in range(QK):
                y[j] = np.float32(_as_i8(b[2 + j])) * d
            continue
        m = F0
        o = 2
        if kind == 1 or kind == 3:
            m = K.fp16_to_fp32(b[2] | (b[3] << 8))
            o = 4
        qh = 0
        if kind == 2 or kind == 3:
            qh = b[o] | (b[o + 1] << 8) | (b[o + 2] << 16) | (b[o + 3] << 24)
            o += 4
        for j in range(16):
            lo = b[o + j] & 0x0F
            hi = b[o + j] >> 4
            if kind >= 2:
                lo |= ((qh >> j) & 1) << 4
                hi |= ((qh >> (j + 16)) & 1) << 4
            if kind == 0:
                y[j] = np.float32(lo - 8) * d
                y[j + 16] = np.float32(hi - 8) * d
            elif kind == 2:
                y[j] = np.float32(lo - 16) * d
                y[j + 16] = np.float32(hi - 16) * d
            else:
                y[j] = np.float32(lo) * d + m
                y[j + 16] = np.float32(hi) * d + m


class _Legacy(QuantFormat):
    kind = -1

    @classmethod
    def dequantize(cls, data, shape=None):
        raw = np.ascontiguousarray(data).view(np.uint8).reshape(-1, cls.type_size)
        out = np.empty(raw.shape[0] * QK, dtype=np.float32)
        _dequantize(raw, cls.kind, out)
        return out.reshape(shape) if shape is not None else out


def _importance_args(importance, k):
    if importance is None:
        return np.zeros(k, dtype=np.float32), False
    return importance, True


def _blocks(cls, rows, kernel, *args):
    out = np.empty((rows.shape[0], cls.row_size(rows.shape[1])), dtype=np.uint8)
    kernel(rows, *args, out)
    return out


class _Symmetric(_Legacy):
    uses_importance = True
    nmax = 0

    @classmethod
    def quantize_rows(cls, rows, importance):
        return _blocks(cls, rows, _quantize_sym, *_importance_args(importance, rows.shape[1]), cls.nmax)


class _Asymmetric(_Legacy):
    uses_importance = True
    nmax = 0

    @classmethod
    def quantize_rows(cls, rows, importance):
        return _blocks(cls, rows, _quantize_asym, *_importance_args(importance, rows.shape[1]), cls.nmax)


class Q4_0(_Symmetric, qtype=GGMLQuantizationType.Q4_0):
    kind, nmax = 0, 8


class Q5_0(_Symmetric, qtype=GGMLQuantizationType.Q5_0):
    kind, nmax = 2, 16


class Q4_1(_Asymmetric, qtype=GGMLQuantizationType.Q4_1):
    kind, nmax = 1, 15


class Q5_1(_Asymmetric, qtype=GGMLQuantizationType.Q5_1):
    kind, nmax = 3, 31


class Q8_0(_Legacy, qtype=GGMLQuantizationType.Q8_0):
    kind = 4  # quantize_q8_0 ignores quant_weights

    @classmethod
    def quantize_rows(cls, rows, importance):
        return _blocks(cls, rows, _quantize_q8_0)
