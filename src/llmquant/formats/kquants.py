"""K-quant super-block types Q2_K, Q3_K, Q4_K, Q5_K, Q6_K and Q8_K (256 values per block).

Literal numba translations of ``ggml/src/ggml-quants.c`` (llama.cpp vendored by
llama-cpp-python 0.3.36). ``quantize_qN_K`` there calls ``quantize_row_qN_K_ref`` when no
importance is given and ``quantize_row_qN_K_impl`` row by row otherwise; the ``_ref`` / ``_impl``
functions below are those, over a whole ``(n_rows, n_per_row)`` array. Field offsets follow the
block structs of ``ggml-common.h`` (sizes in bytes):

    block_q2_K  scales[16] | qs[64] | d | dmin                      84    x = d*sc*q - dmin*m
    block_q3_K  hmask[32] | qs[64] | scales[12] | d                110    x = d*(sc-32)*(q-4)
    block_q4_K  d | dmin | scales[12] | qs[128]                    144    x = d*sc*q - dmin*m
    block_q5_K  d | dmin | scales[12] | qh[32] | qs[128]           176    x = d*sc*q - dmin*m
    block_q6_K  ql[128] | qh[64] | scales[16] (int8) | d           210    x = d*sc*(q-32)
    block_q8_K  d (f32) | qs[256] (int8) | bsums[16] (int16)       292

    Q4_K/Q5_K scales[12], eight 6-bit (sc, m) pairs:   Q3_K scales[12], sixteen 6-bit sc:
      j<4:  scales[j]   = sc_j | (sc_j+4 >> 4) << 6      scales[j]   (j<8)  low nibble  = sc_j & 15
            scales[j+4] = m_j  | (m_j+4  >> 4) << 6      scales[j-8] (j>=8) high nibble = sc_j & 15
      j>=4: scales[j+4] = (sc_j & 15) | (m_j & 15) << 4  scales[8 + j%4] bits 2*(j/4).. = sc_j >> 4
"""

# the C comparisons stay as written: max()/min() differ from them on NaN and on operand order
# ruff: noqa: PLR1730

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from ._kernels import (
    GROUP_MAX_EPS,
    QK_K,
    F,
    f32_bits,
    fp16_to_fp32,
    fp32_to_fp16,
    jit,
    make_q3_quants,
    make_qkx2_quants,
    make_qkx3_quants,
    make_qp_quants,
    make_qx_quants,
    nearest_int,
    store_fp16,
    to_int8,
)
from .base import QuantFormat

I = np.int64  # read uint8/int8 bytes as int before bit arithmetic (numba widens uint8 ops to uint64)


# -- shared packing ---------------------------------------------------------------------------

@jit
def _get_scale_min_k4(j, q, off):
    """get_scale_min_k4: the j-th 6-bit (scale, min) pair of the 12 bytes at q[off:]."""
    if j < 4:
        d = I(q[off + j]) & 63
        m = I(q[off + j + 4]) & 63
    else:
        d = (I(q[off + j + 4]) & 0xF) | ((I(q[off + j - 4]) >> 6) << 4)
        m = (I(q[off + j + 4]) >> 4) | ((I(q[off + j]) >> 6) << 4)
    return d, m


@jit
def _pack_scale_min_k4(y, off, j, ls, lm):
    if j < 4:
        y[off + j] = ls & 0xFF
        y[off + j + 4] = lm & 0xFF
    else:
        y[off + j + 4] = ((ls & 0xF) | ((lm & 0xF) << 4)) & 0xFF
        y[off + j - 4] |= ((ls >> 4) << 6) & 0xFF
        y[off + j] |= ((lm >> 4) << 6) & 0xFF


