"""Ternary types TQ1_0 and TQ2_0 (BitNet b1.58 / TriLM weights, values -1, 0, 1 times d).

``quantize_row_tq1_0_ref`` / ``quantize_row_tq2_0_ref`` of ``ggml/src/ggml-quants.c``; libggml
ignores importance for both. Block layouts (``ggml-common.h``):

    block_tq1_0  qs[48] | qh[4] | d       54   qs: 5 trits a byte (base 3, scaled to 0..255)
    block_tq2_0  qs[64] | d               66   qs[j+m]: 4 values of 2 bits, x[m + n*32] in bits 2n

TQ1_0 stores a byte q of 5 trits t0..t4 (t0 most significant) as ceil(q * 256 / 243), so that
``(byte * 3) >> 8`` reads t0 back, then the next trit, and so on.
"""

# the C MAX() macro stays as written: max() differs from it on NaN
# ruff: noqa: FURB136

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from ._kernels import QK_K, F, fp32_to_fp16, jit, store_fp16
from .base import QuantFormat

_TQ1_QS, _TQ1_QH, _TQ1_D, _TQ1_SIZE = 0, 48, 52, 54
_TQ2_QS, _TQ2_D, _TQ2_SIZE = 0, 64, 66

_LONG_MIN = -(2**63)


@jit
def _lroundf(v):
    """C lroundf (half away from zero); NaN and out-of-range give LONG_MIN as glibc on x86-64."""
    if not (v > F(-9.223372e18) and v < F(9.223372e18)):
        return _LONG_MIN
    a = np.floor(np.float64(abs(v)) + 0.5)  # exact: |v| + 0.5 is representable in float64
    return int(a) if v >= F(0) else -int(a)


@jit
def _trit(v):
    """``int xi = lroundf(v) + 1``: the long result truncated to int, then kept as a C int."""
    xi = (_lroundf(v) + 1) & 0xFFFFFFFF
    return xi - (1 << 32) if xi >= (1 << 31) else xi


@jit
def _amax(x):
    amax = F(0)
    for j in range(QK_K):
        v = abs(x[j])
        amax = amax if amax > v else v  # MAX(amax, fabsf(v)) as the C macro evaluates it
    return amax


@jit
def _pack5(q):
    # ceiling division (243 == pow(3, 5)), then the uint8_t store
    return (((q & 0xFF) * 256 + (243 - 1)) // 243) & 0xFF


@jit
def _tq1_0_ref(rows, out):
    for r in range(rows.shape[0]):
        for i in range(rows.shape[1] // QK_K):
            x = rows[r, i * QK_K:(i + 1) * QK_K]
            y = out[r, i * _TQ1_SIZE:(i + 1) * _TQ1_SIZE]
            d = _amax(x)
            id_ = F(1) / d if d != F(0) else F(0)
            store_fp16(y, _TQ1_D, fp32_to_fp16(d))
            xo = 0
            # 5 elements per byte, along 32 bytes (qs[0..31]) then along 16 bytes (qs[32..47])
            for j, width in ((0, 32), (32, 16)):
                for m in range(width):
                    q = 0
                    for n in range(5):
                        q = (q * 3 + _trit(x[xo + m + n * width] * id_)) & 0xFF
                    y[_TQ1_QS + j + m] = _pack5(q)
                xo += 5 * width
            # 4 elements per byte, the first shifted to the most significant trit
            for j in range(4):
                q = 0
                for m in range(4):
                    q = (q * 3 + _trit(x[xo + j + m * 4] * id_)) & 0xFF
                q = (q * 3) & 0xFF
                y[_TQ1_QH + j] = _pack5(q)


@jit
def _tq2_0_ref(rows, out):
    for r in range(rows.shape[0]):
        for i in range(rows.shape[1] // QK_K):
            x = rows[r, i * QK_K:(i + 1) * QK_K]
            y = out[r, i * _TQ2_SIZE:(i + 1) * _TQ2_SIZE]
            d = _amax(x)
            id_ = F(1) / d if d != F(0) else F(0)
            store_fp16(y, _TQ2_D, fp32_to_fp16(d))
            for j in range(0, 64, 32):
                for m in range(32):
                    q = 0
                    for n in range(4):
                        q += (_trit(x[4 * j + m + n * 32] * id_) & 3) << (2 * n)
                    y[_TQ2_QS + j + m] = q & 0xFF


class _Ternary(QuantFormat):
    """No importance: ``quantize_tqN_0`` ignores ``quant_weights``."""

    @classmethod
    def quantize_rows(cls, rows: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
        out = np.empty((rows.shape[0], cls.row_size(rows.shape[1])), dtype=np.uint8)
        cls._ref(rows, out)
        return out

    @staticmethod
    def _ref(rows: np.ndarray, out: np.ndarray) -> None:
        raise NotImplementedError


class TQ1_0(_Ternary, qtype=GGMLQuantizationType.TQ1_0):
    _ref = staticmethod(_tq1_0_ref)


class TQ2_0(_Ternary, qtype=GGMLQuantizationType.TQ2_0):
    _ref = staticmethod(_tq2_0_ref)
