"""Importance-aware non-linear and lattice types: IQ4_NL, IQ4_XS, IQ3_XXS, IQ3_S, IQ2_XXS, IQ2_XS,
IQ2_S, IQ1_S, IQ1_M.

Literal numba translations of ``ggml/src/ggml-quants.c`` (llama.cpp vendored by llama-cpp-python
0.3.36), same float32 operation order as there. Block layouts (``ggml-common.h``, bytes):

    block_iq4_nl  d | qs[16]                                   18   x = d * kvalues_iq4nl[q]
    block_iq4_xs  d | scales_h (u16) | scales_l[4] | qs[128]  136   x = d * (ls - 32) * kvalues[q]

    IQ4_XS 6-bit block scale ls of sub-block ib (8 of 32 values):
      low 4 bits in nibble ib%2 of scales_l[ib/2], high 2 bits at bits 2*ib of scales_h
    qs (both): qs[16*i + j] = L[32*i + j] | L[32*i + 16 + j] << 4
"""

# the C comparisons stay as written: max()/min() differ from them on NaN and on operand order
# ruff: noqa: FURB136

from __future__ import annotations

from functools import cache
from typing import ClassVar

import numpy as np
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

from ..errors import FormatError
from ._kernels import (
    GROUP_MAX_EPS,
    QK_K,
    F,
    fp32_to_fp16,
    jit,
    jit_inline,
    make_qp_quants,
    nearest_int,
    store_fp16,
)
from .base import QuantFormat

I = np.int64

# kvalues_iq4nl (ggml-common.h), as float32: best_index_int8 compares floats with them
KVALUES_IQ4NL = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.float32)


@jit
def best_index_int8(n, val, x):
    """best_index_int8: nearest of the n sorted values (ties to the lower one)."""
    if x <= val[0]:
        return 0
    if x >= val[n - 1]:
        return n - 1
    ml = 0
    mu = n - 1
    while mu - ml > 1:
        mav = (ml + mu) // 2
        if x < val[mav]:
            mu = mav
        else:
            ml = mav
    return mu - 1 if x - val[mu - 1] < val[mu] - x else mu


# -- IQ4_NL / IQ4_XS --------------------------------------------------------------------------
_IQ4NL_D, _IQ4NL_QS, _IQ4NL_SIZE = 0, 2, 18
_IQ4XS_D, _IQ4XS_SCALES_H, _IQ4XS_SCALES_L, _IQ4XS_QS, _IQ4XS_SIZE = 0, 2, 4, 8, 136


