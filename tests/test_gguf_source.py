"""GGUF source: metadata and tensors read correctly, and every kind of broken file refused
with a message naming the file and the problem, quickly and without large allocations."""

from __future__ import annotations

import struct
import time

import numpy as np
import pytest
import tracemalloc
from gguf import GGUFReader

from helpers import default_model_path
from llmquant.errors import ModelFileError
from llmquant.gguf.source import GGUFSource
from tinymodel import llama_tensors, write_tiny_llama


def test_default_model_metadata_and_tensors_match_gguf_py():
    path = default_model_path()
    src = GGUFSource(path)
    ref = GGUFReader(path)
    assert src.arch == "llama"
    assert src.arch_get("block_count") == 30
    assert src.arch_get("embedding_length") == 576
    assert len(src.get("tokenizer.ggml.tokens")) == 49152
    assert "im_start" in src.get("tokenizer.chat_template")
    assert [t.name for t in src.tensors] == [t.name for t in ref.tensors]
    for key, field in ref.fields.items():
        if key.startswith("GGUF."):
            continue
        assert key in src.fields
        assert src.fields[key].type == field.types[0]
    # tensor values: ours equal gguf-py's dequantization of the same bytes
    from gguf import quants

    for t in ref.tensors[:12]:
        ours = src.read(t.name)
        theirs = quants.dequantize(t.data, t.tensor_type).reshape(ours.shape)
        np.testing.assert_array_equal(ours, theirs)
        assert ours.dtype == np.float32


def test_tiny_model_round_trip(tmp_path):
    path = write_tiny_llama(tmp_path / "tiny.gguf")
    src = GGUFSource(path)
    for (name, arr), info in zip(llama_tensors(), src.tensors):
        assert info.name == name
        np.testing.assert_array_equal(src.read(name), arr)


def _expect_error(path, pattern):
    # time and memory in separate calls: tracemalloc makes the parse of a 49k-token header ~40x slower
    t0 = time.thread_time()  # this thread's CPU seconds: neither other processes nor other threads count
    with pytest.raises(ModelFileError, match=pattern) as exc:
        GGUFSource(path)
    assert time.thread_time() - t0 < 5, "refusing a bad file must be quick"
    tracemalloc.start()
    with pytest.raises(ModelFileError, match=pattern):
        GGUFSource(path)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 64 << 20, f"refusing a bad file allocated {peak >> 20} MiB"
    assert str(path) in str(exc.value)
    return exc.value


def test_not_a_gguf(tmp_path):
    p = tmp_path / "notes.gguf"
    p.write_text("this is just some text, certainly not a model\n" * 3)
    _expect_error(p, "not a GGUF file: magic")


def test_tiny_file(tmp_path):
    p = tmp_path / "empty.gguf"
    p.write_bytes(b"GGUF")
    _expect_error(p, "not a GGUF file: only 4 bytes")


def test_missing_file(tmp_path):
    _expect_error(tmp_path / "nope.gguf", "no such file")


def test_truncated_model(tmp_path):
    data = default_model_path().read_bytes()
    p = tmp_path / "half.gguf"
    p.write_bytes(data[: len(data) // 2])
    _expect_error(p, "truncated: tensor .* ends at byte")
    p.write_bytes(data[:5000])  # cut inside the metadata
    _expect_error(p, "truncated|claims")


def _header(n_tensors: int, n_kv: int, version: int = 3) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv)


def test_absurd_counts(tmp_path):
    p = tmp_path / "absurd.gguf"
    p.write_bytes(_header(2**60, 1) + b"\0" * 64)
    _expect_error(p, "claims 1152921504606846976 tensors")
    p.write_bytes(_header(0, 2**62) + b"\0" * 64)
    _expect_error(p, "claims 4611686018427387904 metadata entries")
    p.write_bytes(_header(0, 1, version=99) + b"\0" * 64)
    _expect_error(p, "unsupported GGUF version 99")


def _kv_string_array(key: str, count: int) -> bytes:
    k = key.encode()
    return struct.pack("<Q", len(k)) + k + struct.pack("<IIQ", 9, 8, count)


def test_absurd_array_and_string_lengths(tmp_path):
    p = tmp_path / "array.gguf"
    p.write_bytes(_header(0, 1) + _kv_string_array("tokenizer.ggml.tokens", 2**58) + b"\0" * 100)
    _expect_error(p, "'tokenizer.ggml.tokens' claims 288230376151711744 array elements")
    # a key whose length is absurd
    p.write_bytes(_header(0, 1) + struct.pack("<Q", 2**50) + b"abc" * 20)
    _expect_error(p, "metadata key claims length 1125899906842624")
    # one string inside an array claims more bytes than the file has
    body = _kv_string_array("tokenizer.ggml.tokens", 2) + struct.pack("<Q", 3) + b"abc" + struct.pack("<Q", 2**40)
    p.write_bytes(_header(0, 1) + body + b"x" * 40)
    _expect_error(p, "claims length 1099511627776")


def test_bad_tensor_info(tmp_path):
    good = write_tiny_llama(tmp_path / "tiny.gguf").read_bytes()
    name = b"token_embd.weight"
    at = good.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    # n_dims = 9
    bad = good[:at] + struct.pack("<I", 9) + good[at + 4:]
    p = tmp_path / "dims.gguf"
    p.write_bytes(bad)
    _expect_error(p, "has 9 dimensions")
    # unknown ggml type 250
    n_dims = struct.unpack_from("<I", good, at)[0]
    type_at = at + 4 + 8 * n_dims
    p.write_bytes(good[:type_at] + struct.pack("<I", 250) + good[type_at + 4:])
    _expect_error(p, "unknown ggml type 250")
    # a dimension of 2**45
    p.write_bytes(good[:at + 4] + struct.pack("<Q", 2**45) + good[at + 12:])
    _expect_error(p, "absurd dimension")


def _rss_file_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssFile:"):
                return int(line.split()[1])
    pytest.skip("no RssFile in /proc/self/status")


@pytest.mark.skipif(not hasattr(__import__("mmap"), "MADV_DONTNEED"), reason="no madvise here")
def test_release_drops_read_pages_from_the_resident_set():
    """The kernel's count of this process's file-backed resident pages (RssFile) grows by the
    model's bytes as every tensor is read, and shrinks again when each is released after use, as
    quantize does; the bytes read before and after a release are the same."""
    with GGUFSource(default_model_path()) as src:
        names = [t.name for t in src.tensors]
        total_kib = src.tensor_bytes // 1024
        before = _rss_file_kib()
        digests = {n: int(src.raw(n).astype(np.uint64).sum()) for n in names}
        touched = _rss_file_kib() - before
        for n in names:
            src.release(n)
        after = _rss_file_kib() - before
        assert touched > 0.8 * total_kib, (touched, total_kib)
        assert after < 0.1 * total_kib, (after, total_kib)
        assert all(int(src.raw(n).astype(np.uint64).sum()) == digests[n] for n in names[:5])
