"""IQ types and ternary types must be byte-identical to libggml's ``ggml_quantize_chunk``.

With and without importance (where libggml allows none: IQ2_XXS, IQ2_XS and IQ1_S assert an
imatrix), on the embedded SmolLM2's and all-MiniLM-L6-v2's weights, the adversarial rows of the
K-quant tests and fuzzed rows. The lattice types (IQ1/IQ2/IQ3) search a grid per 8 values and are
slow in both implementations: the quick tests take a sample of rows of each matrix, the slow sweep
every row. A failure names the number of differing blocks and shows the worst.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from helpers import adversarial_rows, assert_same_blocks, importance_vectors
from test_kquants import _extra_adversarial, fuzz_rows, minilm_rows, smollm2_rows, sweep_rows

from llmquant.errors import FormatError
from llmquant.formats import get_format
from llmquant.runtime import reference

LATTICE_TYPES = [Q.IQ3_XXS, Q.IQ3_S, Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S, Q.IQ1_S, Q.IQ1_M]
IQ_TYPES = [Q.IQ4_NL, Q.IQ4_XS, Q.TQ1_0, Q.TQ2_0, *LATTICE_TYPES]
IMPORTANCE_KINDS = [None, "heavy_tail"]  # the slow sweep (the quick tests use "activations")
QUICK_IMPORTANCE_KINDS = [None, "activations"]
# rows per matrix in the quick real-weight tests (the whole matrix for the fast types)
SAMPLE_ROWS = {**{t: 48 for t in IQ_TYPES}, **{t: 16 for t in LATTICE_TYPES}}
# rows per matrix in the slow sweep over every weight of both models
SWEEP_ROWS = 8

reference.ggml()  # the oracle is a core dependency: if it cannot load, fail loudly rather than skip


def needs_imatrix(qtype: Q) -> bool:
    return bool(reference.ggml().ggml_quantize_requires_imatrix(int(qtype)))


def check(qtype: Q, rows: np.ndarray, importance: np.ndarray | None, what: str, threads: int = 1) -> None:
    fmt = get_format(qtype)
    ours = fmt.quantize(rows, importance, threads=threads)
    theirs = reference.quantize_chunk(qtype, rows, importance)
    assert_same_blocks(ours, theirs, fmt.type_size, f"{qtype.name} {what}")


def _kinds(qtype: Q, kinds: list[str | None]) -> list[str | None]:
    return [k for k in kinds if k is not None or not needs_imatrix(qtype)]


def _extreme(row: np.ndarray, importance: np.ndarray | None) -> bool:
    """Values for which libggml's lattice searches overflow float32 (and abort)."""
    if not np.isfinite(row).all():
        return True
    peak = float(np.abs(row).max())
    scale = 1.0 if importance is None else float(np.max(importance))
    return peak >= 1e9 or scale * peak**4 * 256 >= float(np.finfo(np.float32).max)


