"""Block formats: one class per ggml type, registered by that type.

Mirrors gguf-py's ``gguf/quants.py`` layout (one small class per type) but the unit of work is
a batch of *rows*, not of blocks: llama.cpp's importance-weighted quantizers use whole-row
statistics (``sigma2`` in ``quantize_row_q4_0_impl``), so ``quantize_rows`` sees full rows.
Dequantization is delegated to gguf-py, which has it for every type we write.
"""

from __future__ import annotations

from concurrent.futures import Executor, ThreadPoolExecutor
from typing import ClassVar

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

from ..errors import FormatError

_REGISTRY: dict[GGMLQuantizationType, type["QuantFormat"]] = {}

# fewest rows worth handing to a thread of their own
_MIN_ROWS_PER_TASK = 16


class QuantFormat:
    """One ggml block type: ``quantize(rows, importance) -> bytes`` and ``dequantize``.

    Subclasses set ``qtype`` (via the class keyword) and implement ``quantize_rows`` on a
    C-contiguous float32 array of shape ``(n_rows, n_per_row)``. ``importance`` is the per-column
    weight vector of an importance matrix (length ``n_per_row``) or None.
    """

    qtype: ClassVar[GGMLQuantizationType]
    block_size: ClassVar[int]
    type_size: ClassVar[int]
    # True when importance weights change the bytes (llama.cpp has a weighted path)
    uses_importance: ClassVar[bool] = False

    def __init_subclass__(cls, qtype: GGMLQuantizationType | None = None, **kwargs):
        super().__init_subclass__(**kwargs)
        if qtype is None:
            return
        if qtype in _REGISTRY:
            raise RuntimeError(f"format for {qtype.name} registered twice")
        cls.qtype = qtype
        cls.block_size, cls.type_size = GGML_QUANT_SIZES[qtype]
        _REGISTRY[qtype] = cls

    # -- to implement -------------------------------------------------------------------------
    @classmethod
    def quantize_rows(cls, rows: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
        """float32 (n, k) -> uint8 (n, k // block_size * type_size)."""
        raise NotImplementedError

    # -- shared -------------------------------------------------------------------------------
    @classmethod
    def row_size(cls, n_per_row: int) -> int:
        return n_per_row // cls.block_size * cls.type_size

    @classmethod
    def can_quantize(cls, n_per_row: int) -> bool:
        return n_per_row % cls.block_size == 0

    @classmethod
    def quantize(
        cls, rows: np.ndarray, importance: np.ndarray | None = None, threads: int = 1,
        pool: Executor | None = None,
    ) -> np.ndarray:
        """Quantize a 2-D float array row by row; returns uint8 of shape (n_rows, row_size).

        With ``threads > 1`` the rows are split in contiguous slices quantized in parallel, on
        ``pool`` when given (a caller quantizing many tensors keeps one pool: starting threads per
        tensor costs more than quantizing a small one)."""
        rows = np.asarray(rows)
        if rows.ndim == 1:
            rows = rows.reshape(1, -1)
        if rows.ndim != 2:
            raise FormatError(f"{cls.qtype.name}: expected a 2-D array of rows, got shape {rows.shape}")
        n_rows, n_per_row = rows.shape
        if not cls.can_quantize(n_per_row):
            raise FormatError(
                f"{cls.qtype.name}: row length {n_per_row} is not a multiple of the block size {cls.block_size}"
            )
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        if importance is not None:
            importance = np.ascontiguousarray(importance, dtype=np.float32).reshape(-1)
            if importance.shape[0] != n_per_row:
                raise FormatError(
                    f"{cls.qtype.name}: importance has {importance.shape[0]} values, expected one per column ({n_per_row})"
                )
        out = np.empty((n_rows, cls.row_size(n_per_row)), dtype=np.uint8)
        if n_rows == 0:
            return out
        n_tasks = min(threads, n_rows // _MIN_ROWS_PER_TASK)
        if n_tasks <= 1:
            out[:] = cls.quantize_rows(rows, importance)
            return out
        # one contiguous slice of rows per thread; the kernels release the GIL
        bounds = np.linspace(0, n_rows, n_tasks + 1).astype(int)

        def work(i: int) -> None:
            out[bounds[i]:bounds[i + 1]] = cls.quantize_rows(rows[bounds[i]:bounds[i + 1]], importance)

        if pool is not None:
            list(pool.map(work, range(n_tasks)))
            return out
        with ThreadPoolExecutor(max_workers=n_tasks) as own_pool:
            list(own_pool.map(work, range(n_tasks)))
        return out

    @classmethod
    def dequantize(cls, data: np.ndarray, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """uint8 blocks -> float32; ``shape`` is the logical (element) shape, rows last."""
        arr = np.ascontiguousarray(data).view(np.uint8)
        if shape is not None:
            shape = tuple(int(s) for s in shape)
            arr = arr.reshape(*shape[:-1], cls.row_size(shape[-1]))
        values = gguf_quants.dequantize(arr, cls.qtype)
        return np.asarray(values, dtype=np.float32)


def get_format(qtype: GGMLQuantizationType) -> type[QuantFormat]:
    try:
        return _REGISTRY[GGMLQuantizationType(qtype)]
    except KeyError:
        known = ", ".join(t.name for t in _REGISTRY)
        raise FormatError(f"no quantizer for ggml type {GGMLQuantizationType(qtype).name}; have: {known}") from None


def registered_types() -> list[GGMLQuantizationType]:
    return list(_REGISTRY)

