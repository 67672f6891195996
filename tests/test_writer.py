"""Atomic streaming writer: complete files or nothing at the destination."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, GGUFValueType

from llmquant.errors import DestinationError
from llmquant.gguf.source import GGUFSource
from llmquant.gguf.header import MetadataField
from llmquant.gguf.writer import TEMP_PREFIX, AtomicGGUFWriter, check_destination


def _write(dst, tensors, fail_after=None, force=False):
    with AtomicGGUFWriter(dst, "llama", force=force) as w:
        w.add_field(MetadataField("general.name", "x", GGUFValueType.STRING))
        w.add_field(MetadataField("llama.block_count", 3, GGUFValueType.UINT32))
        w.add_field(MetadataField("tokenizer.ggml.tokens", ["a", "b", "c"], GGUFValueType.ARRAY, GGUFValueType.STRING))
        w.add_field(MetadataField("tokenizer.ggml.scores", [0.5, 1.5], GGUFValueType.ARRAY, GGUFValueType.FLOAT32))
        for name, arr in tensors:
            w.add_tensor_info(name, tuple(reversed(arr.shape)), T.F32)
        w.start()
        for i, (name, arr) in enumerate(tensors):
            if fail_after is not None and i == fail_after:
                raise RuntimeError("boom")
            w.write_tensor(name, arr)
        w.commit()


def test_writes_readable_gguf(tmp_path):
    tensors = [("a", np.arange(64, dtype=np.float32).reshape(2, 32)), ("b", np.ones(7, np.float32))]
    dst = tmp_path / "out.gguf"
    _write(dst, tensors)
    r = GGUFReader(dst)
    assert [t.name for t in r.tensors] == ["a", "b"]
    src = GGUFSource(dst)
    np.testing.assert_array_equal(src.read("a"), tensors[0][1])
    assert src.get("tokenizer.ggml.tokens") == ["a", "b", "c"]
    assert src.get("tokenizer.ggml.scores") == [0.5, 1.5]
    assert src.get("llama.block_count") == 3
    assert not list(tmp_path.glob(TEMP_PREFIX + "*"))


def test_failure_leaves_nothing(tmp_path):
    tensors = [("a", np.zeros((4, 32), np.float32)), ("b", np.zeros((4, 32), np.float32))]
    dst = tmp_path / "out.gguf"
    with pytest.raises(RuntimeError, match="boom"):
        _write(dst, tensors, fail_after=1)
    assert not dst.exists()
    assert list(tmp_path.iterdir()) == []


def test_failure_keeps_previous_file(tmp_path):
    dst = tmp_path / "out.gguf"
    dst.write_bytes(b"previous")
    with pytest.raises(RuntimeError):
        _write(dst, [("a", np.zeros((1, 32), np.float32))], fail_after=0, force=True)
    assert dst.read_bytes() == b"previous"


def test_wrong_size_or_order_is_refused(tmp_path):
    dst = tmp_path / "out.gguf"
    with pytest.raises(RuntimeError, match="bytes, expected"):
        with AtomicGGUFWriter(dst, "llama") as w:
            w.add_tensor_info("a", (32,), T.F32)
            w.start()
            w.write_tensor("a", np.zeros(16, np.float32))
    with pytest.raises(RuntimeError, match="out of order"):
        with AtomicGGUFWriter(dst, "llama") as w:
            w.add_tensor_info("a", (32,), T.F32)
            w.add_tensor_info("b", (32,), T.F32)
            w.start()
            w.write_tensor("b", np.zeros(32, np.float32))
    assert list(tmp_path.iterdir()) == []


def test_check_destination(tmp_path):
    with pytest.raises(DestinationError, match="does not exist"):
        check_destination(tmp_path / "missing" / "x.gguf", force=False)
    (tmp_path / "x.gguf").write_bytes(b"1")
    with pytest.raises(DestinationError, match="already exists; pass --force"):
        check_destination(tmp_path / "x.gguf", force=False)
    assert check_destination(tmp_path / "x.gguf", force=True) == tmp_path / "x.gguf"
    with pytest.raises(DestinationError, match="is the source file"):
        check_destination(tmp_path / "x.gguf", force=True, src=tmp_path / "x.gguf")
    with pytest.raises(DestinationError, match="is a folder"):
        check_destination(tmp_path, force=True)
