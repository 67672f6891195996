"""Float and legacy block types: bytes identical to libggml's ggml_quantize_chunk (ctypes oracle),
with and without importance weights, on real weights and adversarial rows; round trip error
identical to libggml's own dequantization of its own bytes."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from helpers import adversarial_rows, assert_same_blocks, importance_vectors, minilm_tensors, model_tensor
from llmquant.runtime import reference
from llmquant.formats import get_format

FLOAT_TYPES = [T.F32, T.F16, T.BF16]
LEGACY_TYPES = [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1]
ALL_TYPES = FLOAT_TYPES + LEGACY_TYPES
IMPORTANCE = [None, *importance_vectors(256)]


def check(qtype, rows, importance=None, what=""):
    fmt = get_format(qtype)
    ours = fmt.quantize(rows, importance)
    theirs = reference.quantize_chunk(qtype, rows, importance)
    assert_same_blocks(ours, theirs, fmt.type_size, f"{qtype.name} {what}")
    return ours


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("imp_name", IMPORTANCE, ids=str)
def test_adversarial_rows(qtype, imp_name):
    rows = adversarial_rows(256)
    imp = None if imp_name is None else importance_vectors(256)[imp_name]
    for name, row in rows.items():
        check(qtype, row[None, :], imp, f"{name} importance={imp_name}")
    # all rows at once: rows are independent, batching must not change anything
    check(qtype, np.stack(list(rows.values())), imp, f"stacked importance={imp_name}")


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_embedded_model_weights(qtype):
    for name in ("blk.0.attn_q.weight", "blk.7.attn_k.weight", "blk.29.ffn_down.weight", "blk.12.ffn_gate.weight"):
        w = model_tensor(name)
        check(qtype, w, None, name)
        imp = importance_vectors(w.shape[1])["activations"]
        check(qtype, w, imp, f"{name} with importance")


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_minilm_fp32_weights(qtype):
    tensors = minilm_tensors()
    picked = [n for n, a in tensors.items() if a.ndim == 2 and a.shape[1] % 32 == 0][:6]
    assert picked, "no 2-D tensors found in all-MiniLM-L6-v2"
    rng = np.random.default_rng(3)
    for name in picked:
        w = tensors[name]
        if w.shape[0] > 2048:  # the word embedding: a sample of rows is enough
            w = w[rng.choice(w.shape[0], 2048, replace=False)]
        check(qtype, w, None, name)
        check(qtype, w, (rng.random(w.shape[1]) + 0.05).astype(np.float32), f"{name} with importance")


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_round_trip_matches_libggml(qtype):
    """dequantize(quantize(x)): our values equal libggml's to_float on libggml's bytes, and the
    error stays within the type's bound."""
    w = model_tensor("blk.3.ffn_up.weight")
    fmt = get_format(qtype)
    ours = fmt.dequantize(fmt.quantize(w), w.shape)
    theirs = reference.dequantize(qtype, reference.quantize_chunk(qtype, w), w.size).reshape(w.shape)
    np.testing.assert_array_equal(ours, theirs)
    rel_rmse = float(np.sqrt(np.mean((ours - w) ** 2)) / np.sqrt(np.mean(w ** 2)))
    # bounds by bits: 4-bit ~ 1/8, 5-bit ~ 1/16, 8-bit ~ 1/200 of the signal, floats ~ 0
    bound = {T.F32: 0.0, T.F16: 1e-3, T.BF16: 5e-3, T.Q8_0: 6e-3, T.Q5_0: 0.07, T.Q5_1: 0.06,
             T.Q4_0: 0.14, T.Q4_1: 0.12}[qtype]
    assert rel_rmse <= bound, f"{qtype.name}: relative RMSE {rel_rmse:.4f} > {bound}"


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q5_1, T.Q8_0], ids=lambda t: t.name)
def test_threads_do_not_change_bytes(qtype):
    w = model_tensor("blk.5.ffn_down.weight")
    imp = importance_vectors(w.shape[1])["uniform"]
    fmt = get_format(qtype)
    np.testing.assert_array_equal(fmt.quantize(w, imp, threads=1), fmt.quantize(w, imp, threads=3))


def test_bad_arguments_are_named():
    from llmquant.errors import FormatError

    with pytest.raises(FormatError, match="not a multiple of the block size 32"):
        get_format(T.Q4_0).quantize(np.zeros((2, 48), np.float32))
    with pytest.raises(FormatError, match="importance has 10 values"):
        get_format(T.Q4_0).quantize(np.zeros((2, 64), np.float32), np.ones(10, np.float32))
