"""Split GGUF files (--split-max-size): gguf-split's names and split.* keys, every part a valid
GGUF, the same tensors as the unsplit file, loaded by llama-cpp-python, read by every verb."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGUFReader, GGUFValueType, LlamaFileType
from helpers import default_model_path

from llmquant.gguf.source import GGUFSource
from llmquant.gguf.split import parse_size, part_paths, split_index
from llmquant.quantize import quantize_model

MB = 10**6


def test_split_sizes_and_names():
    assert parse_size("50G") == 50 * 10**9 and parse_size("500M") == 500 * 10**6 and parse_size("2g") == 2 * 10**9
    for bad in ("50", "0G", "-1M", "1.5G", "10K"):
        with pytest.raises(ValueError, match="M or G"):
            parse_size(bad)
    assert [p.name for p in part_paths("out/m-Q4_K_M.gguf", 3)] == [
        "m-Q4_K_M-00001-of-00003.gguf", "m-Q4_K_M-00002-of-00003.gguf", "m-Q4_K_M-00003-of-00003.gguf"]
    assert split_index("x/m-00002-of-00003.gguf") == ("x/m", 1, 3) and split_index("m.gguf") is None


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("split")
    whole = folder / "whole.gguf"
    quantize_model(default_model_path(), whole, LlamaFileType.MOSTLY_Q8_0, threads=2)
    planned = quantize_model(default_model_path(), None, LlamaFileType.MOSTLY_Q8_0, dry_run=True, split_max_size=40 * MB)
    result = quantize_model(default_model_path(), folder / "parts.gguf", LlamaFileType.MOSTLY_Q8_0, threads=2,
                            split_max_size=40 * MB)
    return whole, result, planned, folder


@pytest.mark.slow
def test_parts_have_gguf_splits_layout(files):
    whole, result, planned, folder = files
    parts = sorted(folder.glob("parts-*.gguf"))
    n = len(parts)
    assert n == 4 and result.destination == str(folder / "parts-00001-of-00004.gguf")
    assert [p.name for p in parts] == [f"parts-{i:05d}-of-00004.gguf" for i in range(1, 5)]
    assert result.file_bytes == planned.file_bytes == sum(p.stat().st_size for p in parts)
    n_tensors = 0
    for i, part in enumerate(parts):
        r = GGUFReader(part)  # gguf-py reads every part on its own
        keys = {f.name: f for f in r.fields.values() if not f.name.startswith("GGUF.")}
        assert keys["split.no"].types == [GGUFValueType.UINT16] and keys["split.no"].contents() == i
        assert keys["split.count"].types == [GGUFValueType.UINT16] and keys["split.count"].contents() == n
        assert keys["split.tensors.count"].types == [GGUFValueType.INT32]
        assert ("general.architecture" in keys) == (i == 0)  # metadata in the first part only
        if i:
            assert set(keys) == {"split.no", "split.count", "split.tensors.count"}
        data = sum(int(t.n_bytes) for t in r.tensors)
        assert data <= 40 * MB or len(r.tensors) == 1
        n_tensors += len(r.tensors)
    assert keys["split.tensors.count"].contents() == n_tensors
    assert not list(folder.glob(".llmquant-partial-*"))


@pytest.mark.slow
def test_split_source_has_identical_tensors(files):
    whole, result, _, _ = files
    with GGUFSource(whole) as a, GGUFSource(result.destination) as b:
        assert [(t.name, t.shape, t.type) for t in a.tensors] == [(t.name, t.shape, t.type) for t in b.tensors]
        for t in a.tensors:
            assert np.array_equal(a.raw(t.name), b.raw(t.name)), t.name
        assert len(b.parts) == 4 and b.file_bytes == result.file_bytes
        assert {k for k in a.fields} == {k for k in b.fields} - {"split.no", "split.count", "split.tensors.count"}


@pytest.mark.slow
def test_quantize_inspect_and_fit_read_split_models(files):
    from llmquant.gguf.inspect import inspect_model

    whole, result, _, folder = files
    a = quantize_model(whole, folder / "a-Q4_0.gguf", LlamaFileType.MOSTLY_Q4_0, threads=2, options=_requant())
    b = quantize_model(result.destination, folder / "b-Q4_0.gguf", LlamaFileType.MOSTLY_Q4_0, threads=2,
                       options=_requant())
    with GGUFSource(a.destination) as x, GGUFSource(b.destination) as y:
        assert "split.count" not in y.fields  # the source's split keys are not copied into an unsplit output
        assert all(np.array_equal(x.raw(t.name), y.raw(t.name)) for t in x.tensors)
    info = inspect_model(result.destination)
    assert info.file_bytes == result.file_bytes


def _requant():
    from llmquant.gguf.recipes import RecipeOptions

    return RecipeOptions(allow_requantize=True)


def test_half_written_split_leaves_nothing(tmp_path):
    def stop(i, n, plan):
        if i == 100:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        quantize_model(default_model_path(), tmp_path / "x.gguf", LlamaFileType.MOSTLY_Q8_0, threads=2,
                       split_max_size=40 * MB, progress=stop)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_split_model_loads_in_llama_cpp_with_the_same_logits(files):
    from llmquant.runtime.llama import Model

    whole, result, _, _ = files
    tokens = list(range(1, 40))
    with Model(whole, n_ctx=64, threads=2) as a:
        want = a.chunk_logits(tokens)
    with Model(result.destination, n_ctx=64, threads=2) as b:
        got = b.chunk_logits(tokens)
    assert np.array_equal(want, got)
