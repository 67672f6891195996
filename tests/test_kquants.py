"""K-quants (Q2_K..Q6_K, Q8_K) must be byte-identical to libggml, with and without importance.

The oracle is ``ggml_quantize_chunk`` (``llmquant.runtime.reference``); for Q8_K, which it does not
handle, ``quantize_row_q8_K_ref`` is called directly. Real weights come from the embedded
SmolLM2-135M (Q4_1 GGUF, dequantized) and the FP32 all-MiniLM-L6-v2; rows whose length is not a
multiple of 256 are regrouped into longer rows, which changes nothing for the reference path and
gives the weighted path realistic rows.
"""

from __future__ import annotations

import ctypes
from functools import cache

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader
from gguf import quants as gguf_quants
from helpers import (
    adversarial_rows,
    assert_same_blocks,
    default_model_path,
    importance_vectors,
    minilm_tensors,
    sample_rows,
)

from llmquant.runtime import reference
from llmquant.formats import _kernels, get_format

K_TYPES = [GGMLQuantizationType.Q2_K, GGMLQuantizationType.Q3_K, GGMLQuantizationType.Q4_K,
           GGMLQuantizationType.Q5_K, GGMLQuantizationType.Q6_K]
IMPORTANCE_KINDS = [None, "uniform", "sparse_zeros", "activations", "heavy_tail"]
QUICK_IMPORTANCE_KINDS = [None, "sparse_zeros", "activations"]  # the rest run in the slow sweep

reference.ggml()  # the oracle is a core dependency: if it cannot load, fail loudly rather than skip


# -- data -------------------------------------------------------------------------------------

def _as_rows(values: np.ndarray) -> np.ndarray:
    """2-D weights as rows whose length is a multiple of 256 (as-is when the columns already are)."""
    values = np.asarray(values, dtype=np.float32)
    k = values.shape[-1]
    if k % 256 == 0:
        return np.ascontiguousarray(values.reshape(-1, k))
    for width in (2304, 768, 256):  # 9 or 3 super-blocks fit 576- and 384-column matrices
        if values.size % width == 0 and width % k == 0:
            return np.ascontiguousarray(values.reshape(-1, width))
    raise ValueError(f"cannot regroup {values.shape} into rows of 256*k")


@cache
def smollm2_rows(max_layer: int | None) -> tuple[tuple[str, np.ndarray], ...]:
    """Every 2-D weight of SmolLM2 (blocks < max_layer, all with the embedding when None)."""
    reader = GGUFReader(default_model_path())
    out = []
    for t in reader.tensors:
        if len(t.shape) != 2:
            continue
        if max_layer is not None and not (t.name.startswith("blk.") and int(t.name.split(".")[1]) < max_layer):
            continue
        out.append((t.name, _as_rows(gguf_quants.dequantize(t.data, t.tensor_type))))
    return tuple(out)


@cache
def minilm_rows(max_layer: int | None) -> tuple[tuple[str, np.ndarray], ...]:
    out = []
    for name, values in minilm_tensors().items():
        if values.ndim != 2:
            continue
        if max_layer is not None and not (".layer." in name and int(name.split(".layer.")[1].split(".")[0]) < max_layer):
            continue
        out.append((name, _as_rows(values)))
    return tuple(out)


def _importance(kind: str | None, n_per_row: int) -> np.ndarray | None:
    return None if kind is None else importance_vectors(n_per_row)[kind]


def _extra_adversarial(k: int) -> dict[str, np.ndarray]:
    """Cases beyond helpers.adversarial_rows: GROUP_MAX_EPS edges, inf/nan, fp16 overflow, -0."""
    rng = np.random.default_rng(5)
    base = rng.standard_normal(k).astype(np.float32)
    rows = {f"eps_{e:g}": base * np.float32(e) for e in (1e-16, 5e-16, 1e-15, 3e-15)}
    rows["pos_inf"] = base.copy()
    rows["pos_inf"][3] = np.inf
    rows["nan"] = base.copy()
    rows["nan"][100] = np.nan
    rows["flt_max"] = np.finfo(np.float32).max * np.sign(base).astype(np.float32)
    rows["fp16_overflow"] = base * np.float32(7e4)
    rows["1e19"] = base * np.float32(1e19)
    rows["negative_zero"] = np.full(k, -0.0, np.float32)
    rows["zero_and_tiny"] = np.where(np.arange(k) % 3 == 0, np.float32(-0.0), np.float32(1e-38))
    rows["one_block_zero"] = base.copy()
    rows["one_block_zero"][256:512] = 0
    return {name: np.asarray(v, dtype=np.float32) for name, v in rows.items()}


