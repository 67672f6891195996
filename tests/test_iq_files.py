"""Whole IQ files identical to llama_model_quantize, and the imatrix refusal.

IQ2_M of the embedded SmolLM2 (requantized from its Q4_1, by both sides) and nine IQ/TQ ftypes of a
tiny llama whose rows all take the IQ types, with an importance matrix written as llama-imatrix
does (test_imatrix.py): every tensor's type and bytes equal llama.cpp's; the SmolLM2 file loads in
llama-cpp-python and generates. Without an imatrix an
ftype whose plan needs one is refused with one line naming the first tensor, and nothing is
written (the dry run only warns).
"""

from __future__ import annotations

import re

import pytest
from gguf import GGMLQuantizationType as Q
from gguf import LlamaFileType as F
from helpers import default_model_path
from test_imatrix import assert_same_tensors, model_stats, write_gguf_imatrix
from tinymodel import write_tiny_llama

from llmquant.errors import ImatrixRequiredError
from llmquant.gguf.imatrix import load_imatrix
from llmquant.gguf.source import GGUFSource
from llmquant.quantize import quantize_model
from llmquant.runtime import reference
from llmquant.runtime.llama import Model

# IQ2_M uses IQ2_S, IQ3_S, IQ4_NL (fallback), Q5_K and Q8_0; IQ4_XS and IQ3_M of SmolLM2 pass the same
# test (add them here to run it: ~1.5 min each on 2 idle cores); the tiny model below covers them fast
FILE_FTYPES = {"IQ2_M": F.MOSTLY_IQ2_M}


@pytest.fixture(scope="module")
def smol_imatrix(tmp_path_factory):
    src = default_model_path()
    path = write_gguf_imatrix(tmp_path_factory.mktemp("iq-imatrix") / "smol.imatrix.gguf", model_stats(src, seed=3))
    return load_imatrix(path).entries


@pytest.mark.slow
@pytest.mark.long
@pytest.mark.parametrize("name", list(FILE_FTYPES))
def test_smollm2_file_identical_to_llama_quantize(smol_imatrix, tmp_path, name):
    ftype = FILE_FTYPES[name]
    src = default_model_path()
    ours, theirs = tmp_path / "ours.gguf", tmp_path / "theirs.gguf"
    result = quantize_model(src, ours, ftype, importance=smol_imatrix, threads=2)
    reference.model_quantize(src, theirs, ftype, imatrix=smol_imatrix, allow_requantize=True, threads=2)
    assert_same_tensors(ours, theirs, f"SmolLM2 {name} with imatrix")
    types = {t.type for t in GGUFSource(ours).tensors}
    # the 1536-column ffn_down keep the IQ type; the 576-column matrices fall back to IQ4_NL
    assert {Q.IQ4_XS: Q.IQ4_XS, F.MOSTLY_IQ3_M: Q.IQ3_S, F.MOSTLY_IQ2_M: Q.IQ2_S}.get(ftype, Q.IQ4_XS) in types
    assert Q.IQ4_NL in types
    assert result.importance_tensors
    with Model(ours, n_ctx=256, threads=2) as m:
        completion = m.complete("The capital of France is", max_tokens=24)
    assert len(completion.tokens) >= 8
    if ftype != F.MOSTLY_IQ2_M:
        # 2 bits on a 135M model with a synthetic imatrix babble (llama.cpp's identical file too)
        assert len(re.findall(r"[A-Za-z]{2,}", completion.text)) >= 6, f"{name}: incoherent {completion.text!r}"


TINY_FTYPES = [F.MOSTLY_IQ4_XS, F.MOSTLY_IQ4_NL, F.MOSTLY_IQ3_M, F.MOSTLY_IQ3_XS, F.MOSTLY_IQ3_XXS,
               F.MOSTLY_IQ2_M, F.MOSTLY_IQ2_XS, F.MOSTLY_IQ1_M, F.MOSTLY_TQ1_0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("iq-tiny")
    path = write_tiny_llama(folder / "tiny.gguf", n_embd=256, n_ff=512, n_head=4, n_head_kv=2, n_vocab=256)
    entries = load_imatrix(write_gguf_imatrix(folder / "tiny.imatrix.gguf", model_stats(path, seed=5))).entries
    return path, entries


@pytest.mark.parametrize("ftype", TINY_FTYPES, ids=lambda f: f.name.removeprefix("MOSTLY_"))
def test_tiny_file_identical_to_llama_quantize(tiny, tmp_path, ftype):
    """Rows of 256 and 512: every IQ type of the mixture is used, no fallback."""
    src, entries = tiny
    ours, theirs = tmp_path / "ours.gguf", tmp_path / "theirs.gguf"
    quantize_model(src, ours, ftype, importance=entries)
    reference.model_quantize(src, theirs, ftype, imatrix=entries)
    assert_same_tensors(ours, theirs, f"tiny {ftype.name} with imatrix")


@pytest.mark.parametrize("ftype", [F.MOSTLY_IQ2_M, F.MOSTLY_IQ1_S], ids=lambda f: f.name)
def test_refused_without_imatrix_and_nothing_written(tmp_path, ftype):
    dst = tmp_path / "out.gguf"
    with pytest.raises(ImatrixRequiredError) as err:
        quantize_model(default_model_path(), dst, ftype)
    message = str(err.value)
    assert "\n" not in message
    assert not dst.exists() and not list(tmp_path.iterdir())
    # llama.cpp refuses at the same tensor (its log names the offending one)
    with pytest.raises(RuntimeError):
        reference.model_quantize(default_model_path(), tmp_path / "theirs.gguf", ftype, allow_requantize=True)
    log = "".join(reference._captured_log)
    offending = re.search(r"offending tensor: (\S+)", log)
    assert offending and offending[1] == err.value.tensor and offending[1] in message
