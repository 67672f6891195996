"""Disk full, as a new user meets it: the destination is a 40 MB tmpfs mounted by the test.

For quantize, convert, pull and the ladder: the free space is checked against the exact planned
size before anything is written (one line, as the CLI prints it), and when the disk fills up
anyway (the check patched out: another process took the space) the ENOSPC is one named error.
Either way no file or temporary file is left at the destination, the source is untouched and
the store's index is unchanged. The same for imatrix (its free space is checked against a bound
before the collection, and each write is atomic; here also through ``--in-file``, which only
combines files).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import default_model_path

from llmquant.errors import DiskFullError, LlmquantError

SIZE_MB = 40


@pytest.fixture
def small_disk(tmp_path):
    """A fresh 40 MB tmpfs (we are root here); skipped, saying why, where mount is impossible."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (mount -t tmpfs); not root here")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SIZE_MB}m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip() or r.returncode}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(folder: Path, leave: int) -> None:
    """Take all but ``leave`` bytes of the filesystem with a ballast file."""
    import shutil

    free = shutil.disk_usage(folder).free
    with open(folder / "ballast", "wb") as f:
        f.truncate(0)
        chunk = b"\0" * (1 << 20)
        n = max(0, free - leave)
        while n > 0:
            f.write(chunk[:min(n, len(chunk))])
            n -= len(chunk)


def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != "ballast")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmquant", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


def _one_line(r: subprocess.CompletedProcess, needle: str) -> str:
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], r.stderr
    return lines[0]


def _no_space_check(monkeypatch):
    """As if the space went while writing: the up-front check passes."""
    import llmquant.gguf.writer as writer

    monkeypatch.setattr(writer, "check_free_space", lambda *a, **k: None)


# -- quantize ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_quantize_to_a_small_disk_is_one_line_and_leaves_nothing(small_disk):
    src = default_model_path()
    before = _digest(src)
    r = _cli("quantize", str(small_disk / "out-Q8_0.gguf"), "--type", "Q8_0")
    line = _one_line(r, "not enough disk space")
    assert "out-Q8_0.gguf" in line and "MiB" in line
    # the planned size it names is the one --dry-run reports
    dry = json.loads(_cli("quantize", str(src), str(small_disk / "x.gguf"), "--type", "Q8_0", "--dry-run", "--json").stdout)
    assert f"{-(-dry['file_bytes'] // 4096) * 4096 / 2**20:,.1f} MiB" in line
    assert _entries(small_disk) == []
    assert _digest(src) == before


@pytest.mark.slow
def test_quantize_when_the_disk_fills_while_writing(small_disk, monkeypatch):
    from gguf import LlamaFileType

    from llmquant.quantize import quantize_model

    _no_space_check(monkeypatch)
    src = default_model_path()
    before = _digest(src)
    with pytest.raises(DiskFullError, match="the disk filled up while writing") as exc:
        quantize_model(src, small_disk / "out-Q8_0.gguf", LlamaFileType.MOSTLY_Q8_0, threads=2)
    assert "\n" not in str(exc.value) and "out-Q8_0.gguf" in str(exc.value)
    assert _entries(small_disk) == []  # no output, no .llmquant-partial-*
    assert _digest(src) == before


# -- convert ----------------------------------------------------------------------------------------------
def _tiny_hf(folder: Path) -> Path:
    from hfmodel import spm_model_bytes, write_tiny_model

    pieces = [("<unk>", 0.0, 2), ("<s>", 0.0, 3), ("</s>", 0.0, 3)] + [(f"<0x{i:02X}>", 0.0, 6) for i in range(256)]
    pieces += [("▁a", -1.0, 1), ("▁b", -2.0, 1)]
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes(spm_model_bytes(pieces))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return write_tiny_model(folder, arch="MistralForCausalLM", model_type="mistral", vocab_size=len(pieces) + 2,
                            dtype="F16", hidden=256, ff=512, layers=4)


def _tree_digest(folder: Path) -> dict[str, str]:
    return {p.name: _digest(p) for p in sorted(folder.iterdir())}


def test_convert_to_a_full_disk(small_disk, tmp_path, monkeypatch):
    from llmquant.convert import convert_model

    hf = _tiny_hf(tmp_path / "hf")
    before = _tree_digest(hf)
    _fill(small_disk, 256 << 10)
    r = _cli("convert", str(hf), str(small_disk / "m.gguf"), "--outtype", "f32")
    _one_line(r, "not enough disk space")
    assert _entries(small_disk) == []
    # the space goes while writing; and with --quantize (an intermediate file) too
    _no_space_check(monkeypatch)
    from llmquant.gguf.recipes import parse_ftype

    for outtype, quantize in (("f32", None), ("f16", parse_ftype("Q8_0"))):
        with pytest.raises(DiskFullError, match="filled up"):
            convert_model(hf, small_disk / "m.gguf", outtype, quantize=quantize)
        assert _entries(small_disk) == []
    assert _tree_digest(hf) == before


# -- pull -------------------------------------------------------------------------------------------------
def _store_state(home: Path) -> list[str]:
    models = home / "models"
    return sorted(str(p.relative_to(home)) for p in models.rglob("*")) if models.exists() else []