def _comparable(qtype: Q, rows: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
    """The rows libggml can be asked about: a lattice type's GGML_ASSERTs abort the process on
    extreme rows (inf, nan, |x| whose weighted squares overflow float32); we refuse those with FormatError instead."""
    if qtype not in LATTICE_TYPES:
        return rows
    keep = []
    for r in range(rows.shape[0]):
        try:
            get_format(qtype).quantize(rows[r:r + 1], importance)
            keep.append(r)
        except FormatError:
            assert _extreme(rows[r], importance), f"row {r}"
    assert len(keep) >= rows.shape[0] // 2, "most rows are compared"
    return np.ascontiguousarray(rows[keep])


def _fuzz(qtype: Q, n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """fuzz_rows; for the lattice types each row rescaled to a maximum of 1e-8..1e4 (most of
    fuzz_rows' 1e-20..1e20 range makes libggml abort there)."""
    rows, importance = fuzz_rows(n, k, seed)
    if qtype in LATTICE_TYPES:
        rng = np.random.default_rng(seed)
        peak = np.abs(rows).max(axis=1, keepdims=True)
        rows = (rows / np.where(peak > 0, peak, 1) * 10.0 ** rng.uniform(-8, 4, (n, 1))).astype(np.float32)
    return rows, importance


def _sample(rows: np.ndarray, n: int | None) -> np.ndarray:
    if n is None or rows.shape[0] <= n:
        return rows
    pick = np.linspace(0, rows.shape[0] - 1, n).astype(int)  # spread over the matrix
    return np.ascontiguousarray(rows[pick])


@pytest.mark.parametrize("qtype", IQ_TYPES, ids=lambda t: t.name)
def test_registered(qtype):
    fmt = get_format(qtype)
    assert fmt.qtype == qtype
    assert fmt.uses_importance == (qtype not in (Q.TQ1_0, Q.TQ2_0))


@pytest.mark.parametrize("qtype", IQ_TYPES, ids=lambda t: t.name)
def test_real_weights(qtype):
    """First transformer block of both models, every matrix (a sample of rows for the slow types)."""
    for kind in _kinds(qtype, QUICK_IMPORTANCE_KINDS):
        for name, rows in smollm2_rows(1) + minilm_rows(1):
            rows = _sample(rows, SAMPLE_ROWS[qtype])
            importance = None if kind is None else importance_vectors(rows.shape[1])[kind]
            check(qtype, rows, importance, f"{name} importance={kind}")


@pytest.mark.parametrize("qtype", IQ_TYPES, ids=lambda t: t.name)
def test_adversarial_rows(qtype):
    k = 1024
    cases = {**adversarial_rows(k), **_extra_adversarial(k)}
    weights = {**importance_vectors(k), "zeros": np.zeros(k, np.float32),
               "huge": np.full(k, 1e30, np.float32), "tiny": np.full(k, 1e-30, np.float32)}
    pairs = [(None, None)] if not needs_imatrix(qtype) else []
    refused = 0
    for kind, importance in pairs + list(weights.items()):
        for name, row in cases.items():  # one row at a time, so a failure names its case
            if qtype in LATTICE_TYPES:
                try:
                    get_format(qtype).quantize(row[None], importance)
                except FormatError:
                    # libggml's GGML_ASSERTs abort the process on these rows (it cannot be asked)
                    assert _extreme(row, importance), name
                    refused += 1
                    continue
            check(qtype, row[None], importance, f"row {name!r} importance={kind}")
    assert refused < len(cases) * len(weights) // 2  # most cases are compared


@pytest.mark.parametrize("qtype", IQ_TYPES, ids=lambda t: t.name)
def test_fuzz(qtype):
    rows, importance = _fuzz(qtype, 32, 1024, seed=11)
    if not needs_imatrix(qtype):
        check(qtype, _comparable(qtype, rows, None), None, "fuzz seed=11")
    check(qtype, _comparable(qtype, rows, importance), importance, "fuzz seed=11 with importance")


@pytest.mark.parametrize("qtype", IQ_TYPES, ids=lambda t: t.name)
def test_threads_give_same_bytes(qtype):
    rows = _sample(smollm2_rows(1)[0][1], 64)
    importance = importance_vectors(rows.shape[1])["activations"]
    check(qtype, rows, importance, "threads=2", threads=2)


@pytest.mark.parametrize("qtype", IQ_TYPES, ids=lambda t: t.name)
def test_dequantize_matches_libggml(qtype):
    rows = _sample(smollm2_rows(1)[0][1], 16)
    importance = importance_vectors(rows.shape[1])["activations"]
    fmt = get_format(qtype)
    data = fmt.quantize(rows, importance)
    ours = fmt.dequantize(data, rows.shape)
    theirs = reference.dequantize(qtype, data, rows.size).reshape(rows.shape)
    np.testing.assert_array_equal(ours, theirs)


# -- sweeps -----------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("kind", IMPORTANCE_KINDS, ids=lambda k: k or "no_imatrix")
@pytest.mark.parametrize("qtype", IQ_TYPES, ids=lambda t: t.name)
def test_all_real_weights(qtype, kind):
    """SmolLM2's 2-D weights of five layers and the token embedding (``test_kquants.sweep_rows``)
    and every one of all-MiniLM-L6-v2, a spread sample of rows of each."""
    if kind is None and needs_imatrix(qtype):
        pytest.skip(f"libggml asserts an imatrix for {qtype.name}")
    _sweep(qtype, kind, sweep_rows())


@pytest.mark.long
@pytest.mark.parametrize("kind", IMPORTANCE_KINDS, ids=lambda k: k or "no_imatrix")
@pytest.mark.parametrize("qtype", IQ_TYPES, ids=lambda t: t.name)
def test_all_real_weights_every_layer(qtype, kind):
    """The same over every 2-D weight of SmolLM2's 30 layers."""
    if kind is None and needs_imatrix(qtype):
        pytest.skip(f"libggml asserts an imatrix for {qtype.name}")
    _sweep(qtype, kind, smollm2_rows(None) + minilm_rows(None))


def _sweep(qtype, kind, tensors) -> None:
    for name, rows in tensors:
        rows = _sample(rows, SWEEP_ROWS)
        importance = None if kind is None else importance_vectors(rows.shape[1])[kind]
        check(qtype, rows, importance, f"{name} importance={kind}", threads=2)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(1))
@pytest.mark.parametrize("qtype", IQ_TYPES, ids=lambda t: t.name)
def test_fuzz_sweep(qtype, seed):
    rows, importance = _fuzz(qtype, 64, 2048, seed=100 + seed)
    if not needs_imatrix(qtype):
        check(qtype, _comparable(qtype, rows, None), None, f"fuzz seed={100 + seed}")
    check(qtype, _comparable(qtype, rows, importance), importance, f"fuzz seed={100 + seed} with importance")
