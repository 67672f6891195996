"""Float "block" types F32, F16, BF16 (block size 1).

F16 is IEEE round-to-nearest-even like ``GGML_FP32_TO_FP16``; BF16 follows
``ggml_compute_fp32_to_bf16`` in ggml-impl.h (NaN quieted, round to nearest even).
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from .base import QuantFormat


class F32(QuantFormat, qtype=GGMLQuantizationType.F32):
    @classmethod
    def quantize_rows(cls, rows, importance):
        return np.ascontiguousarray(rows, dtype=np.float32).view(np.uint8)

    @classmethod
    def dequantize(cls, data, shape=None):
        values = np.ascontiguousarray(data).view(np.uint8).view(np.float32)
        return values.reshape(shape) if shape is not None else values


class F16(QuantFormat, qtype=GGMLQuantizationType.F16):
    @classmethod
    def quantize_rows(cls, rows, importance):
        with np.errstate(over="ignore"):
            return rows.astype(np.float16).view(np.uint8)

    @classmethod
    def dequantize(cls, data, shape=None):
        values = np.ascontiguousarray(data).view(np.uint8).view(np.float16).astype(np.float32)
        return values.reshape(shape) if shape is not None else values


class BF16(QuantFormat, qtype=GGMLQuantizationType.BF16):
    @classmethod
    def quantize_rows(cls, rows, importance):
        # ggml_compute_fp32_to_bf16: NaN -> quiet NaN, otherwise round to nearest even
        n = np.ascontiguousarray(rows, dtype=np.float32).view(np.uint32)
        rounded = (n + (np.uint32(0x7FFF) + ((n >> 16) & np.uint32(1)))) >> 16
        nan = (n & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
        bits = np.where(nan, (n >> 16) | np.uint32(64), rounded).astype(np.uint16)
        return bits.view(np.uint8)

    @classmethod
    def dequantize(cls, data, shape=None):
        raw = np.ascontiguousarray(data).view(np.uint8).view(np.uint16).astype(np.uint32) << 16
        values = raw.view(np.float32)
        return values.reshape(shape) if shape is not None else values
