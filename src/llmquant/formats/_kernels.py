"""Numeric kernels shared by the block formats, translated line by line from ``ggml-quants.c``.

libggml's quantizers are compiled with plain ``-O3`` for baseline x86-64 (SSE2, no FMA), so they
are sequential IEEE float32 arithmetic in source order. These numba functions do the same
operations in the same order, all in float32: every constant is an ``np.float32`` (``F(...)``)
and every int entering float arithmetic is converted with ``F(l)`` first, because numba widens
``float32 op int`` and ``float32 op python-float`` to float64, and one widening breaks
byte-identity. ``error_model="numpy"`` gives IEEE inf/nan on division by zero, as C does.

Conventions: the C argument order, 1-D float32 views for ``x``, caller-owned int8/uint8 ``L``
buffers, a 1-element float32 array for the out-parameter ``*the_min``; ``weights`` / ``qw`` may
be None where the C pointer may be NULL.

Numba's on-disk cache keys a function on its own file only: after editing this module, delete
``formats/__pycache__/*.nb*`` or callers in kquants.py / legacy.py keep the old code.
"""

# the C comparisons stay as written: max()/min() differ from them on NaN and on operand order
# ruff: noqa: PLR1730, FURB136

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

F = np.float32

QK_K = 256
GROUP_MAX_EPS = F(1e-15)

# exact powers of two used by ggml's fp16 conversion (0x1.0p+112f, 0x1.0p-110f, 0x1.0p-112f)
_P112 = F(2.0**112)
_M110 = F(2.0**-110)
_M112 = F(2.0**-112)

jit = njit(nogil=True, cache=True, error_model="numpy")
# inlined at numba level: saves the per-call array refcounting (one call per 16 values in Q6_K)
jit_inline = njit(nogil=True, cache=True, error_model="numpy", inline="always")


# -- bit casts (the C code's memcpy / union punning) ----------------------------------------------

@intrinsic
def f32_bits(typingctx, x):
    """float32 -> its IEEE bits as a non-negative int64 (rejects float64 at compile time)."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.zext(builder.bitcast(args[0], ir.IntType(32)), ir.IntType(64))

    return types.int64(types.float32), codegen


@intrinsic
def bits_f32(typingctx, i):
    """low 32 bits of an integer -> float32 with those bits."""
    if not isinstance(i, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        v = args[0]
        if i.bitwidth > 32:
            v = builder.trunc(v, ir.IntType(32))
        elif i.bitwidth < 32:
            v = builder.zext(v, ir.IntType(32))
        return builder.bitcast(v, ir.FloatType())

    return types.float32(i), codegen


@jit
def nearest_int(fval):
    # same rounding as nearest_int() in ggml-quants.c: add 1.5*2^23, keep the low mantissa bits
    # (the C assert |fval| <= 4194303 is compiled out; out-of-range values give the same garbage)
    val = fval + F(12582912.0)
    return (f32_bits(val) & 0x007FFFFF) - 0x00400000


@jit
def to_int8(v):
    """C's implicit int -> int8_t conversion (gcc: modulo 2^8)."""
    return ((v & 0xFF) ^ 0x80) - 0x80


# -- fp16 (ggml_compute_fp32_to_fp16 / ggml_compute_fp16_to_fp32 in ggml-impl.h) ------------------

@jit
def fp32_to_fp16(f):
    """float32 -> fp16 bits (int), round to nearest even, NaN -> 0x7E00, as ggml does."""
    base = (abs(f) * _P112) * _M110
    w = f32_bits(f)
    shl1_w = (w + w) & 0xFFFFFFFF
    sign = w & 0x80000000
    bias = shl1_w & 0xFF000000
    if bias < 0x71000000:
        bias = 0x71000000
    base = bits_f32((bias >> 1) + 0x07800000) + base
    bits = f32_bits(base)
    exp_bits = (bits >> 13) & 0x00007C00
    mantissa_bits = bits & 0x00000FFF
    nonsign = exp_bits + mantissa_bits
    return (sign >> 16) | (0x7E00 if shl1_w > 0xFF000000 else nonsign)


