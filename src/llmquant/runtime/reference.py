"""llama.cpp's own quantizer, reached through ctypes: the oracle for tests and the bench anchor.

Loads ``libggml-base`` / ``libllama`` from the llama-cpp-python installation (without importing
``llama_cpp``, which stays confined to runtime.py) and exposes
``ggml_quantize_chunk`` (one tensor's bytes) and ``llama_model_quantize`` (a whole file, also with
``dry_run``, imatrix data and tensor-type overrides). Struct layouts follow ``include/llama.h`` of
the llama.cpp vendored in llama-cpp-python 0.3.36.
"""

from __future__ import annotations

import ctypes
import importlib.util
from functools import lru_cache
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, LlamaFileType

from ..errors import LlmquantError


class ReferenceUnavailable(LlmquantError):
    """llama-cpp-python's shared libraries cannot be found or loaded."""


def library_dir() -> Path:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise ReferenceUnavailable("llama-cpp-python is not installed (pip install llama-cpp-python)")
    lib = Path(list(spec.submodule_search_locations)[0]) / "lib"
    if not lib.is_dir():
        raise ReferenceUnavailable(f"{lib}: llama-cpp-python has no lib/ folder with libggml")
    return lib


def _load(name: str) -> ctypes.CDLL:
    lib = library_dir()
    for candidate in (lib / f"lib{name}.so", lib / f"lib{name}.dylib", lib / f"{name}.dll"):
        if candidate.exists():
            return ctypes.CDLL(str(candidate), mode=ctypes.RTLD_GLOBAL)
    raise ReferenceUnavailable(f"{lib}: no shared library for {name}")


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int64)


class _TypeTraits(ctypes.Structure):
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


@lru_cache(maxsize=None)
def ggml() -> ctypes.CDLL:
    lib = _load("ggml-base")
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
    ]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    return lib


def quantize_chunk(
    qtype: GGMLQuantizationType, rows: np.ndarray, importance: np.ndarray | None = None
) -> np.ndarray:
    """libggml's bytes for ``rows`` (float32, shape (n, k)) as uint8 of shape (n, row_size)."""
    lib = ggml()
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    if rows.ndim == 1:
        rows = rows.reshape(1, -1)
    n_rows, n_per_row = rows.shape
    row_size = lib.ggml_row_size(int(qtype), n_per_row)
    out = np.zeros((n_rows, row_size), dtype=np.uint8)
    imatrix = None
    if importance is not None:
        importance = np.ascontiguousarray(importance, dtype=np.float32)
        if importance.shape != (n_per_row,):
            raise ValueError(f"importance must have shape ({n_per_row},), got {importance.shape}")
        imatrix = importance.ctypes.data
    written = lib.ggml_quantize_chunk(
        int(qtype), rows.ctypes.data, out.ctypes.data, 0, n_rows, n_per_row, imatrix
    )
    if written != out.nbytes:
        raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes, expected {out.nbytes}")
    return out


def dequantize(qtype: GGMLQuantizationType, data: np.ndarray, n_elements: int) -> np.ndarray:
    """libggml's ``to_float`` for ``qtype``: bytes -> float32 (flat, ``n_elements`` values)."""
    if qtype == GGMLQuantizationType.F32:  # no to_float: the bytes are the values
        return np.ascontiguousarray(data).view(np.uint8).view(np.float32)[:n_elements].copy()
    lib = ggml()
    traits = lib.ggml_get_type_traits(int(qtype)).contents
    if not traits.to_float:
        raise ReferenceUnavailable(f"libggml has no to_float for {qtype.name}")
    fn = _TO_FLOAT(traits.to_float)
    src = np.ascontiguousarray(data).view(np.uint8)
    out = np.empty(n_elements, dtype=np.float32)
    fn(src.ctypes.data, out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), n_elements)
    return out


# -- llama_model_quantize -------------------------------------------------------------------------

class _ImatrixData(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("data", ctypes.POINTER(ctypes.c_float)), ("size", ctypes.c_size_t)]


class _TensorOverride(ctypes.Structure):
    _fields_ = [("pattern", ctypes.c_char_p), ("type", ctypes.c_int)]