@jit
def _pack_q3_scale(y, off, j, l):
    # l: the 6-bit scale (0..63) of sub-block j
    if j < 8:
        y[off + j] = l & 0xF
    else:
        y[off + j - 8] |= ((l & 0xF) << 4) & 0xFF
    l >>= 4
    y[off + j % 4 + 8] |= (l << (2 * (j // 4))) & 0xFF


@jit
def _pack_2bit(y, off, L):
    # qs[j/4 + l] holds L[j+l], L[j+l+32], L[j+l+64], L[j+l+96] in bits 0-1, 2-3, 4-5, 6-7
    for j in range(0, QK_K, 128):
        for l in range(32):
            y[off + j // 4 + l] = (I(L[j + l]) | (I(L[j + l + 32]) << 2) | (I(L[j + l + 64]) << 4)
                                   | (I(L[j + l + 96]) << 6)) & 0xFF


# -- Q2_K -------------------------------------------------------------------------------------
_Q2_SC, _Q2_QS, _Q2_D, _Q2_DMIN, _Q2_SIZE = 0, 16, 80, 82, 84


@jit
def _q2_k_requantize(x, y, L, dm16, mm16):
    dm = fp16_to_fp32(dm16)
    mm = fp16_to_fp32(mm16)
    for j in range(QK_K // 16):
        d = dm * F(I(y[_Q2_SC + j]) & 0xF)
        if d == F(0):
            continue
        m = mm * F(I(y[_Q2_SC + j]) >> 4)
        for ii in range(16):
            l = nearest_int((x[16 * j + ii] + m) / d)
            L[16 * j + ii] = max(0, min(3, l))
    _pack_2bit(y, _Q2_QS, L)


@jit
def _q2_k_ref(rows, out):
    """quantize_row_q2_K_ref."""
    L = np.empty(QK_K, np.uint8)
    Laux = np.empty(16, np.uint8)
    weights = np.empty(16, np.float32)
    mins = np.empty(QK_K // 16, np.float32)
    scales = np.empty(QK_K // 16, np.float32)
    the_min = np.empty(1, np.float32)
    q4scale = F(15)
    for r in range(rows.shape[0]):
        for i in range(rows.shape[1] // QK_K):
            x = rows[r, i * QK_K:(i + 1) * QK_K]
            y = out[r, i * _Q2_SIZE:(i + 1) * _Q2_SIZE]
            max_scale = F(0)
            max_min = F(0)
            for j in range(QK_K // 16):
                for l in range(16):
                    weights[l] = abs(x[16 * j + l])
                scales[j] = make_qkx2_quants(16, 3, x[16 * j:16 * j + 16], weights, L[16 * j:16 * j + 16],
                                             the_min, Laux, F(-0.5), F(0.1), 15, True)
                mins[j] = the_min[0]
                if scales[j] > max_scale:
                    max_scale = scales[j]
                if mins[j] > max_min:
                    max_min = mins[j]
            if max_scale > F(0):
                iscale = q4scale / max_scale
                for j in range(QK_K // 16):
                    y[_Q2_SC + j] = nearest_int(iscale * scales[j]) & 0xFF
                d16 = fp32_to_fp16(max_scale / q4scale)
            else:
                for j in range(QK_K // 16):
                    y[_Q2_SC + j] = 0
                d16 = fp32_to_fp16(F(0))
            if max_min > F(0):
                iscale = q4scale / max_min
                for j in range(QK_K // 16):
                    y[_Q2_SC + j] |= (nearest_int(iscale * mins[j]) << 4) & 0xFF
                dmin16 = fp32_to_fp16(max_min / q4scale)
            else:
                dmin16 = fp32_to_fp16(F(0))
            store_fp16(y, _Q2_D, d16)
            store_fp16(y, _Q2_DMIN, dmin16)
            _q2_k_requantize(x, y, L, d16, dmin16)


@jit
def _q2_k_impl(rows, out, quant_weights):
    """quantize_row_q2_K_impl (requantize = true)."""
    L = np.empty(QK_K, np.uint8)
    Laux = np.empty(16, np.uint8)
    mins = np.empty(QK_K // 16, np.float32)
    scales = np.empty(QK_K // 16, np.float32)
    sw = np.empty(QK_K // 16, np.float32)
    weight = np.empty(16, np.float32)
    Ls = np.empty(QK_K // 16, np.uint8)
    Lm = np.empty(QK_K // 16, np.uint8)
    the_min = np.empty(1, np.float32)
    for r in range(rows.shape[0]):
        for i in range(rows.shape[1] // QK_K):
            x = rows[r, i * QK_K:(i + 1) * QK_K]
            y = out[r, i * _Q2_SIZE:(i + 1) * _Q2_SIZE]
            sw[:] = F(0)
            sumx2 = F(0)
            for j in range(QK_K):
                sumx2 += x[j] * x[j]
            sigma2 = sumx2 / F(QK_K)
            for j in range(QK_K // 16):
                qw = quant_weights[QK_K * i + 16 * j:]
                for l in range(16):
                    weight[l] = qw[l] * np.sqrt(sigma2 + x[16 * j + l] * x[16 * j + l])
                for l in range(QK_K // 16):
                    sw[j] += weight[l]
                scales[j] = make_qkx3_quants(16, 3, x[16 * j:16 * j + 16], weight, L[16 * j:16 * j + 16],
                                             the_min, Laux, F(-0.9), F(0.05), 36, False)
                mins[j] = the_min[0]
            dm = make_qp_quants(QK_K // 16, 15, scales, Ls, sw)
            mm = make_qp_quants(QK_K // 16, 15, mins, Lm, sw)
            d16 = fp32_to_fp16(dm)
            dmin16 = fp32_to_fp16(mm)
            store_fp16(y, _Q2_D, d16)
            store_fp16(y, _Q2_DMIN, dmin16)
            for j in range(QK_K // 16):
                y[_Q2_SC + j] = (I(Ls[j]) | (I(Lm[j]) << 4)) & 0xFF
            _q2_k_requantize(x, y, L, d16, dmin16)


# -- Q3_K -------------------------------------------------------------------------------------
_Q3_HMASK, _Q3_QS, _Q3_SC, _Q3_D, _Q3_SIZE = 0, 32, 96, 108, 110


@jit
def _q3_k_requantize(x, y, L, d16):
    dd = fp16_to_fp32(d16)
    for j in range(QK_K // 16):
        sc = (I(y[_Q3_SC + j]) & 0xF) if j < 8 else (I(y[_Q3_SC + j - 8]) >> 4)
        sc = (sc | (((I(y[_Q3_SC + 8 + j % 4]) >> (2 * (j // 4))) & 3) << 4)) - 32
        d = dd * F(sc)
        if d == F(0):
            continue
        for ii in range(16):
            l = nearest_int(x[16 * j + ii] / d)
            L[16 * j + ii] = max(-4, min(3, l)) + 4
    # the high bit of the 1st 8 quants goes into bit 0 of hmask[0..31], the next 8 into bit 1, ...
    for m in range(QK_K // 8):
        y[_Q3_HMASK + m] = 0
    m = 0
    hm = 1
    for j in range(QK_K):
        if L[j] > 3:
            y[_Q3_HMASK + m] |= hm
            L[j] -= 4
        m += 1
        if m == QK_K // 8:
            m = 0
            hm <<= 1
    _pack_2bit(y, _Q3_QS, L)


@jit
def _q3_k_ref(rows, out):
    """quantize_row_q3_K_ref."""
    L = np.empty(QK_K, np.int8)
    scales = np.empty(QK_K // 16, np.float32)
    for r in range(rows.shape[0]):
        for i in range(rows.shape[1] // QK_K):
            x = rows[r, i * QK_K:(i + 1) * QK_K]
            y = out[r, i * _Q3_SIZE:(i + 1) * _Q3_SIZE]
            max_scale = F(0)
            amax = F(0)
            for j in range(QK_K // 16):
                scales[j] = make_q3_quants(16, 4, x[16 * j:16 * j + 16], L[16 * j:16 * j + 16], True)
                scale = abs(scales[j])
                if scale > amax:
                    amax = scale
                    max_scale = scales[j]
            for j in range(12):
                y[_Q3_SC + j] = 0
            if max_scale != F(0):
                iscale = F(-32) / max_scale
                for j in range(QK_K // 16):
                    l = to_int8(nearest_int(iscale * scales[j]))
                    _pack_q3_scale(y, _Q3_SC, j, max(-32, min(31, l)) + 32)
                d16 = fp32_to_fp16(F(1) / iscale)
            else:
                d16 = fp32_to_fp16(F(0))
            store_fp16(y, _Q3_D, d16)
            _q3_k_requantize(x, y, L, d16)


@jit
def _q3_k_impl(rows, out, quant_weights):
    """quantize_row_q3_K_impl."""
    L = np.empty(QK_K, np.int8)
    scales = np.empty(QK_K // 16, np.float32)
    weight = np.empty(16, np.float32)
    sw = np.empty(QK_K // 16, np.float32)
    Ls = np.empty(QK_K // 16, np.int8)
    for r in range(rows.shape[0]):
        for i in range(rows.shape[1] // QK_K):
            x = rows[r, i * QK_K:(i + 1) * QK_K]
            y = out[r, i * _Q3_SIZE:(i + 1) * _Q3_SIZE]
            sumx2 = F(0)
            for j in range(QK_K):
                sumx2 += x[j] * x[j]
            sigma2 = F(2) * sumx2 / F(QK_K)
            for j in range(QK_K // 16):
                qw = quant_weights[QK_K * i + 16 * j:]
                for l in range(16):
                    weight[l] = qw[l] * np.sqrt(sigma2 + x[16 * j + l] * x[16 * j + l])
                sumw = F(0)
                for l in range(16):
                    sumw += weight[l]
                sw[j] = sumw
                scales[j] = make_qx_quants(16, 4, x[16 * j:16 * j + 16], L[16 * j:16 * j + 16], 1, weight)
            for j in range(12):
                y[_Q3_SC + j] = 0
            d_block = make_qx_quants(QK_K // 16, 32, scales, Ls, 1, sw)
            for j in range(QK_K // 16):
                _pack_q3_scale(y, _Q3_SC, j, I(Ls[j]))
            d16 = fp32_to_fp16(d_block)
            store_fp16(y, _Q3_D, d16)
            _q3_k_requantize(x, y, L, d16)


# -- Q4_K and Q5_K ----------------------------------------------------------------------------
_Q45_D, _Q45_DMIN, _Q45_SC = 0, 2, 4
_Q4_QS, _Q4_SIZE = 16, 144
_Q5_QH, _Q5_QS, _Q5_SIZE = 16, 48, 176


@jit
def _q45_k_requantize(x, y, L, nmax, d16, dmin16):
    dd = fp16_to_fp32(d16)
    ddmin = fp16_to_fp32(dmin16)
    for j in range(QK_K // 32):
        sc, m = _get_scale_min_k4(j, y, _Q45_SC)
        d = dd * F(sc)
        if d == F(0):
            continue
        dm = ddmin * F(m)
        for ii in range(32):
            l = nearest_int((x[32 * j + ii] + dm) / d)
            L[32 * j + ii] = max(0, min(nmax, l))


@jit
def _pack_q4(y, L):
    for j in range(0, QK_K, 64):
        for l in range(32):
            y[_Q4_QS + j // 2 + l] = (I(L[j + l]) | (I(L[j + l + 32]) << 4)) & 0xFF


@jit
def _pack_q5(y, L):
    # low nibbles as in Q4_K; bit 4 of L[n+j] / L[n+j+32] goes to bit 2k / 2k+1 of qh[j]
    for j in range(QK_K // 8):
        y[_Q5_QH + j] = 0
    m1 = 1
    m2 = 2
    for n in range(0, QK_K, 64):
        for j in range(32):
            l1 = I(L[n + j])
            if l1 > 15:
                l1 -= 16
                y[_Q5_QH + j] |= m1
            l2 = I(L[n + j + 32])
            if l2 > 15:
                l2 -= 16
                y[_Q5_QH + j] |= m2
            y[_Q5_QS + n // 2 + j] = (l1 | (l2 << 4)) & 0xFF
        m1 <<= 2
        m2 <<= 2


@jit
def _q45_k_ref(rows, out, nmax, type_size, rmin, nstep):
    """quantize_row_q4_K_ref (nmax 15, rmin -1, 20 steps) / quantize_row_q5_K_ref (31, -0.5, 15)."""
    L = np.empty(QK_K, np.uint8)
    Laux = np.empty(32, np.uint8)
    weights = np.empty(32, np.float32)
    mins = np.empty(QK_K // 32, np.float32)
    scales = np.empty(QK_K // 32, np.float32)
    the_min = np.empty(1, np.float32)
    for r in range(rows.shape[0]):
        for i in range(rows.shape[1] // QK_K):
            x = rows[r, i * QK_K:(i + 1) * QK_K]
            y = out[r, i * type_size:(i + 1) * type_size]
            max_scale = F(0)
            max_min = F(0)
            for j in range(QK_K // 32):
                sum_x2 = F(0)
                for l in range(32):
                    sum_x2 += x[32 * j + l] * x[32 * j + l]
                av_x = np.sqrt(sum_x2 / F(32))
                for l in range(32):
                    weights[l] = av_x + abs(x[32 * j + l])
                scales[j] = make_qkx2_quants(32, nmax, x[32 * j:32 * j + 32], weights, L[32 * j:32 * j + 32],
                                             the_min, Laux, rmin, F(0.1), nstep, False)
                mins[j] = the_min[0]
                if scales[j] > max_scale:
                    max_scale = scales[j]
                if mins[j] > max_min:
                    max_min = mins[j]
            inv_scale = F(63) / max_scale if max_scale > F(0) else F(0)
            inv_min = F(63) / max_min if max_min > F(0) else F(0)
            for j in range(QK_K // 32):
                ls = min(63, nearest_int(inv_scale * scales[j]) & 0xFF)  # uint8_t, then MIN(63, .)
                lm = min(63, nearest_int(inv_min * mins[j]) & 0xFF)
                _pack_scale_min_k4(y, _Q45_SC, j, ls, lm)
            d16 = fp32_to_fp16(max_scale / F(63))
            dmin16 = fp32_to_fp16(max_min / F(63))
            store_fp16(y, _Q45_D, d16)
            store_fp16(y, _Q45_DMIN, dmin16)
            _q45_k_requantize(x, y, L, nmax, d16, dmin16)
            if nmax == 15:
                _pack_q4(y, L)
            else:
                _pack_q5(y, L)


@jit
def _q45_k_impl(rows, out, quant_weights, nmax, type_size):
    """quantize_row_q4_K_impl (nmax 15) / quantize_row_q5_K_impl (nmax 31)."""
    L = np.empty(QK_K, np.uint8)
    Laux = np.empty(32, np.uint8)
    Ls = np.empty(QK_K // 32, np.uint8)
    Lm = np.empty(QK_K // 32, np.uint8)
    weights = np.empty(32, np.float32)
    sw = np.empty(QK_K // 32, np.float32)
    mins = np.empty(QK_K // 32, np.float32)
    scales = np.empty(QK_K // 32, np.float32)
    the_min = np.empty(1, np.float32)
    for r in range(rows.shape[0]):
        for i in range(rows.shape[1] // QK_K):
            x = rows[r, i * QK_K:(i + 1) * QK_K]
            y = out[r, i * type_size:(i + 1) * type_size]
            sum_x2 = F(0)
            for l in range(QK_K):
                sum_x2 += x[l] * x[l]
            sigma2 = F(2) * sum_x2 / F(QK_K)
            for j in range(QK_K // 32):
                qw = quant_weights[QK_K * i + 32 * j:]
                for l in range(32):
                    weights[l] = qw[l] * np.sqrt(sigma2 + x[32 * j + l] * x[32 * j + l])
                sumw = F(0)
                for l in range(32):
                    sumw += weights[l]
                sw[j] = sumw
                scales[j] = make_qkx3_quants(32, nmax, x[32 * j:32 * j + 32], weights, L[32 * j:32 * j + 32],
                                             the_min, Laux, F(-0.9), F(0.05), 36, False)
                mins[j] = the_min[0]
            d_block = make_qp_quants(QK_K // 32, 63, scales, Ls, sw)
            m_block = make_qp_quants(QK_K // 32, 63, mins, Lm, sw)
            for j in range(QK_K // 32):
                ls = I(Ls[j])
                lm = I(Lm[j])
                if nmax == 31:  # only the Q5_K version clamps with MIN(63, .)
                    ls = min(63, ls)
                    lm = min(63, lm)
                _pack_scale_min_k4(y, _Q45_SC, j, ls, lm)
            d16 = fp32_to_fp16(d_block)
            dmin16 = fp32_to_fp16(m_block)
            store_fp16(y, _Q45_D, d16)
            store_fp16(y, _Q45_DMIN, dmin16)
            _q45_k_requantize(x, y, L, nmax, d16, dmin16)
            if nmax == 15:
                _pack_q4(y, L)
            else:
                _pack_q5(y, L)


# -- Q6_K -------------------------------------------------------------------------------------
_Q6_QL, _Q6_QH, _Q6_SC, _Q6_D, _Q6_SIZE = 0, 128, 192, 208, 210


@jit
def _q6_k(rows, out, quant_weights):
    """quantize_row_q6_K_ref (quant_weights None) / quantize_row_q6_K_impl: they differ only there."""
    L = np.empty(QK_K, np.int8)
    scales = np.empty(QK_K // 16, np.float32)
    for r in range(rows.shape[0]):
        for i in range(rows.shape[1] // QK_K):
            x = rows[r, i * QK_K:(i + 1) * QK_K]
            y = out[r, i * _Q6_SIZE:(i + 1) * _Q6_SIZE]
            max_scale = F(0)
            max_abs_scale = F(0)
            for ib in range(QK_K // 16):
                if quant_weights is None:
                    scale = make_qx_quants(16, 32, x[16 * ib:16 * ib + 16], L[16 * ib:16 * ib + 16], 1, None)
                else:
                    qw = quant_weights[QK_K * i + 16 * ib:QK_K * i + 16 * ib + 16]
                    scale = make_qx_quants(16, 32, x[16 * ib:16 * ib + 16], L[16 * ib:16 * ib + 16], 1, qw)
                scales[ib] = scale
                abs_scale = abs(scale)
                if abs_scale > max_abs_scale:
                    max_abs_scale = abs_scale
                    max_scale = scale
            if max_abs_scale < GROUP_MAX_EPS:
                y[:] = 0
                continue
            iscale = F(-128) / max_scale
            d16 = fp32_to_fp16(F(1) / iscale)
            store_fp16(y, _Q6_D, d16)
            for ib in range(QK_K // 16):
                y[_Q6_SC + ib] = min(127, nearest_int(iscale * scales[ib])) & 0xFF
            dd = fp16_to_fp32(d16)
            for j in range(QK_K // 16):
                d = dd * F(to_int8(I(y[_Q6_SC + j])))
                if d == F(0):
                    continue
                for ii in range(16):
                    l = nearest_int(x[16 * j + ii] / d)
                    L[16 * j + ii] = max(-32, min(31, l)) + 32
            # ql[l] = low nibbles of L[j+l] | L[j+l+64] << 4, ql[l+32] of L[j+l+32], L[j+l+96];
            # qh[l] = the four 2-bit high parts of L[j+l], +32, +64, +96
            for j in range(0, QK_K, 128):
                ql = _Q6_QL + j // 2
                qh = _Q6_QH + j // 4
                for l in range(32):
                    l1 = I(L[j + l])
                    l2 = I(L[j + l + 32])
                    l3 = I(L[j + l + 64])
                    l4 = I(L[j + l + 96])
                    y[ql + l] = ((l1 & 0xF) | ((l3 & 0xF) << 4)) & 0xFF
                    y[ql + l + 32] = ((l2 & 0xF) | ((l4 & 0xF) << 4)) & 0xFF
                    y[qh + l] = ((l1 >> 4) | ((l2 >> 4) << 2) | ((l3 >> 4) << 4) | ((l4 >> 4) << 6)) & 0xFF


# -- Q8_K -------------------------------------------------------------------------------------
_Q8_D, _Q8_QS, _Q8_BSUMS, _Q8_SIZE = 0, 4, 260, 292


@jit
def _q8_k_ref(rows, out):
    """quantize_row_q8_K_ref. An all-zero block leaves bsums untouched in C; we write zeros."""
    for r in range(rows.shape[0]):
        for i in range(rows.shape[1] // QK_K):
            x = rows[r, i * QK_K:(i + 1) * QK_K]
            y = out[r, i * _Q8_SIZE:(i + 1) * _Q8_SIZE]
            max_ = F(0)
            amax = F(0)
            for j in range(QK_K):
                ax = abs(x[j])
                if ax > amax:
                    amax = ax
                    max_ = x[j]
            y[:] = 0
            if amax == F(0):
                continue
            iscale = F(-127) / max_
            for j in range(QK_K):
                y[_Q8_QS + j] = min(127, nearest_int(iscale * x[j])) & 0xFF
            for j in range(QK_K // 16):
                s = 0
                for ii in range(16):
                    s += to_int8(I(y[_Q8_QS + j * 16 + ii]))
                y[_Q8_BSUMS + 2 * j] = s & 0xFF
                y[_Q8_BSUMS + 2 * j + 1] = (s >> 8) & 0xFF
            _store_f32(y, _Q8_D, F(1) / iscale)


@jit
def _store_f32(y, pos, v):
    bits = f32_bits(v)
    for b in range(4):
        y[pos + b] = (bits >> (8 * b)) & 0xFF


# -- the registered formats -------------------------------------------------------------------

class _KQuant(QuantFormat):
    """Dispatch like ``quantize_qN_K``: the ``_ref`` path without importance, ``_impl`` with it."""

    uses_importance = True

    @classmethod
    def quantize_rows(cls, rows: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
        out = np.empty((rows.shape[0], cls.row_size(rows.shape[1])), dtype=np.uint8)
        if importance is None:
            cls._ref(rows, out)
        else:
            cls._impl(rows, out, importance)
        return out

    @staticmethod
    def _ref(rows: np.ndarray, out: np.ndarray) -> None:
        raise NotImplementedError

    @staticmethod
    def _impl(rows: np.ndarray, out: np.ndarray, importance: np.ndarray) -> None:
        raise NotImplementedError


class Q2_K(_KQuant, qtype=GGMLQuantizationType.Q2_K):
    _ref = staticmethod(_q2_k_ref)
    _impl = staticmethod(_q2_k_impl)


class Q3_K(_KQuant, qtype=GGMLQuantizationType.Q3_K):
    _ref = staticmethod(_q3_k_ref)
    _impl = staticmethod(_q3_k_impl)


class Q4_K(_KQuant, qtype=GGMLQuantizationType.Q4_K):
    @staticmethod
    def _ref(rows, out):
        _q45_k_ref(rows, out, 15, _Q4_SIZE, F(-1.0), 20)

    @staticmethod
    def _impl(rows, out, importance):
        _q45_k_impl(rows, out, importance, 15, _Q4_SIZE)


class Q5_K(_KQuant, qtype=GGMLQuantizationType.Q5_K):
    @staticmethod
    def _ref(rows, out):
        _q45_k_ref(rows, out, 31, _Q5_SIZE, F(-0.5), 15)

    @staticmethod
    def _impl(rows, out, importance):
        _q45_k_impl(rows, out, importance, 31, _Q5_SIZE)


class Q6_K(_KQuant, qtype=GGMLQuantizationType.Q6_K):
    @staticmethod
    def _ref(rows, out):
        _q6_k(rows, out, None)

    @staticmethod
    def _impl(rows, out, importance):
        _q6_k(rows, out, importance)


class Q8_K(_KQuant, qtype=GGMLQuantizationType.Q8_K):
    """Intermediate type for dot products; libggml quantizes it without importance."""

    uses_importance = False

    @staticmethod
    def _ref(rows, out):
        _q8_k_ref(rows, out)

    @staticmethod
    def _impl(rows, out, importance):
        _q8_k_ref(rows, out)

    @classmethod
    def dequantize(cls, data: np.ndarray, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """dequantize_row_q8_K (gguf-py has none): y = d * qs."""
        arr = np.ascontiguousarray(data).view(np.uint8)
        if shape is not None:
            shape = tuple(int(s) for s in shape)
        else:
            shape = (*arr.shape[:-1], arr.shape[-1] // cls.type_size * cls.block_size)
        blocks = arr.reshape(-1, cls.type_size)
        d = blocks[:, _Q8_D:_Q8_D + 4].copy().view(np.float32)
        qs = blocks[:, _Q8_QS:_Q8_QS + QK_K].view(np.int8).astype(np.float32)
        return (d * qs).reshape(shape)