@jit
def fp16_to_fp32(h):
    """fp16 bits -> float32 (exact)."""
    w = (h & 0xFFFF) << 16
    sign = w & 0x80000000
    two_w = (w + w) & 0xFFFFFFFF
    exp_offset = 0xE0 << 23
    normalized_value = bits_f32((two_w >> 4) + exp_offset) * _M112
    magic_mask = 126 << 23
    denormalized_value = bits_f32((two_w >> 17) | magic_mask) - F(0.5)
    if two_w < (1 << 27):
        result = sign | f32_bits(denormalized_value)
    else:
        result = sign | f32_bits(normalized_value)
    return bits_f32(result)


@jit
def store_fp16(y, pos, h):
    """little-endian ggml_half at y[pos:pos+2]."""
    y[pos] = h & 0xFF
    y[pos + 1] = (h >> 8) & 0xFF


# -- scale searches --------------------------------------------------------------------------------

@jit_inline
def make_qx_quants(n, nmax, x, L, rmse_type, qw):
    """Symmetric quants L in [0, 2*nmax) (int8), returns the scale. ``qw`` may be None."""
    max_ = F(0)
    amax = F(0)
    for i in range(n):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            max_ = x[i]
    if amax < GROUP_MAX_EPS:  # all zero
        for i in range(n):
            L[i] = 0
        return F(0)
    iscale = F(-nmax) / max_
    if rmse_type == 0:
        for i in range(n):
            l = nearest_int(iscale * x[i])
            L[i] = nmax + max(-nmax, min(nmax - 1, l))
        return F(1) / iscale
    return_early = False
    if rmse_type < 0:
        rmse_type = -rmse_type
        return_early = True
    sumlx = F(0)
    suml2 = F(0)
    for i in range(n):
        l = nearest_int(iscale * x[i])
        l = max(-nmax, min(nmax - 1, l))
        L[i] = l + nmax
        w = _qx_weight(qw, rmse_type, x, i)
        sumlx += w * x[i] * F(l)
        suml2 += w * F(l) * F(l)
    scale = sumlx / suml2 if suml2 != F(0) else F(0)
    if return_early:
        return F(0.5) * (scale + F(1) / iscale) if suml2 > F(0) else F(1) / iscale
    best = scale * sumlx
    for is_ in range(-9, 10):
        if is_ == 0:
            continue
        iscale = -(F(nmax) + F(0.1) * F(is_)) / max_
        sumlx = F(0)
        suml2 = F(0)
        for i in range(n):
            l = nearest_int(iscale * x[i])
            l = max(-nmax, min(nmax - 1, l))
            w = _qx_weight(qw, rmse_type, x, i)
            sumlx += w * x[i] * F(l)
            suml2 += w * F(l) * F(l)
        if suml2 > F(0) and sumlx * sumlx > best * suml2:
            for i in range(n):
                l = nearest_int(iscale * x[i])
                L[i] = nmax + max(-nmax, min(nmax - 1, l))
            scale = sumlx / suml2
            best = scale * sumlx
    return scale


@jit_inline
def _qx_weight(qw, rmse_type, x, i):
    if qw is not None:
        return qw[i]
    if rmse_type == 1:
        return x[i] * x[i]
    if rmse_type == 2:
        return F(1)
    if rmse_type == 3:
        return abs(x[i])
    return np.sqrt(abs(x[i]))


