"""The CLI as users run it: a real subprocess per call. Bad input gives one clear line on
stderr naming the file and the problem, a non-zero exit, and nothing at the destination."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import default_model_path
from tinymodel import write_tiny_llama
from gguf import GGMLQuantizationType as T

CLI = [sys.executable, "-m", "llmquant"]


def run(*args, cwd=None):
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300,
                          env={**os.environ, "COLUMNS": "200"})


def assert_clean_error(proc, *needles):
    assert proc.returncode != 0, proc.stdout
    err = proc.stderr.strip()
    assert "Traceback" not in err, err
    err = err.splitlines()[-1]  # a progress bar may precede an error found mid-way
    assert err.startswith("error:"), err
    for n in needles:
        assert n in err, f"{n!r} not in {err!r}"


def test_inspect_json_default_model():
    proc = run("inspect", "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["architecture"] == "llama" and info["n_layer"] == 30 and info["vocab_size"] == 49152
    assert info["file_type"] == "Q4_1" and info["has_chat_template"]
    assert info["n_params"] == 134515008


def test_inspect_tensors_lists_every_tensor():
    proc = run("inspect", "--tensors", "--json")
    info = json.loads(proc.stdout)
    assert len(info["tensors"]) == 272
    assert info["tensors"][0]["name"] == "token_embd.weight"


def test_quantize_json_and_dry_run(tmp_path):
    dst = tmp_path / "q.gguf"
    plan = json.loads(run("quantize", "--type", "q5_1", "--dry-run", "--json").stdout)
    proc = run("quantize", "--type", "q5_1", dst, "--json")
    assert proc.returncode == 0, proc.stderr
    done = json.loads(proc.stdout)
    assert done["file_bytes"] == dst.stat().st_size == plan["file_bytes"]
    assert done["types"]["Q5_1"]["tensors"] == 210
    assert {t["name"]: t["type"] for t in done["tensors"]} == {t["name"]: t["type"] for t in plan["tensors"]}


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_text("hello")
    dst = tmp_path / "out.gguf"
    assert_clean_error(run("quantize", bad, dst), str(bad), "not a GGUF")
    assert not dst.exists()
    assert_clean_error(run("inspect", bad), str(bad), "not a GGUF")


def test_truncated(tmp_path):
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(default_model_path().read_bytes()[:30_000_000])
    assert_clean_error(run("quantize", bad, tmp_path / "out.gguf"), str(bad), "truncated")
    assert not (tmp_path / "out.gguf").exists()


def test_unknown_type(tmp_path):
    assert_clean_error(run("quantize", "--type", "Q9_9", tmp_path / "o.gguf"), "Q9_9", "Q4_K_M")
    assert_clean_error(run("quantize", "--type", "Q8_0", "--tensor-type", "attn_v=Q7", "--dry-run"), "Q7")
    assert list(tmp_path.iterdir()) == []


def test_destination_problems(tmp_path):
    assert_clean_error(run("quantize", tmp_path / "nowhere" / "o.gguf"), "nowhere", "does not exist")
    existing = tmp_path / "o.gguf"
    existing.write_bytes(b"keep me")
    assert_clean_error(run("quantize", existing), str(existing), "--force")
    assert existing.read_bytes() == b"keep me"


def test_nan_tensor_is_named(tmp_path):
    src = write_tiny_llama(tmp_path / "nan.gguf", poison={"blk.1.attn_v.weight": float("nan")})
    dst = tmp_path / "o.gguf"
    assert_clean_error(run("quantize", src, dst), str(src), "blk.1.attn_v.weight", "NaN")
    assert not dst.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.gguf"]


def test_requantize_refused(tmp_path):
    src = write_tiny_llama(tmp_path / "q8.gguf", store=T.Q8_0)
    dst = tmp_path / "o.gguf"
    assert_clean_error(run("quantize", "--type", "Q4_0", src, dst), str(src), "--allow-requantize")
    assert not dst.exists()
    proc = run("quantize", "--type", "Q4_0", "--allow-requantize", src, dst)
    assert proc.returncode == 0, proc.stderr
    assert dst.exists()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_sigkill_mid_write_leaves_nothing(tmp_path):
    src = tmp_path / "src.gguf"
    src.write_bytes(default_model_path().read_bytes())
    before = _sha256(src)
    out = tmp_path / "out"
    out.mkdir()
    dst = out / "killed.gguf"
    proc = subprocess.Popen([*CLI, "quantize", "--type", "Q5_1", "--threads", "1", "--allow-requantize", src, dst],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    partial = []
    while time.time() < deadline:
        partial = [p for p in out.iterdir() if p.stat().st_size > 20_000_000]
        if partial:
            break
        time.sleep(0.02)
    assert partial, "the quantize process never started writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not dst.exists(), "a killed quantize left a file at the destination"
    assert _sha256(src) == before, "the source changed"
    # the next run is not disturbed by the leftover temporary file and succeeds
    done = run("quantize", "--type", "Q5_1", "--allow-requantize", src, dst)
    assert done.returncode == 0, done.stderr
    assert dst.exists()


def test_sigterm_cleans_up(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    dst = out / "term.gguf"
    proc = subprocess.Popen([*CLI, "quantize", "--type", "Q5_1", "--threads", "1", dst],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not any(p.stat().st_size > 10_000_000 for p in out.iterdir()):
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert proc.returncode != 0
    assert list(out.iterdir()) == [], "SIGTERM must remove the partial file"


def test_imatrix_required_is_refused_and_warned_in_dry_run(tmp_path):
    dst = tmp_path / "q2ks.gguf"
    assert_clean_error(run("quantize", "--type", "Q2_K_S", dst), "Q2_K_S needs an importance matrix", "--imatrix")
    assert not dst.exists()
    plan = json.loads(run("quantize", "--type", "Q2_K_S", "--dry-run", "--json").stdout)
    assert any("importance matrix" in n for n in plan["notes"])