class QuantizeParams(ctypes.Structure):
    _fields_ = [
        ("nthread", ctypes.c_int32),
        ("ftype", ctypes.c_int),
        ("output_tensor_type", ctypes.c_int),
        ("token_embedding_type", ctypes.c_int),
        ("allow_requantize", ctypes.c_bool),
        ("quantize_output_tensor", ctypes.c_bool),
        ("only_copy", ctypes.c_bool),
        ("pure", ctypes.c_bool),
        ("keep_split", ctypes.c_bool),
        ("dry_run", ctypes.c_bool),
        ("imatrix", ctypes.POINTER(_ImatrixData)),
        ("kv_overrides", ctypes.c_void_p),
        ("tt_overrides", ctypes.POINTER(_TensorOverride)),
        ("prune_layers", ctypes.POINTER(ctypes.c_int32)),
        ("max_buf_size", ctypes.c_size_t),
    ]


_LOG_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
_captured_log: list[str] = []


@_LOG_CALLBACK
def _capture_log(level, text, user_data):  # pragma: no cover - called from C
    if text:
        _captured_log.append(text.decode("utf-8", "replace"))


@lru_cache(maxsize=None)
def llama() -> ctypes.CDLL:
    ggml()
    for dep in ("ggml-cpu", "ggml"):
        try:
            _load(dep)
        except ReferenceUnavailable:
            pass
    lib = _load("llama")
    lib.llama_backend_init.restype = None
    lib.llama_backend_init()
    lib.llama_log_set.restype = None
    lib.llama_log_set.argtypes = [_LOG_CALLBACK, ctypes.c_void_p]
    lib.llama_log_set(_capture_log, None)
    lib.llama_model_quantize_default_params.restype = QuantizeParams
    lib.llama_model_quantize.restype = ctypes.c_uint32
    lib.llama_model_quantize.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.POINTER(QuantizeParams)]
    return lib


def model_quantize(
    src: str | Path,
    dst: str | Path,
    ftype: LlamaFileType,
    *,
    threads: int = 1,
    dry_run: bool = False,
    pure: bool = False,
    allow_requantize: bool = False,
    quantize_output_tensor: bool = True,
    output_tensor_type: GGMLQuantizationType | None = None,
    token_embedding_type: GGMLQuantizationType | None = None,
    imatrix: dict[str, np.ndarray] | None = None,
    tensor_types: list[tuple[str, GGMLQuantizationType]] | None = None,
) -> list[str]:
    """Run llama.cpp's ``llama_model_quantize``; returns its log lines. Raises on failure."""
    lib = llama()
    params = lib.llama_model_quantize_default_params()
    params.nthread = threads
    params.ftype = int(ftype)
    params.dry_run = dry_run
    params.pure = pure
    params.allow_requantize = allow_requantize
    params.quantize_output_tensor = quantize_output_tensor
    if output_tensor_type is not None:
        params.output_tensor_type = int(output_tensor_type)
    if token_embedding_type is not None:
        params.token_embedding_type = int(token_embedding_type)
    keep: list[object] = []
    if imatrix:
        entries = (_ImatrixData * (len(imatrix) + 1))()
        for i, (name, values) in enumerate(imatrix.items()):
            arr = np.ascontiguousarray(values, dtype=np.float32)
            keep.append(arr)
            entries[i].name = name.encode()
            entries[i].data = arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = arr.size
        keep.append(entries)
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(_ImatrixData))
    if tensor_types:
        overrides = (_TensorOverride * (len(tensor_types) + 1))()
        for i, (pattern, qtype) in enumerate(tensor_types):
            overrides[i].pattern = pattern.encode()
            overrides[i].type = int(qtype)
        overrides[len(tensor_types)].pattern = None
        keep.append(overrides)
        params.tt_overrides = ctypes.cast(overrides, ctypes.POINTER(_TensorOverride))
    _captured_log.clear()
    lib.llama_log_set(_capture_log, None)  # again: the runtime's log capture (llama.py) may have replaced it
    rc = lib.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    log = list(_captured_log)
    if rc != 0:
        tail = "".join(log[-5:]).strip()
        raise RuntimeError(f"llama_model_quantize failed with code {rc}: {tail}")
    return log