@jit
def make_q3_quants(n, nmax, x, L, do_rmse):
    """Q3_K's symmetric search without importance; L int8 in [0, 2*nmax)."""
    max_ = F(0)
    amax = F(0)
    for i in range(n):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            max_ = x[i]
    if amax < GROUP_MAX_EPS:  # all zero
        for i in range(n):
            L[i] = 0
        return F(0)
    iscale = F(-nmax) / max_
    if do_rmse:
        sumlx = F(0)
        suml2 = F(0)
        for i in range(n):
            l = nearest_int(iscale * x[i])
            l = max(-nmax, min(nmax - 1, l))
            L[i] = l
            w = x[i] * x[i]
            sumlx += w * x[i] * F(l)
            suml2 += w * F(l) * F(l)
        for itry in range(5):
            n_changed = 0
            for i in range(n):
                w = x[i] * x[i]
                slx = sumlx - w * x[i] * F(L[i])
                if slx > F(0):
                    sl2 = suml2 - w * F(L[i]) * F(L[i])
                    new_l = nearest_int(x[i] * sl2 / slx)
                    new_l = max(-nmax, min(nmax - 1, new_l))
                    if new_l != L[i]:
                        slx += w * x[i] * F(new_l)
                        sl2 += w * F(new_l) * F(new_l)
                        if sl2 > F(0) and slx * slx * suml2 > sumlx * sumlx * sl2:
                            L[i] = new_l
                            sumlx = slx
                            suml2 = sl2
                            n_changed += 1
            if n_changed == 0:
                break
        for i in range(n):
            L[i] += nmax
        return sumlx / suml2 if suml2 > F(0) else F(0)
    for i in range(n):
        l = nearest_int(iscale * x[i])
        l = max(-nmax, min(nmax - 1, l))
        L[i] = l + nmax
    return F(1) / iscale


@jit
def make_qkx2_quants(n, nmax, x, weights, L, the_min, Laux, rmin, rdelta, nstep, use_mad):
    """Asymmetric (scale, min) search; L uint8 in [0, nmax]; the_min[0] = -min; returns scale."""
    frmin = F(rmin)
    frdelta = F(rdelta)
    min_ = x[0]
    max_ = x[0]
    sum_w = weights[0]
    sum_x = sum_w * x[0]
    for i in range(1, n):
        if x[i] < min_:
            min_ = x[i]
        if x[i] > max_:
            max_ = x[i]
        w = weights[i]
        sum_w += w
        sum_x += w * x[i]
    if min_ > F(0):
        min_ = F(0)
    if max_ == min_:
        for i in range(n):
            L[i] = 0
        the_min[0] = -min_
        return F(0)
    iscale = F(nmax) / (max_ - min_)
    scale = F(1) / iscale
    best_error = F(0)
    for i in range(n):
        l = nearest_int(iscale * (x[i] - min_))
        L[i] = max(0, min(nmax, l))
        diff = scale * F(L[i]) + min_ - x[i]
        diff = abs(diff) if use_mad else diff * diff
        w = weights[i]
        best_error += w * diff
    if nstep < 1:
        the_min[0] = -min_
        return scale
    for is_ in range(nstep + 1):
        iscale = (frmin + frdelta * F(is_) + F(nmax)) / (max_ - min_)
        sum_l = F(0)
        sum_l2 = F(0)
        sum_xl = F(0)
        for i in range(n):
            l = nearest_int(iscale * (x[i] - min_))
            l = max(0, min(nmax, l))
            Laux[i] = l
            w = weights[i]
            sum_l += w * F(l)
            sum_l2 += w * F(l) * F(l)
            sum_xl += w * F(l) * x[i]
        D = sum_w * sum_l2 - sum_l * sum_l
        if D > F(0):
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            if this_min > F(0):
                this_min = F(0)
                this_scale = sum_xl / sum_l2
            cur_error = F(0)
            for i in range(n):
                diff = this_scale * F(Laux[i]) + this_min - x[i]
                diff = abs(diff) if use_mad else diff * diff
                w = weights[i]
                cur_error += w * diff
            if cur_error < best_error:
                for i in range(n):
                    L[i] = Laux[i]
                best_error = cur_error
                scale = this_scale
                min_ = this_min
    the_min[0] = -min_
    return scale