@jit
def _iq4_nl_impl(super_block_size, block_size, x, y, d_off, qs_off, sh_off, sl_off, scales, weight, L,
                 values, quant_weights, qw_off, ntry):
    """quantize_row_iq4_nl_impl on one super-block x, writing into y at the given field offsets."""
    sigma2 = F(0)
    for j in range(super_block_size):
        sigma2 += x[j] * x[j]
    sigma2 *= F(2) / F(super_block_size)

    for j in range(super_block_size // 2):
        y[qs_off + j] = 0
    store_fp16(y, d_off, fp32_to_fp16(F(0)))

    max_scale = F(0)
    amax_scale = F(0)
    for ib in range(super_block_size // block_size):
        xb = x[ib * block_size:]
        Lb = L[ib * block_size:]
        if quant_weights is not None:
            for j in range(block_size):
                weight[j] = quant_weights[qw_off + ib * block_size + j] * np.sqrt(sigma2 + xb[j] * xb[j])
        else:
            for j in range(block_size):
                weight[j] = xb[j] * xb[j]
        amax = F(0)
        max_ = F(0)
        for j in range(block_size):
            ax = abs(xb[j])
            if ax > amax:
                amax = ax
                max_ = xb[j]
        if amax < GROUP_MAX_EPS:
            scales[ib] = F(0)
            continue
        d = -max_ / values[0] if ntry > 0 else max_ / values[0]
        id_ = F(1) / d
        sumqx = F(0)
        sumq2 = F(0)
        for j in range(block_size):
            al = id_ * xb[j]
            l = best_index_int8(16, values, al)
            Lb[j] = l
            q = values[l]
            w = weight[j]
            sumqx += w * q * xb[j]
            sumq2 += w * q * q
        d = sumqx / sumq2 if sumq2 > F(0) else F(0)
        best = d * sumqx
        for itry in range(-ntry, ntry + 1):
            id_ = (F(itry) + values[0]) / max_
            sumqx = F(0)
            sumq2 = F(0)
            for j in range(block_size):
                al = id_ * xb[j]
                l = best_index_int8(16, values, al)
                q = values[l]
                w = weight[j]
                sumqx += w * q * xb[j]
                sumq2 += w * q * q
            if sumq2 > F(0) and sumqx * sumqx > best * sumq2:
                d = sumqx / sumq2
                best = d * sumqx
        scales[ib] = d
        abs_d = abs(d)
        if abs_d > amax_scale:
            amax_scale = abs_d
            max_scale = d

    nb = super_block_size // block_size
    if nb > 1:
        y[sh_off] = 0
        y[sh_off + 1] = 0
        d = -max_scale / F(32)
        store_fp16(y, d_off, fp32_to_fp16(d))
        id_ = F(1) / d if d != F(0) else F(0)
        scales_h = 0
        for ib in range(nb):
            l = nearest_int(id_ * scales[ib])
            l = max(-32, min(31, l))
            dl = d * F(l)
            idl = F(1) / dl if dl != F(0) else F(0)
            for j in range(block_size):
                L[ib * block_size + j] = best_index_int8(16, values, idl * x[ib * block_size + j])
            l += 32
            l_l = l & 0xF
            l_h = l >> 4
            if ib % 2 == 0:
                y[sl_off + ib // 2] = l_l
            else:
                y[sl_off + ib // 2] |= l_l << 4
            scales_h |= l_h << (2 * (ib % 8))
        y[sh_off] = scales_h & 0xFF
        y[sh_off + 1] = (scales_h >> 8) & 0xFF
    else:
        store_fp16(y, d_off, fp32_to_fp16(scales[0]))
        if ntry > 0:
            id_ = F(1) / scales[0] if scales[0] != F(0) else F(0)
            for j in range(super_block_size):
                L[j] = best_index_int8(16, values, id_ * x[j])

    for i in range(super_block_size // 32):
        for j in range(16):
            y[qs_off + 16 * i + j] = (I(L[32 * i + j]) | (I(L[32 * i + 16 + j]) << 4)) & 0xFF


@jit
def _iq4_nl(rows, out, quant_weights):
    """quantize_iq4_nl: blocks of 32, ntry 7, with or without importance."""
    L = np.zeros(32, np.uint8)
    weight = np.empty(32, np.float32)
    scales = np.empty(1, np.float32)
    for r in range(rows.shape[0]):
        for ibl in range(rows.shape[1] // 32):
            y = out[r, ibl * _IQ4NL_SIZE:(ibl + 1) * _IQ4NL_SIZE]
            _iq4_nl_impl(32, 32, rows[r, 32 * ibl:32 * ibl + 32], y, _IQ4NL_D, _IQ4NL_QS, 0, 0,
                         scales, weight, L, KVALUES_IQ4NL, quant_weights, 32 * ibl, 7)


@jit
def _iq4_xs(rows, out, quant_weights):
    """quantize_iq4_xs: super-blocks of 256 in blocks of 32, ntry 7."""
    L = np.zeros(QK_K, np.uint8)
    weight = np.empty(32, np.float32)
    scales = np.empty(QK_K // 32, np.float32)
    for r in range(rows.shape[0]):
        for ibl in range(rows.shape[1] // QK_K):
            y = out[r, ibl * _IQ4XS_SIZE:(ibl + 1) * _IQ4XS_SIZE]
            _iq4_nl_impl(QK_K, 32, rows[r, QK_K * ibl:QK_K * ibl + QK_K], y, _IQ4XS_D, _IQ4XS_QS,
                         _IQ4XS_SCALES_H, _IQ4XS_SCALES_L, scales, weight, L, KVALUES_IQ4NL,
                         quant_weights, QK_K * ibl, 7)


# -- lattice grids (iq2xs_init_impl / iq3xs_init_impl) ----------------------------------------
#
# A grid point is n_dim small levels l (2 bits for IQ1/IQ2, 3 bits for IQ3), packed as
# kgrid = sum(l_k << bits*k). The quantizer searches in "pos = 2*l + 1" units; points off the grid
# look up a list of grid neighbours: those at the nwant smallest squared distances, in (distance,
# index) order, as the qsort of the C code leaves them. kmap[u] is the grid index of u, or
# -(offset + 1) of u's list in ``neighbours`` (its length first, then the indices).
#
# The kgrid tables are gguf-py's grids (``grid_hex`` of its IQ classes, which dequantize with them);
# byte-identity of every type below proves they are the C tables.

FLT_MAX = F(np.finfo(np.float32).max)


@jit
def _neighbour_lists(grid, kmap, bits, nwant):
    """Fill kmap's negative entries and return the neighbour lists, as iq2xs_init_impl does."""
    grid_size, n_dim = grid.shape
    top = 2 * ((1 << bits) - 1)  # largest |pos - grid| difference
    hist = np.zeros(n_dim * top * top + 1, np.int64)
    d2 = np.empty(grid_size, np.int64)
    pos = np.empty(n_dim, np.int64)
    wanted = np.empty(nwant, np.int64)
    lists = []
    total = 0
    for i in range(kmap.shape[0]):
        if kmap[i] >= 0:
            continue
        for k in range(n_dim):
            pos[k] = 2 * ((i >> (bits * k)) & ((1 << bits) - 1)) + 1
        hist[:] = 0
        for j in range(grid_size):
            d = 0
            for k in range(n_dim):
                diff = I(grid[j, k]) - pos[k]
                d += diff * diff
            d2[j] = d
            hist[d] += 1
        # the nwant smallest distinct distances; every point at one of them, ascending (d2, j)
        nhave = 0
        for d in range(hist.shape[0]):
            if hist[d] > 0 and nhave < nwant:
                wanted[nhave] = d
                nhave += 1
        n = 0
        for t in range(nhave):
            n += hist[wanted[t]]
        entry = np.empty(n + 1, np.uint16)
        entry[0] = n
        m = 1
        for t in range(nhave):
            for j in range(grid_size):
                if d2[j] == wanted[t]:
                    entry[m] = j
                    m += 1
        kmap[i] = -(total + 1)
        total += n + 1
        lists.append(entry)
    neighbours = np.empty(total, np.uint16)
    o = 0
    for entry in lists:
        neighbours[o:o + entry.shape[0]] = entry
        o += entry.shape[0]
    return neighbours


def _kgrid(qtype: GGMLQuantizationType) -> np.ndarray:
    """The C ``kgrid`` table of a lattice type, from gguf-py's packed grid."""
    cls = gguf_quants._type_traits[qtype]
    raw = np.frombuffer(bytes.fromhex(cls.grid_hex.decode()), np.uint8).astype(np.int64)
    if len(cls.grid_map) <= 4:  # 2-bit levels, 8 per point: the hex is the uint16 table itself
        return raw[0::2] | (raw[1::2] << 8)
    nibbles = np.stack([raw & 15, raw >> 4], axis=1).reshape(-1, 4)  # 3-bit levels in nibbles
    return (nibbles << (3 * np.arange(4))).sum(axis=1)


@cache
def lattice(qtype: GGMLQuantizationType) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(grid int8 (n, n_dim) in pos units, kmap int32, neighbours uint16) of a lattice type, built
    once per process and never modified."""
    n_dim, bits, kmap_size, nwant = _LATTICE[qtype]
    kgrid = _kgrid(qtype)
    levels = (kgrid[:, None] >> (bits * np.arange(n_dim))) & ((1 << bits) - 1)
    grid = (2 * levels + 1).astype(np.int8)
    kmap = np.full(kmap_size, -1, np.int32)
    kmap[kgrid] = np.arange(kgrid.shape[0], dtype=np.int32)
    neighbours = _neighbour_lists(grid, kmap, bits, nwant)
    for a in (grid, kmap, neighbours):
        a.setflags(write=False)
    return grid, kmap, neighbours


# (n_dim, bits, kmap_size, nwant) as in iq2xs_init_impl / iq3xs_init_impl; IQ1_M shares IQ1_S's
_LATTICE = {
    GGMLQuantizationType.IQ2_XXS: (8, 2, 43692, 2),
    GGMLQuantizationType.IQ2_XS: (8, 2, 43692, 2),
    GGMLQuantizationType.IQ2_S: (8, 2, 43692, 1),
    GGMLQuantizationType.IQ1_S: (8, 2, 43692, 3),
    GGMLQuantizationType.IQ3_XXS: (4, 3, 4096, 2),
    GGMLQuantizationType.IQ3_S: (4, 3, 4096, 3),
}


@jit_inline
def _nearest_listed(neighbours, start, grid, xval, xo, weight, scale, n_dim):
    """The weighted-nearest listed point; ``n_dim`` a literal at each call site (4 or 8), so the
    per-point loop is unrolled and its products vectorized (the sum keeps its order)."""
    num_neighbors = I(neighbours[start])
    best_d2 = FLT_MAX
    grid_index = -1
    for j in range(1, num_neighbors + 1):
        idx = I(neighbours[start + j])
        d2 = F(0)
        for i in range(n_dim):
            q = F(grid[idx, i])
            diff = scale * q - xval[xo + i]
            d2 += weight[xo + i] * diff * diff
        if d2 < best_d2:
            best_d2 = d2
            grid_index = idx
    return grid_index


@jit
def _find_best_neighbour(neighbours, start, grid, xval, xo, weight, scale, L, lo):
    """iq2_find_best_neighbour / iq3_find_best_neighbour: the weighted-nearest listed point."""
    n_dim = grid.shape[1]
    if n_dim == 8:
        grid_index = _nearest_listed(neighbours, start, grid, xval, xo, weight, scale, 8)
    elif n_dim == 4:
        grid_index = _nearest_listed(neighbours, start, grid, xval, xo, weight, scale, 4)
    else:
        grid_index = _nearest_listed(neighbours, start, grid, xval, xo, weight, scale, n_dim)
    if grid_index < 0:
        raise ValueError("no grid neighbour (libggml aborts here: non-finite values?)")
    for i in range(n_dim):
        L[lo + i] = (grid[grid_index, i] - 1) // 2
    return grid_index


@jit
def _sign_split(xb, xo, weight, xval, parity):
    """|x| of 8 values into xval, their sign bits returned; with ``parity`` an odd number of
    negatives flips the least important one back (IQ2/IQ3_XXS store 7 signs + parity)."""
    nflip = 0
    s = 0
    for i in range(8):
        if xb[xo + i] >= F(0):
            xval[xo + i] = xb[xo + i]
        else:
            xval[xo + i] = -xb[xo + i]
            nflip += 1
            s |= 1 << i
    if parity and nflip % 2:
        imin = 0
        min_ = weight[xo] * xb[xo] * xb[xo]
        for i in range(1, 8):
            ax = weight[xo + i] * xb[xo + i] * xb[xo + i]
            if ax < min_:
                min_ = ax
                imin = i
        xval[xo + imin] = -xval[xo + imin]
        s ^= 1 << imin
    return s


@jit
def _block_weights(xb, qw, qo, sigma2, weight, waux, n):
    if qw is not None:
        for i in range(n):
            weight[i] = qw[qo + i] * np.sqrt(sigma2 + xb[i] * xb[i])
    else:
        for i in range(n):
            weight[i] = xb[i] * xb[i]
    for i in range(n):
        waux[i] = np.sqrt(weight[i])


# -- IQ3_XXS / IQ3_S ----------------------------------------------------------------------------
#
#   block_iq3_xxs  d | qs[64] grid indices | 8 x u32 (signs 4x7 bits, scale << 28)       98
#   block_iq3_s    d | qs[64] | qh[8] (bit 8 of index) | signs[32] | scales[4] (2 nibbles) 110
GROUP_MAX_EPS_IQ3_XXS = F(1e-8)
_IQ3XXS_SIZE, _IQ3S_SIZE = 98, 110
_IQ3S_QS, _IQ3S_QH, _IQ3S_SIGNS, _IQ3S_SCALES = 2, 66, 74, 106


@jit
def _iq3_sum(weight, xval, L, n):
    sumqx = F(0)
    sumq2 = F(0)
    for i in range(n):
        w = weight[i]
        q = F(2 * I(L[i]) + 1)
        sumqx += w * xval[i] * q
        sumq2 += w * q * q
    return sumqx, sumq2


@jit
def _iq3_point(xval, k, id_, kMaxQ, L):
    """u of the 4 values of group k at inverse scale id_ (levels clamped to [0, kMaxQ-1] into L)."""
    u = 0
    for i in range(4):
        l = nearest_int(F(0.5) * (id_ * xval[4 * k + i] - F(1)))
        l = max(0, min(kMaxQ - 1, l))
        L[4 * k + i] = l
        u |= l << (3 * i)
    return u


@jit
def _iq3_search(xval, weight, waux, L, Laux, is_on_grid, is_on_grid_aux, max_, n_is, skip_on_grid,
                grid, kmap, neighbours):
    """The scale search shared by quantize_row_iq3_xxs_impl and quantize_row_iq3_s_impl."""
    kMaxQ = 8
    ngroups = 8
    best = F(0)
    scale = max_ / F(2 * kMaxQ - 1)
    for is_ in range(-n_is, n_is + 1):
        id_ = (F(2 * kMaxQ - 1) + F(is_) * F(0.2)) / max_
        this_scale = F(1) / id_
        for k in range(ngroups):
            u = _iq3_point(xval, k, id_, kMaxQ, Laux)
            is_on_grid_aux[k] = True
            if kmap[u] < 0:
                is_on_grid_aux[k] = False
                _find_best_neighbour(neighbours, -kmap[u] - 1, grid, xval, 4 * k, waux, this_scale, Laux, 4 * k)
        sumqx, sumq2 = _iq3_sum(weight, xval, Laux, 32)
        if sumq2 > F(0) and sumqx * sumqx > best * sumq2:
            scale = sumqx / sumq2
            best = scale * sumqx
            L[:] = Laux
            is_on_grid[:] = is_on_grid_aux
    n_not_ongrid = 0
    for k in range(ngroups):
        if not is_on_grid[k]:
            n_not_ongrid += 1
    if n_not_ongrid > 0 and scale > F(0):
        id_ = F(1) / scale
        for k in range(ngroups):
            if skip_on_grid and is_on_grid[k]:
                continue
            u = _iq3_point(xval, k, id_, kMaxQ, L)
            grid_index = kmap[u]
            if grid_index < 0:
                grid_index = _find_best_neighbour(neighbours, -kmap[u] - 1, grid, xval, 4 * k, waux, scale, L, 4 * k)
            for i in range(4):
                L[4 * k + i] = (grid[grid_index, i] - 1) // 2
        sumqx, sumq2 = _iq3_sum(weight, xval, L, 32)
        if sumq2 > F(0):
            scale = sumqx / sumq2
    return scale


@jit
def _grid_index(L, k, kmap):
    u = 0
    for i in range(4):
        u |= I(L[4 * k + i]) << (3 * i)
    grid_index = kmap[u]
    if grid_index < 0:
        raise ValueError("found point not on grid (libggml aborts here)")
    return grid_index


@jit
def _iq3_xxs(rows, out, quant_weights, grid, kmap, neighbours):
    """quantize_iq3_xxs -> quantize_row_iq3_xxs_impl(256, ...)."""
    scales = np.empty(8, np.float32)
    weight = np.empty(32, np.float32)
    xval = np.empty(32, np.float32)
    waux = np.empty(32, np.float32)
    L = np.zeros(32, np.int8)
    Laux = np.zeros(32, np.int8)
    is_on_grid = np.zeros(8, np.bool_)
    is_on_grid_aux = np.zeros(8, np.bool_)
    block_signs = np.zeros(4, np.int64)
    q3 = np.zeros(64, np.int64)
    scales_and_signs = np.zeros(8, np.int64)
    for r in range(rows.shape[0]):
        for ibl in range(rows.shape[1] // QK_K):
            y = out[r, ibl * _IQ3XXS_SIZE:(ibl + 1) * _IQ3XXS_SIZE]
            y[:] = 0
            q3[:] = 0
            scales_and_signs[:] = 0
            max_scale = F(0)
            xbl = rows[r, QK_K * ibl:QK_K * (ibl + 1)]
            sumx2 = F(0)
            for i in range(QK_K):
                sumx2 += xbl[i] * xbl[i]
            sigma2 = F(2) * sumx2 / F(QK_K)
            for ib in range(QK_K // 32):
                xb = xbl[32 * ib:32 * ib + 32]
                _block_weights(xb, quant_weights, QK_K * ibl + 32 * ib, sigma2, weight, waux, 32)
                for k in range(4):
                    block_signs[k] = _sign_split(xb, 8 * k, weight, xval, True) & 127
                max_ = xval[0]
                for i in range(1, 32):
                    max_ = max_ if max_ > xval[i] else xval[i]
                L[:] = 0
                if max_ < GROUP_MAX_EPS_IQ3_XXS:
                    scales[ib] = F(0)
                    continue
                is_on_grid[:] = True
                scale = _iq3_search(xval, weight, waux, L, Laux, is_on_grid, is_on_grid_aux, max_, 15, True,
                                    grid, kmap, neighbours)
                if scale < F(0):
                    scale = -scale
                    for k in range(4):
                        block_signs[k] = (~block_signs[k]) & 127
                for k in range(8):
                    q3[8 * ib + k] = _grid_index(L, k, kmap)
                scales_and_signs[ib] = (block_signs[0] | (block_signs[1] << 7) | (block_signs[2] << 14)
                                        | (block_signs[3] << 21))
                if not scale >= F(0):
                    raise ValueError("GGML_ASSERT(scale >= 0)")
                scales[ib] = scale
                max_scale = max_scale if max_scale > scale else scale
            if max_scale == F(0):
                continue
            d = max_scale / F(31)
            store_fp16(y, 0, fp32_to_fp16(d * F(1.0125)))
            id_ = F(1) / d
            for ib in range(QK_K // 32):
                l = nearest_int(F(0.5) * (id_ * scales[ib] - F(1)))
                l = max(0, min(15, l))
                scales_and_signs[ib] |= l << 28
            for j in range(64):
                y[2 + j] = q3[j] & 0xFF
            for ib in range(8):
                for b in range(4):
                    y[66 + 4 * ib + b] = (scales_and_signs[ib] >> (8 * b)) & 0xFF


@jit
def _iq3_s(rows, out, quant_weights, grid, kmap, neighbours):
    """quantize_iq3_s -> quantize_row_iq3_s_impl(32, ...). A sub-block with max == 0 does not
    advance the qs / signs cursors in C, so later sub-blocks shift down: kept as written."""
    block_size = 32
    bs4 = block_size // 4
    bs8 = block_size // 8
    scales = np.empty(QK_K // block_size, np.float32)
    weight = np.empty(block_size, np.float32)
    xval = np.empty(block_size, np.float32)
    waux = np.empty(block_size, np.float32)
    L = np.zeros(block_size, np.int8)
    Laux = np.zeros(block_size, np.int8)
    is_on_grid = np.zeros(bs4, np.bool_)
    is_on_grid_aux = np.zeros(bs4, np.bool_)
    block_signs = np.zeros(bs8, np.int64)
    for r in range(rows.shape[0]):
        for ibl in range(rows.shape[1] // QK_K):
            y = out[r, ibl * _IQ3S_SIZE:(ibl + 1) * _IQ3S_SIZE]
            y[:] = 0
            qs = _IQ3S_QS
            signs = _IQ3S_SIGNS
            max_scale = F(0)
            xbl = rows[r, QK_K * ibl:QK_K * (ibl + 1)]
            sumx2 = F(0)
            for i in range(QK_K):
                sumx2 += xbl[i] * xbl[i]
            sigma2 = F(2) * sumx2 / F(QK_K)
            for ib in range(QK_K // block_size):
                xb = xbl[block_size * ib:block_size * (ib + 1)]
                _block_weights(xb, quant_weights, QK_K * ibl + block_size * ib, sigma2, weight, waux, block_size)
                for k in range(bs8):
                    block_signs[k] = _sign_split(xb, 8 * k, weight, xval, False)
                max_ = xval[0]
                for i in range(1, block_size):
                    max_ = max_ if max_ > xval[i] else xval[i]
                L[:] = 0
                if max_ == F(0):
                    scales[ib] = F(0)
                    continue
                is_on_grid[:] = False
                scale = _iq3_search(xval, weight, waux, L, Laux, is_on_grid, is_on_grid_aux, max_, 9, False,
                                    grid, kmap, neighbours)
                if scale < F(0):
                    scale = -scale
                    for k in range(bs8):
                        block_signs[k] = (~block_signs[k]) & 0xFF
                for k in range(bs4):
                    grid_index = _grid_index(L, k, kmap)
                    y[qs + k] = grid_index & 255
                    y[_IQ3S_QH + (ib * bs4 + k) // 8] |= ((grid_index >> 8) << ((ib * bs4 + k) % 8)) & 0xFF
                qs += bs4
                for k in range(bs8):
                    y[signs + k] = block_signs[k]
                signs += bs8
                if not scale >= F(0):
                    raise ValueError("GGML_ASSERT(scale >= 0)")
                scales[ib] = scale
                max_scale = max_scale if max_scale > scale else scale
            if max_scale == F(0):
                continue
            d = max_scale / F(31)
            store_fp16(y, 0, fp32_to_fp16(d * F(1.033)))
            id_ = F(1) / d
            for ib in range(0, QK_K // block_size, 2):
                l1 = nearest_int(F(0.5) * (id_ * scales[ib] - F(1)))
                l1 = max(0, min(15, l1))
                l2 = nearest_int(F(0.5) * (id_ * scales[ib + 1] - F(1)))
                l2 = max(0, min(15, l2))
                y[_IQ3S_SCALES + ib // 2] = (l1 | (l2 << 4)) & 0xFF


# -- IQ2_XXS / IQ2_XS / IQ2_S -----------------------------------------------------------------
#
#   block_iq2_xxs  d | 8 x (u32 4 grid indices, u32 4x7 sign bits | scale << 28)           66
#   block_iq2_xs   d | qs[32] u16 (index | 7 signs << 9) | scales[8] (2 nibbles)          74
#   block_iq2_s    d | qs[32] low index bits | signs[32] | qh[8] (2 bits each) | scales[8] 82
GROUP_MAX_EPS_IQ2_S = F(1e-8)
_IQ2XXS_SIZE, _IQ2XS_SIZE, _IQ2S_SIZE = 66, 74, 82


@jit
def _iq2_point(xval, k, id_, kMaxQ, L, store):
    """u of the 8 values of group k at inverse scale id_ (levels in [0, kMaxQ-1]; into L if store)."""
    u = 0
    for i in range(8):
        l = nearest_int(F(0.5) * (id_ * xval[8 * k + i] - F(1)))
        l = max(0, min(kMaxQ - 1, l))
        if store:
            L[8 * k + i] = l
        u |= l << (2 * i)
    return u


@jit
def _iq2_index(L, k, kmap):
    u = 0
    for i in range(8):
        u |= I(L[8 * k + i]) << (2 * i)
    grid_index = kmap[u]
    if grid_index < 0:
        raise ValueError("found point not on grid (libggml aborts here)")
    return grid_index


@jit
def _iq2_sums(weight, xval, L, n):
    sumqx = F(0)
    sumq2 = F(0)
    for i in range(n):
        w = weight[i]
        q = F(2 * I(L[i]) + 1)
        sumqx += w * xval[i] * q
        sumq2 += w * q * q
    return sumqx, sumq2


@jit
def _iq2_xxs(rows, out, quant_weights, grid, kmap, neighbours):
    """quantize_iq2_xxs -> quantize_row_iq2_xxs_impl (importance required)."""
    kMaxQ = 3
    scales = np.empty(8, np.float32)
    weight = np.empty(32, np.float32)
    xval = np.empty(32, np.float32)
    waux = np.empty(32, np.float32)
    L = np.zeros(32, np.uint8)
    Laux = np.zeros(32, np.uint8)
    block_signs = np.zeros(4, np.int64)
    q2 = np.zeros(16, np.int64)
    for r in range(rows.shape[0]):
        for ibl in range(rows.shape[1] // QK_K):
            y = out[r, ibl * _IQ2XXS_SIZE:(ibl + 1) * _IQ2XXS_SIZE]
            y[:] = 0
            q2[:] = 0
            max_scale = F(0)
            xbl = rows[r, QK_K * ibl:QK_K * (ibl + 1)]
            sumx2 = F(0)
            for i in range(QK_K):
                sumx2 += xbl[i] * xbl[i]
            sigma2 = sumx2 / F(QK_K)
            for ib in range(QK_K // 32):
                xb = xbl[32 * ib:32 * ib + 32]
                _block_weights(xb, quant_weights, QK_K * ibl + 32 * ib, sigma2, weight, waux, 32)
                for k in range(4):
                    block_signs[k] = _sign_split(xb, 8 * k, weight, xval, True) & 127
                max_ = xval[0]
                for i in range(1, 32):
                    max_ = max_ if max_ > xval[i] else xval[i]
                if max_ < GROUP_MAX_EPS:
                    scales[ib] = F(0)
                    L[:] = 0
                    continue
                scale = make_qp_quants(32, kMaxQ + 1, xval, L, weight)
                eff_max = scale * F(kMaxQ)
                if eff_max <= F(0):
                    scales[ib] = F(0)
                    L[:] = 0
                    continue
                best = F(0)
                for is_ in range(-6, 7):
                    id_ = (F(2 * kMaxQ - 1) + F(is_) * F(0.1)) / eff_max
                    this_scale = F(1) / id_
                    for k in range(4):
                        u = _iq2_point(xval, k, id_, kMaxQ, Laux, True)
                        if kmap[u] < 0:
                            _find_best_neighbour(neighbours, -kmap[u] - 1, grid, xval, 8 * k, waux, this_scale, Laux, 8 * k)
                    sumqx, sumq2 = _iq2_sums(weight, xval, Laux, 32)
                    if sumq2 > F(0) and sumqx * sumqx > best * sumq2:
                        scale = sumqx / sumq2
                        best = scale * sumqx
                        L[:] = Laux
                if scale > F(0):
                    id_ = F(1) / scale
                    for k in range(4):
                        u = _iq2_point(xval, k, id_, kMaxQ, L, False)
                        grid_index = kmap[u]
                        if grid_index < 0:
                            grid_index = _find_best_neighbour(neighbours, -kmap[u] - 1, grid, xval, 8 * k, waux,
                                                              scale, L, 8 * k)
                        for i in range(8):
                            L[8 * k + i] = (grid[grid_index, i] - 1) // 2
                    sumqx, sumq2 = _iq2_sums(weight, xval, L, 32)
                    if sumq2 > F(0):
                        scale = sumqx / sumq2
                if scale < F(0):
                    scale = -scale
                    for k in range(4):
                        block_signs[k] = (~block_signs[k]) & 127
                for k in range(4):
                    grid_index = _iq2_index(L, k, kmap)
                    q2[2 * ib] |= grid_index << (8 * k)
                    q2[2 * ib + 1] |= block_signs[k] << (7 * k)
                if not scale >= F(0):
                    raise ValueError("GGML_ASSERT(scale >= 0)")
                scales[ib] = scale
                max_scale = max_scale if max_scale > scale else scale
            if max_scale == F(0):
                continue
            d = max_scale / F(31)
            store_fp16(y, 0, fp32_to_fp16(d))
            id_ = F(1) / d
            for ib in range(QK_K // 32):
                l = nearest_int(F(0.5) * (id_ * scales[ib] - F(1)))
                l = max(0, min(15, l))
                q2[2 * ib + 1] |= l << 28
            for j in range(16):
                for b in range(4):
                    y[2 + 4 * j + b] = (q2[j] >> (8 * b)) & 0xFF


@jit
def _iq2_16(rows, out, quant_weights, grid, kmap, neighbours, is_s):
    """quantize_row_iq2_xs_impl (is_s False: importance required, 7 signs + parity) and
    quantize_row_iq2_s_impl (is_s True): 16-value sub-blocks of two 8-value grid points."""
    kMaxQ = 3
    size = _IQ2S_SIZE if is_s else _IQ2XS_SIZE
    scales = np.empty(16, np.float32)
    weight = np.empty(16, np.float32)
    xval = np.empty(16, np.float32)
    waux = np.empty(16, np.float32)
    L = np.zeros(16, np.int8)
    Laux = np.zeros(16, np.int8)
    is_on_grid = np.zeros(2, np.bool_)
    is_on_grid_aux = np.zeros(2, np.bool_)
    block_signs = np.zeros(2, np.int64)
    eps = GROUP_MAX_EPS_IQ2_S if is_s else GROUP_MAX_EPS
    for r in range(rows.shape[0]):
        for ibl in range(rows.shape[1] // QK_K):
            y = out[r, ibl * size:(ibl + 1) * size]
            y[:] = 0
            sc_off = 2 + 64 if not is_s else 2 + 64 + 8
            max_scale = F(0)
            xbl = rows[r, QK_K * ibl:QK_K * (ibl + 1)]
            sumx2 = F(0)
            for i in range(QK_K):
                sumx2 += xbl[i] * xbl[i]
            sigma2 = F(2) * sumx2 / F(QK_K) if is_s else sumx2 / F(QK_K)
            for ib in range(QK_K // 16):
                xb = xbl[16 * ib:16 * ib + 16]
                if is_s and quant_weights is None:
                    for i in range(16):
                        weight[i] = F(0.25) * sigma2 + xb[i] * xb[i]
                    for i in range(16):
                        waux[i] = np.sqrt(weight[i])
                else:
                    _block_weights(xb, quant_weights, QK_K * ibl + 16 * ib, sigma2, weight, waux, 16)
                for k in range(2):
                    s = _sign_split(xb, 8 * k, weight, xval, not is_s)
                    block_signs[k] = s if is_s else s & 127
                max_ = xval[0]
                for i in range(1, 16):
                    max_ = max_ if max_ > xval[i] else xval[i]
                L[:] = 0
                if max_ < eps:
                    scales[ib] = F(0)
                    continue
                best = F(0)
                scale = max_ / F(2 * kMaxQ - 1)
                is_on_grid[:] = True
                for is_ in range(-9, 10):
                    id_ = (F(2 * kMaxQ - 1) + F(is_) * F(0.1)) / max_
                    this_scale = F(1) / id_
                    for k in range(2):
                        u = _iq2_point(xval, k, id_, kMaxQ, Laux, True)
                        is_on_grid_aux[k] = True
                        if kmap[u] < 0:
                            is_on_grid_aux[k] = False
                            _find_best_neighbour(neighbours, -kmap[u] - 1, grid, xval, 8 * k, waux, this_scale, Laux, 8 * k)
                    sumqx, sumq2 = _iq2_sums(weight, xval, Laux, 16)
                    if sumq2 > F(0) and sumqx * sumqx > best * sumq2:
                        scale = sumqx / sumq2
                        best = scale * sumqx
                        L[:] = Laux
                        is_on_grid[:] = is_on_grid_aux
                n_not_ongrid = 0
                for k in range(2):
                    if not is_on_grid[k]:
                        n_not_ongrid += 1
                if n_not_ongrid > 0 and scale > F(0):
                    id_ = F(1) / scale
                    for k in range(2):
                        if is_on_grid[k]:
                            continue
                        u = _iq2_point(xval, k, id_, kMaxQ, L, True)
                        if kmap[u] < 0:
                            _find_best_neighbour(neighbours, -kmap[u] - 1, grid, xval, 8 * k, waux, scale, L, 8 * k)
                    sumqx, sumq2 = _iq2_sums(weight, xval, L, 16)
                    if sumq2 > F(0):
                        scale = sumqx / sumq2
                if scale < F(0):
                    scale = -scale
                    for k in range(2):
                        block_signs[k] = (~block_signs[k]) & (0xFF if is_s else 127)
                for k in range(2):
                    grid_index = _iq2_index(L, k, kmap)
                    i8 = 2 * ib + k
                    if is_s:
                        y[2 + i8] = grid_index & 255
                        y[2 + 64 + i8 // 4] |= ((grid_index >> 8) << (2 * (i8 % 4))) & 0xFF
                        y[2 + QK_K // 8 + i8] = block_signs[k]
                    else:
                        v = grid_index | (block_signs[k] << 9)
                        y[2 + 2 * i8] = v & 0xFF
                        y[2 + 2 * i8 + 1] = (v >> 8) & 0xFF
                if not scale >= F(0):
                    raise ValueError("GGML_ASSERT(scale >= 0)")
                scales[ib] = scale
                max_scale = max_scale if max_scale > scale else scale
            if max_scale == F(0):
                if not is_s:
                    y[2:66] = 0
                continue
            d = max_scale / F(31)
            store_fp16(y, 0, fp32_to_fp16(d * F(0.9875) if is_s else d))
            id_ = F(1) / d
            for ib in range(QK_K // 16):
                l = nearest_int(F(0.5) * (id_ * scales[ib] - F(1)))
                l = max(0, min(15, l))
                if ib % 2 == 0:
                    y[sc_off + ib // 2] = l
                else:
                    y[sc_off + ib // 2] |= l << 4


# -- IQ1_S ----------------------------------------------------------------------------------------
#
#   block_iq1_s  d | qs[32] low 8 index bits | qh[8] u16: 4 x 3 high index bits, 3-bit scale << 12,
#                delta sign << 15                                                             50
# quantize_row_iq1_s_impl sorts each block's values with glibc qsort, a stable merge sort for
# arrays this small (glibc 2.36 here); the stable argsort below orders ties the same way.
IQ1S_DELTA = F(0.125)
GROUP_MAX_EPS_IQ1_S = F(1e-12)
_IQ1S_SIZE, _IQ1S_QS, _IQ1S_QH = 50, 2, 34


@jit
def _iq1_find_best_neighbour2(neighbours, start, grid, xval, xo, weight, scale, xg, L, lo):
    num_neighbors = I(neighbours[start])
    best_score = FLT_MAX
    grid_index = -1
    for j in range(1, num_neighbors + 1):
        idx = I(neighbours[start + j])
        d2 = F(0)
        for i in range(8):
            q = xg[(I(grid[idx, i]) - 1) >> 1]  # (g - 1) // 2 for the odd, positive grid values
            w = weight[xo + i]
            diff = scale * q - xval[xo + i]
            d2 += w * diff * diff
        if d2 < best_score:
            best_score = d2
            grid_index = idx
    if grid_index < 0:
        # C then scans the whole grid reading xval past the group (undefined): only non-finite input gets here
        raise ValueError("no grid neighbour (libggml reads out of bounds, then asserts)")
    for i in range(8):
        L[lo + i] = (grid[grid_index, i] - 1) // 2
    return grid_index


@jit
def _iq1_s(rows, out, quant_weights, grid, kmap, neighbours):
    """quantize_iq1_s -> quantize_row_iq1_s_impl (importance required)."""
    block_size = 32
    x_p = np.array([F(-1) + IQ1S_DELTA, IQ1S_DELTA, F(1) + IQ1S_DELTA], np.float32)
    x_m = np.array([F(-1) - IQ1S_DELTA, -IQ1S_DELTA, F(1) - IQ1S_DELTA], np.float32)
    scales = np.empty(QK_K // block_size, np.float32)
    shifts = np.empty(QK_K // block_size, np.int64)
    weight = np.empty(block_size, np.float32)
    sumx = np.empty(block_size + 1, np.float32)
    sumw = np.empty(block_size + 1, np.float32)
    L = np.zeros(block_size, np.int8)
    index = np.zeros(block_size // 8, np.int64)
    for r in range(rows.shape[0]):
        for ibl in range(rows.shape[1] // QK_K):
            y = out[r, ibl * _IQ1S_SIZE:(ibl + 1) * _IQ1S_SIZE]
            y[:] = 0
            qh = np.zeros(QK_K // block_size, np.int64)
            max_scale = F(0)
            xbl = rows[r, QK_K * ibl:QK_K * (ibl + 1)]
            sumx2 = F(0)
            for i in range(QK_K):
                sumx2 += xbl[i] * xbl[i]
            sigma2 = F(2) * sumx2 / F(QK_K)
            for ib in range(QK_K // block_size):
                xb = xbl[block_size * ib:block_size * (ib + 1)]
                qo = QK_K * ibl + block_size * ib
                for i in range(block_size):
                    weight[i] = quant_weights[qo + i] * np.sqrt(sigma2 + xb[i] * xb[i])
                max_ = abs(xb[0])
                for i in range(1, block_size):
                    v = abs(xb[i])
                    max_ = max_ if max_ > v else v
                if max_ < GROUP_MAX_EPS_IQ1_S:
                    scales[ib] = F(0)
                    shifts[ib] = 1
                    continue
                idx = np.argsort(xb, kind="mergesort")
                sumx[0] = F(0)
                sumw[0] = F(0)
                for j in range(block_size):
                    i = idx[j]
                    sumx[j + 1] = sumx[j] + weight[i] * xb[i]
                    sumw[j + 1] = sumw[j] + weight[i]
                best_score = -FLT_MAX
                scale = max_
                besti1 = -1
                besti2 = -1
                best_shift = 0
                for i1 in range(block_size + 1):
                    for i2 in range(i1, block_size + 1):
                        for sh in range(2):
                            xx = x_p if sh == 0 else x_m
                            sumqx = ((sumx[i1] - sumx[0]) * xx[0] + (sumx[i2] - sumx[i1]) * xx[1]
                                     + (sumx[block_size] - sumx[i2]) * xx[2])
                            sumq2 = ((sumw[i1] - sumw[0]) * xx[0] * xx[0] + (sumw[i2] - sumw[i1]) * xx[1] * xx[1]
                                     + (sumw[block_size] - sumw[i2]) * xx[2] * xx[2])
                            if sumq2 > F(0) and sumqx * sumqx > best_score * sumq2:
                                scale = sumqx / sumq2
                                best_score = scale * sumqx
                                besti1 = i1
                                besti2 = i2
                                best_shift = 1 if sh == 0 else -1
                if besti1 < 0 or besti2 < 0 or best_shift == 0:
                    scales[ib] = F(0)
                    shifts[ib] = 1
                    continue
                for j in range(besti1):
                    L[idx[j]] = 0
                for j in range(besti1, besti2):
                    L[idx[j]] = 1
                for j in range(besti2, block_size):
                    L[idx[j]] = 2
                if scale < F(0):
                    for j in range(block_size):
                        L[j] = 2 - L[j]
                    scale = -scale
                    best_shift = -best_shift
                all_on_grid = True
                xx = x_p if best_shift == 1 else x_m
                for k in range(block_size // 8):
                    u = 0
                    for j in range(8):
                        u |= I(L[8 * k + j]) << (2 * j)
                    grid_index = kmap[u]
                    if grid_index < 0:
                        all_on_grid = False
                        grid_index = _iq1_find_best_neighbour2(neighbours, -kmap[u] - 1, grid, xb, 8 * k, weight,
                                                               scale, xx, L, 8 * k)
                    index[k] = grid_index
                if not all_on_grid:
                    sumqx = F(0)
                    sumq2 = F(0)
                    for k in range(block_size // 8):
                        for j in range(8):
                            w = weight[8 * k + j]
                            q = xx[(grid[index[k], j] - 1) // 2]
                            sumqx += w * q * xb[8 * k + j]
                            sumq2 += w * q * q
                    if sumqx > F(0) and sumq2 > F(0):
                        scale = sumqx / sumq2
                h = 0
                for k in range(block_size // 8):
                    y[_IQ1S_QS + (block_size // 8) * ib + k] = index[k] & 255
                    h |= (index[k] >> 8) << (3 * k)
                qh[ib] = h
                if not scale >= F(0):
                    raise ValueError("GGML_ASSERT(scale >= 0)")
                scales[ib] = scale
                shifts[ib] = best_shift
                max_scale = max_scale if max_scale > scale else scale
            if max_scale != F(0):
                d = max_scale / F(15)
                store_fp16(y, 0, fp32_to_fp16(d * F(1.125)))
                id_ = F(1) / d
                for ib in range(QK_K // block_size):
                    l = nearest_int(F(0.5) * (id_ * scales[ib] - F(1)))
                    l = max(0, min(7, l))
                    if shifts[ib] == -1:
                        l |= 8
                    qh[ib] |= l << 12
            for ib in range(QK_K // block_size):
                y[_IQ1S_QH + 2 * ib] = qh[ib] & 0xFF
                y[_IQ1S_QH + 2 * ib + 1] = (qh[ib] >> 8) & 0xFF


# -- IQ1_M ----------------------------------------------------------------------------------------
#
#   block_iq1_m  qs[32] low 8 index bits | qh[16] 2 x (3 high index bits, delta sign bit) |
#                scales[8] as 4 u16: 4 x 3-bit block scales, and one nibble of the fp16 d    56
IQ1M_DELTA = F(0.125)
GROUP_MAX_EPS_IQ1_M = F(1e-7)
_IQ1M_SIZE, _IQ1M_QH, _IQ1M_SCALES = 56, 32, 48
_IQ1M_MASKS = np.array([0x00, 0x80, 0x08, 0x88], np.int64)


@jit
def _iq1_m_weights(xb, quant_weights, qo, sigma2, weight):
    if quant_weights is not None:
        for i in range(16):
            weight[i] = quant_weights[qo + i] * np.sqrt(sigma2 + xb[i] * xb[i])
    else:
        for i in range(16):
            weight[i] = xb[i] * xb[i]


@jit
def _iq1_m(rows, out, quant_weights, grid, kmap, neighbours):
    """quantize_iq1_m -> quantize_row_iq1_m_impl (importance optional)."""
    block_size = 16
    x_p = np.array([F(-1) + IQ1M_DELTA, IQ1M_DELTA, F(1) + IQ1M_DELTA], np.float32)
    x_m = np.array([F(-1) - IQ1M_DELTA, -IQ1M_DELTA, F(1) - IQ1M_DELTA], np.float32)
    scales = np.empty(QK_K // block_size, np.float32)
    shifts = np.empty(QK_K // block_size, np.int64)
    weight = np.empty(block_size, np.float32)
    L = np.zeros(block_size, np.int8)
    index = np.zeros(2, np.int64)
    px = np.zeros((2, block_size + 1), np.float32)
    pw = np.zeros((2, block_size + 1), np.float32)
    sumqx = np.zeros(4, np.float32)
    sumq2 = np.zeros(4, np.float32)
    qx_p = np.zeros(2, np.float32)
    qx_m = np.zeros(2, np.float32)
    q2_p = np.zeros(2, np.float32)
    q2_m = np.zeros(2, np.float32)
    sc = np.zeros(4, np.int64)
    qh = np.zeros(QK_K // block_size, np.int64)
    for r in range(rows.shape[0]):
        for ibl in range(rows.shape[1] // QK_K):
            y = out[r, ibl * _IQ1M_SIZE:(ibl + 1) * _IQ1M_SIZE]
            y[:] = 0
            qh[:] = 0
            sc[:] = 0
            max_scale = F(0)
            xbl = rows[r, QK_K * ibl:QK_K * (ibl + 1)]
            sumx2 = F(0)
            for i in range(QK_K):
                sumx2 += xbl[i] * xbl[i]
            sigma2 = F(2) * sumx2 / F(QK_K)
            for ib in range(QK_K // block_size):
                xb = xbl[block_size * ib:block_size * (ib + 1)]
                _iq1_m_weights(xb, quant_weights, QK_K * ibl + block_size * ib, sigma2, weight)
                max_ = abs(xb[0])
                for i in range(1, block_size):
                    v = abs(xb[i])
                    max_ = max_ if max_ > v else v
                if max_ < GROUP_MAX_EPS_IQ1_M:
                    scales[ib] = F(0)
                    shifts[ib] = 0
                    continue
                idx = np.argsort(xb, kind="mergesort")  # glibc 2.36 qsort: stable merge sort
                best_score = -FLT_MAX
                scale = max_
                besti1 = -1
                besti2 = -1
                best_k = -1
                px[:, 0] = F(0)
                pw[:, 0] = F(0)
                for j in range(block_size):
                    i = idx[j]
                    h = 0 if i < block_size // 2 else 1
                    px[h, j + 1] = px[h, j] + weight[i] * xb[i]
                    px[1 - h, j + 1] = px[1 - h, j]
                    pw[h, j + 1] = pw[h, j] + weight[i]
                    pw[1 - h, j + 1] = pw[1 - h, j]
                txs0 = px[0, block_size]
                txs1 = px[1, block_size]
                tws0 = pw[0, block_size]
                tws1 = pw[1, block_size]
                p2 = x_p[2]
                m2 = x_m[2]
                cp1 = x_p[0] * x_p[0] - x_p[1] * x_p[1]
                cp2 = x_p[1] * x_p[1] - x_p[2] * x_p[2]
                cm1 = x_m[0] * x_m[0] - x_m[1] * x_m[1]
                cm2 = x_m[1] * x_m[1] - x_m[2] * x_m[2]
                for i1 in range(block_size + 1):
                    for i2 in range(i1, block_size + 1):
                        for h in range(2):
                            txs = txs0 if h == 0 else txs1
                            tws = tws0 if h == 0 else tws1
                            sx = px[h, i1] + px[h, i2]
                            qx_p[h] = txs * p2 - sx
                            qx_m[h] = txs * m2 - sx
                            q2_p[h] = tws * p2 * p2 + pw[h, i1] * cp1 + pw[h, i2] * cp2
                            q2_m[h] = tws * m2 * m2 + pw[h, i1] * cm1 + pw[h, i2] * cm2
                        sumqx[0] = qx_p[0] + qx_p[1]
                        sumqx[1] = qx_p[0] + qx_m[1]
                        sumqx[2] = qx_m[0] + qx_p[1]
                        sumqx[3] = qx_m[0] + qx_m[1]
                        sumq2[0] = q2_p[0] + q2_p[1]
                        sumq2[1] = q2_p[0] + q2_m[1]
                        sumq2[2] = q2_m[0] + q2_p[1]
                        sumq2[3] = q2_m[0] + q2_m[1]
                        for k in range(4):
                            if sumq2[k] > F(0) and sumqx[k] * sumqx[k] > best_score * sumq2[k]:
                                scale = sumqx[k] / sumq2[k]
                                best_score = scale * sumqx[k]
                                besti1 = i1
                                besti2 = i2
                                best_k = k
                if besti1 < 0 or besti2 < 0 or best_k < 0:
                    scales[ib] = F(0)
                    shifts[ib] = 0
                    continue
                for j in range(besti1):
                    L[idx[j]] = 0
                for j in range(besti1, besti2):
                    L[idx[j]] = 1
                for j in range(besti2, block_size):
                    L[idx[j]] = 2
                if scale < F(0):
                    for j in range(block_size):
                        L[j] = 2 - L[j]
                    scale = -scale
                    best_k = 3 - best_k
                all_on_grid = True
                for k in range(2):
                    if k == 0:
                        xx = x_p if best_k < 2 else x_m
                    else:
                        xx = x_p if best_k % 2 == 0 else x_m
                    u = 0
                    for j in range(8):
                        u |= I(L[8 * k + j]) << (2 * j)
                    grid_index = kmap[u]
                    if grid_index < 0:
                        all_on_grid = False
                        grid_index = _iq1_find_best_neighbour2(neighbours, -kmap[u] - 1, grid, xb, 8 * k, weight,
                                                               scale, xx, L, 8 * k)
                    index[k] = grid_index
                if not all_on_grid:
                    sumqx_f = F(0)
                    sumq2_f = F(0)
                    for k in range(2):
                        if k == 0:
                            xx = x_p if best_k < 2 else x_m
                        else:
                            xx = x_p if best_k % 2 == 0 else x_m
                        for j in range(8):
                            w = weight[8 * k + j]
                            q = xx[(grid[index[k], j] - 1) // 2]
                            sumqx_f += w * q * xb[8 * k + j]
                            sumq2_f += w * q * q
                    if sumqx_f > F(0) and sumq2_f > F(0):
                        scale = sumqx_f / sumq2_f
                y[2 * ib] = index[0] & 255
                y[2 * ib + 1] = index[1] & 255
                qh[ib] = ((index[0] >> 8) | ((index[1] >> 8) << 4)) & 0xFF
                if not scale >= F(0):
                    raise ValueError("GGML_ASSERT(scale >= 0)")
                scales[ib] = scale
                shifts[ib] = best_k
                max_scale = max_scale if max_scale > scale else scale
            if max_scale != F(0):
                d = max_scale / F(15)
                id_ = F(1) / d
                sumqx_f = F(0)
                sumq2_f = F(0)
                for ib in range(QK_K // block_size):
                    l = nearest_int(F(0.5) * (id_ * scales[ib] - F(1)))
                    l = max(0, min(7, l))
                    sc[ib // 4] |= l << (3 * (ib % 4))
                    qh[ib] |= _IQ1M_MASKS[shifts[ib]]
                    xb = xbl[block_size * ib:block_size * (ib + 1)]
                    _iq1_m_weights(xb, quant_weights, QK_K * ibl + block_size * ib, sigma2, weight)
                    for k in range(2):
                        if k == 0:
                            xx = x_p if shifts[ib] < 2 else x_m
                        else:
                            xx = x_p if shifts[ib] % 2 == 0 else x_m
                        gi = I(y[2 * ib + k]) + ((qh[ib] << (8 - 4 * k)) & 0x700)
                        for j in range(8):
                            w = weight[8 * k + j]
                            q = xx[(grid[gi, j] - 1) // 2] * F(2 * l + 1)
                            sumqx_f += w * q * xb[8 * k + j]
                            sumq2_f += w * q * q
                if sumq2_f > F(0):
                    d = sumqx_f / sumq2_f
                u16 = fp32_to_fp16(d * F(1.1125))
                sc[0] |= (u16 & 0x000F) << 12
                sc[1] |= (u16 & 0x00F0) << 8
                sc[2] |= (u16 & 0x0F00) << 4
                sc[3] |= u16 & 0xF000
            for ib in range(QK_K // block_size):
                y[_IQ1M_QH + ib] = qh[ib] & 0xFF
            for j in range(4):
                y[_IQ1M_SCALES + 2 * j] = sc[j] & 0xFF
                y[_IQ1M_SCALES + 2 * j + 1] = (sc[j] >> 8) & 0xFF


# -- the registered formats -------------------------------------------------------------------

class _IQuant(QuantFormat):
    """``quantize_iqN(src, dst, nrow, n_per_row, quant_weights)``: one kernel, importance optional."""

    uses_importance = True

    @classmethod
    def quantize_rows(cls, rows: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
        out = np.empty((rows.shape[0], cls.row_size(rows.shape[1])), dtype=np.uint8)
        cls._kernel(rows, out, importance)
        return out

    @staticmethod
    def _kernel(rows: np.ndarray, out: np.ndarray, importance: np.ndarray | None) -> None:
        raise NotImplementedError


class IQ4_NL(_IQuant, qtype=GGMLQuantizationType.IQ4_NL):
    _kernel = staticmethod(_iq4_nl)


class IQ4_XS(_IQuant, qtype=GGMLQuantizationType.IQ4_XS):
    _kernel = staticmethod(_iq4_xs)


class _Lattice(_IQuant):
    """Types that search a grid: the kernel also gets the lazily built (grid, kmap, neighbours)."""

    # ggml_quantize_requires_imatrix: libggml asserts an importance vector for these
    requires_importance: ClassVar[bool] = False

    @classmethod
    def quantize_rows(cls, rows: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
        if importance is None and cls.requires_importance:
            raise FormatError(f"{cls.qtype.name} needs importance weights (an imatrix); libggml refuses it without")
        out = np.empty((rows.shape[0], cls.row_size(rows.shape[1])), dtype=np.uint8)
        try:
            cls._kernel(rows, out, importance, *lattice(cls.qtype))
        except ValueError as err:  # where libggml's GGML_ASSERT aborts the process
            raise FormatError(f"{cls.qtype.name}: cannot quantize these values ({err}); "
                              "libggml aborts on them too (inf, nan, or values so large that weighted squares overflow float32)") from None
        return out


class IQ3_XXS(_Lattice, qtype=GGMLQuantizationType.IQ3_XXS):
    _kernel = staticmethod(_iq3_xxs)


class IQ3_S(_Lattice, qtype=GGMLQuantizationType.IQ3_S):
    _kernel = staticmethod(_iq3_s)


class IQ2_XXS(_Lattice, qtype=GGMLQuantizationType.IQ2_XXS):
    requires_importance = True
    _kernel = staticmethod(_iq2_xxs)


class IQ2_XS(_Lattice, qtype=GGMLQuantizationType.IQ2_XS):
    requires_importance = True

    @staticmethod
    def _kernel(rows, out, importance, grid, kmap, neighbours):
        _iq2_16(rows, out, importance, grid, kmap, neighbours, False)


class IQ2_S(_Lattice, qtype=GGMLQuantizationType.IQ2_S):
    @staticmethod
    def _kernel(rows, out, importance, grid, kmap, neighbours):
        _iq2_16(rows, out, importance, grid, kmap, neighbours, True)


class IQ1_S(_Lattice, qtype=GGMLQuantizationType.IQ1_S):
    requires_importance = True
    _kernel = staticmethod(_iq1_s)


class IQ1_M(_Lattice, qtype=GGMLQuantizationType.IQ1_M):
    _kernel = staticmethod(_iq1_m)

    @classmethod
    def quantize_rows(cls, rows: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
        # the grid and neighbour lists of IQ1_S (iq2_data_index maps both to one entry)
        out = np.empty((rows.shape[0], cls.row_size(rows.shape[1])), dtype=np.uint8)
        try:
            _iq1_m(rows, out, importance, *lattice(GGMLQuantizationType.IQ1_S))
        except ValueError as err:
            raise FormatError(f"IQ1_M: cannot quantize these values ({err}); libggml aborts on them too") from None
        return out