@pytest.mark.slow
def test_pull_into_a_store_on_a_small_disk(small_disk, tmp_path, monkeypatch):
    from llmquant import store

    home = small_disk / "home"
    src = default_model_path()
    before = _digest(src)
    # a model already there stays as it was
    from tinymodel import write_tiny_llama

    tiny = write_tiny_llama(tmp_path / "tiny.gguf")
    monkeypatch.setenv("LLMQUANT_HOME", str(home))
    store.pull(tiny, "tiny:one")
    index = _store_state(home)
    r = _cli("pull", str(src), "--name", "smol:big", env={"LLMQUANT_HOME": str(home)})
    _one_line(r, "not enough disk space")
    assert _store_state(home) == index and list((home / "tmp").iterdir()) == []
    # the disk fills during the copy
    import llmquant.gguf.writer as writer

    monkeypatch.setattr(writer, "check_free_space", lambda *a, **k: None)
    with pytest.raises(DiskFullError, match="filled up"):
        store.pull(src, "smol:big")
    assert _store_state(home) == index and list((home / "tmp").iterdir()) == []
    assert store.get("tiny:one").sha256 == _digest(tiny)
    assert _digest(src) == before


# -- ladder -----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ladder_on_a_small_disk(small_disk, monkeypatch):
    from llmquant.measure.ladder import run_ladder

    out = small_disk / "ladder"
    src = default_model_path()
    before = _digest(src)
    r = _cli("ladder", "--out", str(out), "--rungs", "Q8_0,Q4_0", "--no-speed")
    line = _one_line(r, "not enough disk space")
    assert "the ladder's 3 files" in line
    assert not out.exists()  # the folder it made is gone again
    _no_space_check(monkeypatch)  # the space goes while the base is written
    monkeypatch.setattr("llmquant.measure.ladder._check_space", lambda *a, **k: None)
    monkeypatch.setattr("llmquant.measure.ladder.check_disk_space", lambda *a, **k: None)  # the per-file check
    with pytest.raises(DiskFullError, match="filled up"):
        run_ladder(src, rungs=("Q8_0",), out_dir=out, speed=False)
    assert _entries(out) == []
    assert _digest(src) == before


# -- imatrix -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["gguf", "dat"])
def test_imatrix_to_a_full_disk(small_disk, tmp_path, monkeypatch, fmt):
    import numpy as np

    import llmquant.gguf.imatrix as imatrix

    rng = np.random.default_rng(0)
    entries = {f"blk.{i}.ffn_up.weight": (rng.random((1, 576), dtype=np.float32), np.array([512.0]))
               for i in range(30)}
    src = imatrix.save_imatrix(tmp_path / f"in.{fmt}", entries, datasets=["calib.txt"], chunk_count=1,
                               chunk_size=512, output_format=fmt)
    before = _digest(src)
    _fill(small_disk, 16 << 10)
    r = _cli("imatrix", "--in-file", str(src), "-o", str(small_disk / f"out.{fmt}"))
    _one_line(r, "not enough disk space")
    assert _entries(small_disk) == []
    monkeypatch.setattr(imatrix, "check_free_space", lambda *a, **k: None)
    with pytest.raises(DiskFullError, match="filled up"):
        imatrix.save_imatrix(small_disk / f"out.{fmt}", entries, datasets=["calib.txt"], chunk_count=1,
                             chunk_size=512, output_format=fmt)
    assert _entries(small_disk) == []
    assert _digest(src) == before


def test_imatrix_refuses_a_small_disk_before_collecting(small_disk, tmp_path, monkeypatch):
    """The space check comes before the forward passes (hours on a big model), not after them;
    its bound holds the file the collection really writes."""
    import llmquant.runtime.llama as runtime
    from llmquant.calib.stats import ImatrixStats
    from llmquant.calibrate import imatrix_bytes_bound, make_imatrix

    model = default_model_path()
    written = make_imatrix(model, None, tmp_path / "one.gguf", chunks=1, n_ctx=128).path.stat().st_size
    bound = imatrix_bytes_bound(model, ImatrixStats(chunk_size=128))
    assert written <= bound <= 1.5 * written, (written, bound)
    _fill(small_disk, 256 << 10)  # room for a few small writes, not for the file
    r = _cli("imatrix", str(model), "--chunks", "1", "-c", "128", "-o", str(small_disk / "out.gguf"))
    _one_line(r, "not enough disk space for out.gguf")
    assert _entries(small_disk) == []

    def no_collection(*a, **k):
        raise AssertionError("collection started before the space check")

    monkeypatch.setattr(runtime, "MatmulTap", no_collection)
    with pytest.raises(DiskFullError, match="not enough disk space"):
        make_imatrix(model, None, small_disk / "out.gguf", chunks=1, n_ctx=128)
    assert _entries(small_disk) == []


def test_disk_errors_are_named_llmquant_errors():
    assert issubclass(DiskFullError, LlmquantError)
    from llmquant.gguf.writer import write_failed

    e = write_failed(Path("/x/y.gguf"), OSError("940032 requested and 664224 written"), needed=1 << 20)
    assert isinstance(e, DiskFullError) and "1.0 MiB" in str(e)
    e = write_failed(Path("/x/y.gguf"), OSError(13, "Permission denied"))
    assert not isinstance(e, DiskFullError) and "Permission denied" in str(e)