@jit
def make_qkx3_quants(n, nmax, x, weights, L, the_min, Laux, rmin, rdelta, nstep, use_mad):
    """Like make_qkx2_quants; ``weights`` None means x*x; the_min[0] = -min; returns scale."""
    frmin = F(rmin)
    frdelta = F(rdelta)
    min_ = x[0]
    max_ = x[0]
    sum_w = weights[0] if weights is not None else x[0] * x[0]
    sum_x = sum_w * x[0]
    for i in range(1, n):
        if x[i] < min_:
            min_ = x[i]
        if x[i] > max_:
            max_ = x[i]
        w = weights[i] if weights is not None else x[i] * x[i]
        sum_w += w
        sum_x += w * x[i]
    if min_ > F(0):
        min_ = F(0)
    if max_ <= min_:
        for i in range(n):
            L[i] = 0
        the_min[0] = -min_
        return F(0)
    iscale = F(nmax) / (max_ - min_)
    scale = F(1) / iscale
    best_mad = F(0)
    for i in range(n):
        l = nearest_int(iscale * (x[i] - min_))
        L[i] = max(0, min(nmax, l))
        diff = scale * F(L[i]) + min_ - x[i]
        diff = abs(diff) if use_mad else diff * diff
        w = weights[i] if weights is not None else x[i] * x[i]
        best_mad += w * diff
    if nstep < 1:
        the_min[0] = -min_
        return scale
    for is_ in range(nstep + 1):
        iscale = (frmin + frdelta * F(is_) + F(nmax)) / (max_ - min_)
        sum_l = F(0)
        sum_l2 = F(0)
        sum_xl = F(0)
        for i in range(n):
            l = nearest_int(iscale * (x[i] - min_))
            l = max(0, min(nmax, l))
            Laux[i] = l
            w = weights[i] if weights is not None else x[i] * x[i]
            sum_l += w * F(l)
            sum_l2 += w * F(l) * F(l)
            sum_xl += w * F(l) * x[i]
        D = sum_w * sum_l2 - sum_l * sum_l
        if D > F(0):
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            if this_min > F(0):
                this_min = F(0)
                this_scale = sum_xl / sum_l2
            mad = F(0)
            for i in range(n):
                diff = this_scale * F(Laux[i]) + this_min - x[i]
                diff = abs(diff) if use_mad else diff * diff
                w = weights[i] if weights is not None else x[i] * x[i]
                mad += w * diff
            if mad < best_mad:
                for i in range(n):
                    L[i] = Laux[i]
                best_mad = mad
                scale = this_scale
                min_ = this_min
    the_min[0] = -min_
    return scale


@jit
def make_qp_quants(n, nmax, x, L, quant_weights):
    """Non-negative quants of positive values (the sub-block scales); L uint8, wraps like C."""
    max_ = F(0)
    for i in range(n):
        max_ = max_ if max_ > x[i] else x[i]  # MAX(max, x[i])
    if max_ < GROUP_MAX_EPS:  # all zero
        for i in range(n):
            L[i] = 0
        return F(0)
    iscale = F(nmax) / max_
    for i in range(n):
        L[i] = nearest_int(iscale * x[i]) & 0xFF
    scale = F(1) / iscale
    best_mse = F(0)
    for i in range(n):
        diff = x[i] - scale * F(L[i])
        w = quant_weights[i]
        best_mse += w * diff * diff
    for is_ in range(-4, 5):
        if is_ == 0:
            continue
        iscale_is = (F(0.1) * F(is_) + F(nmax)) / max_
        scale_is = F(1) / iscale_is
        mse = F(0)
        for i in range(n):
            l = nearest_int(iscale_is * x[i])
            l = min(nmax, l)
            diff = x[i] - scale_is * F(l)
            w = quant_weights[i]
            mse += w * diff * diff
        if mse < best_mse:
            best_mse = mse
            iscale = iscale_is
    sumlx = F(0)
    suml2 = F(0)
    for i in range(n):
        l = nearest_int(iscale * x[i])
        l = min(nmax, l)
        L[i] = l & 0xFF
        w = quant_weights[i]
        sumlx += w * x[i] * F(l)
        suml2 += w * F(l) * F(l)
    for itry in range(5):
        n_changed = 0
        for i in range(n):
            w = quant_weights[i]
            slx = sumlx - w * x[i] * F(L[i])
            sl2 = suml2 - w * F(L[i]) * F(L[i])
            if slx > F(0) and sl2 > F(0):
                new_l = nearest_int(x[i] * sl2 / slx)
                new_l = min(nmax, new_l)
                if new_l != np.int64(L[i]):
                    slx += w * x[i] * F(new_l)
                    sl2 += w * F(new_l) * F(new_l)
                    if slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = new_l & 0xFF
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    return sumlx / suml2 if suml2 > F(0) else F(0)