def fuzz_rows(n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random rows from mixed distributions with per-block magnitudes 1e-20..1e20, and a random
    importance vector (some zeros, wide dynamic range)."""
    rng = np.random.default_rng(seed)
    kinds = [
        lambda: rng.standard_normal(k),
        lambda: rng.random(k),
        lambda: -rng.random(k),
        lambda: np.clip(rng.standard_cauchy(k), -1e6, 1e6),
        lambda: rng.standard_normal(k) * (rng.random(k) < 0.1),
        lambda: rng.integers(-8, 8, k).astype(np.float64),  # exact ties for the rounding
        lambda: rng.integers(0, 4, k) * 0.25 - 0.375,
        lambda: np.repeat(rng.standard_normal(k // 16), 16),  # constant sub-blocks
    ]
    rows = np.empty((n, k), np.float32)
    for r in range(n):
        row = kinds[rng.integers(len(kinds))]()
        row *= np.repeat(10.0 ** rng.uniform(-20, 20, k // 256), 256)
        rows[r] = row
    importance = rng.random(k) * 10.0 ** rng.uniform(-10, 10)
    importance[rng.random(k) < 0.2] = 0
    return rows, importance.astype(np.float32)


# -- comparison -------------------------------------------------------------------------------

def check(qtype: GGMLQuantizationType, rows: np.ndarray, importance: np.ndarray | None, what: str,
          threads: int = 1) -> None:
    fmt = get_format(qtype)
    ours = fmt.quantize(rows, importance, threads=threads)
    theirs = reference.quantize_chunk(qtype, rows, importance)
    assert_same_blocks(ours, theirs, fmt.type_size, f"{qtype.name} {what}")


def q8_k_reference(rows: np.ndarray) -> np.ndarray:
    fn = reference.ggml().quantize_row_q8_K_ref
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    fmt = get_format(GGMLQuantizationType.Q8_K)
    out = np.zeros((rows.shape[0], fmt.row_size(rows.shape[1])), dtype=np.uint8)
    fn(rows.ctypes.data, out.ctypes.data, rows.size)
    return out


# -- tests ------------------------------------------------------------------------------------

@pytest.mark.parametrize("qtype", K_TYPES + [GGMLQuantizationType.Q8_K], ids=lambda t: t.name)
def test_registered(qtype):
    fmt = get_format(qtype)
    assert fmt.block_size == 256
    assert fmt.uses_importance == (qtype != GGMLQuantizationType.Q8_K)


@pytest.mark.parametrize("kind", QUICK_IMPORTANCE_KINDS, ids=lambda k: k or "no_imatrix")
@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
def test_real_weights(qtype, kind):
    """First transformer block of both models, every matrix."""
    for name, rows in smollm2_rows(1) + minilm_rows(1):
        check(qtype, rows, _importance(kind, rows.shape[1]), f"{name} importance={kind}")


@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
def test_adversarial_rows(qtype):
    k = 1024
    cases = {**adversarial_rows(k), **_extra_adversarial(k)}
    names = list(cases)
    rows = np.stack([cases[n] for n in names])
    weights = {**importance_vectors(k), "zeros": np.zeros(k, np.float32),
               "huge": np.full(k, 1e30, np.float32), "tiny": np.full(k, 1e-30, np.float32)}
    for kind, importance in [(None, None), *weights.items()]:
        for i, name in enumerate(names):  # one row at a time, so a failure names its case
            check(qtype, rows[i:i + 1], importance, f"row {name!r} importance={kind}")


@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
def test_fuzz(qtype):
    rows, importance = fuzz_rows(64, 1024, seed=11)
    check(qtype, rows, None, "fuzz seed=11")
    check(qtype, rows, importance, "fuzz seed=11 with importance")


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
def test_fuzz_sweep(qtype, seed):
    rows, importance = fuzz_rows(512, 2048, seed=100 + seed)
    check(qtype, rows, None, f"fuzz seed={100 + seed}")
    check(qtype, rows, importance, f"fuzz seed={100 + seed} with importance")


@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
def test_threads_give_same_bytes(qtype):
    rows = smollm2_rows(1)[0][1]
    importance = importance_vectors(rows.shape[1])["activations"]
    for imp in (None, importance):
        check(qtype, rows, imp, "threads=2", threads=2)


def test_q8_k():
    rng = np.random.default_rng(3)
    rows = np.concatenate([
        rng.standard_normal((4, 1024)).astype(np.float32),
        np.stack([v for v in adversarial_rows(1024).values()]),
        np.stack([v for v in _extra_adversarial(1024).values()]),
        smollm2_rows(1)[0][1][:8, :1024],
    ])
    fmt = get_format(GGMLQuantizationType.Q8_K)
    ours = fmt.quantize(rows)
    assert_same_blocks(ours, q8_k_reference(rows), fmt.type_size, "Q8_K")
    finite = rows[:4]
    back = fmt.dequantize(ours[:4], finite.shape)
    assert back.shape == finite.shape
    assert np.abs(back - finite).max() <= np.abs(finite).max() / 127


def test_fp16_conversion_matches_numpy_rne():
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)
    values = np.concatenate([bits.view(np.float32), np.float32([65504, 65520, 65519.996, 6e-8, 2.98e-8, -0.0])])
    values = values[~np.isnan(values)]
    ours = np.array([_kernels.fp32_to_fp16(v) for v in values], dtype=np.uint16)
    with np.errstate(over="ignore"):
        expect = values.astype(np.float16).view(np.uint16)
    np.testing.assert_array_equal(ours, expect)
    assert _kernels.fp32_to_fp16(np.float32(np.nan)) == 0x7E00
    halves = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    halves = halves[~np.isnan(halves.view(np.float16))]
    back = np.array([_kernels.fp16_to_fp32(int(h)) for h in halves], dtype=np.float32)
    np.testing.assert_array_equal(back, halves.view(np.float16).astype(np.float32))


def test_nearest_int_rounds_half_to_even():
    cases = np.float32([0.5, 1.5, 2.5, -0.5, -1.5, 2.4999998, 4194303.0, -4194303.0, 1e-30, -7.5])
    expect = np.rint(cases).astype(np.int64)
    assert [_kernels.nearest_int(v) for v in cases] == list(expect)


# -- sweeps -----------------------------------------------------------------------------------

SWEEP_ROWS = 64  # rows per tensor in the default run's sweep; -m long checks every row
# SmolLM2 layers of the default run's sweep (both ends and the middle: every tensor kind and shape);
# -m long sweeps all 30 (the test command must stay under 30 minutes on 2 cores)
SWEEP_LAYERS = (0, 1, 15, 28, 29)


def sweep_rows() -> tuple[tuple[str, np.ndarray], ...]:
    """The default run's sweep: SmolLM2's tensors of SWEEP_LAYERS and those outside the blocks (the
    token embedding), and every 2-D weight of all-MiniLM-L6-v2."""
    keep = tuple(t for t in smollm2_rows(None) if not t[0].startswith("blk.") or int(t[0].split(".")[1]) in SWEEP_LAYERS)
    return keep + minilm_rows(None)


@pytest.mark.slow
@pytest.mark.parametrize("kind", IMPORTANCE_KINDS, ids=lambda k: k or "no_imatrix")
@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
def test_all_real_weights(qtype, kind):
    """SmolLM2's 2-D weights of five layers and the token embedding, and every one of
    all-MiniLM-L6-v2, 64 rows spread over each (``-m long``: every row of every weight)."""
    for name, rows in sweep_rows():
        rows = sample_rows(rows, SWEEP_ROWS)
        check(qtype, rows, _importance(kind, rows.shape[1]), f"{name} importance={kind}", threads=2)


@pytest.mark.long
@pytest.mark.parametrize("kind", IMPORTANCE_KINDS, ids=lambda k: k or "no_imatrix")
@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
def test_all_real_weights_every_row(qtype, kind):
    """Every row of every 2-D weight of SmolLM2 and all-MiniLM-L6-v2."""
    for name, rows in smollm2_rows(None) + minilm_rows(None):
        check(qtype, rows, _importance(kind, rows.shape[1]), f"{name} importance={kind}", threads=2)


@pytest.mark.slow
def test_q8_k_real_weights():
    fmt = get_format(GGMLQuantizationType.Q8_K)
    for name, rows in smollm2_rows(None) + minilm_rows(None):
        assert_same_blocks(fmt.quantize(rows, threads=2), q8_k_reference(rows), fmt.type_size, f"Q8_K {name}")
