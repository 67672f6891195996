"""The guides' llama.cpp command lines, with the tool name replaced by ``llmquant``, run as written:
``llama-cli -m model.gguf -p "..." -n 512 --temp 0.7 -ngl 99``, ``llama-server -m model.gguf --host 0.0.0.0
--port 8080 -ngl 99 -c 8192``, ``llama-quantize model-f16.gguf model-q4_k_m.gguf Q4_K_M`` and
``convert_hf_to_gguf.py DIR --outtype f16 --outfile model-f16.gguf``; ``-ngl`` reaches llama.cpp's model
params (read back from the loaded model) and ``-ngl auto`` is what ``fit`` plans.

The seed commands chain on one small random model (tests/hfmodel.py, the embedded model's tokenizer):
convert it, quantize the result, run and serve that.
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from helpers import default_model_path
from hfmodel import write_tiny_model
from llmquant.gguf.source import GGUFSource

GPU = None  # filled lazily: does this llama-cpp-python build offload?


def gpu_build() -> bool:
    global GPU
    if GPU is None:
        from llmquant.runtime.llama import gpu_offload_supported

        GPU = gpu_offload_supported()
    return GPU


def llmquant(*args: str, cwd: Path, timeout: int = 300):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LLMQUANT_HOME": str(cwd / ".home")}
    return subprocess.run([sys.executable, "-m", "llmquant", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=timeout, check=False)


def gpu_warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "no usable GPU" in line]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A folder with DIR: a small Hugging Face llama (256 wide, 2 layers, the embedded tokenizer)."""
    from hfmodel import tokenizer_json

    root = tmp_path_factory.mktemp("seeds")
    tok = root / "tok"
    tok.mkdir()
    with GGUFSource(default_model_path()) as src:
        doc = tokenizer_json(src.get("tokenizer.ggml.tokens"), src.get("tokenizer.ggml.token_type"),
                             src.get("tokenizer.ggml.merges"))
    (tok / "tokenizer.json").write_text(json.dumps(doc, ensure_ascii=False))
    (tok / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "tokenizer_class": "GPT2Tokenizer"}))
    write_tiny_model(root / "DIR", hidden=256, heads=4, kv_heads=2, layers=2, ff=512, tokenizer_from=tok, dtype="F32")
    return root


# -- convert_hf_to_gguf.py DIR --outtype f16 --outfile model-f16.gguf ------------------------------------
@pytest.fixture(scope="module")
def f16(work) -> Path:
    r = llmquant("convert", "DIR", "--outtype", "f16", "--outfile", "model-f16.gguf", cwd=work)
    assert r.returncode == 0, r.stderr
    return work / "model-f16.gguf"


@pytest.mark.slow
def test_convert_seed_command(f16, work, tmp_path):
    from llmquant.convert import convert_model

    with GGUFSource(f16) as g:
        assert g.get("general.file_type") == 1  # MOSTLY_F16, as convert_hf_to_gguf.py --outtype f16
        assert g.info("blk.0.attn_q.weight").type.name == "F16"
    # the same bytes as the library's conversion with the same settings
    lib = convert_model(work / "DIR", tmp_path / "lib.gguf", "f16")
    assert Path(lib.destination).read_bytes() == f16.read_bytes()


# -- llama-quantize model-f16.gguf model-q4_k_m.gguf Q4_K_M ------------------------------------------------
@pytest.fixture(scope="module")
def q4km(f16, work) -> Path:
    r = llmquant("quantize", "model-f16.gguf", "model-q4_k_m.gguf", "Q4_K_M", cwd=work)
    assert r.returncode == 0, r.stderr
    return work / "model-q4_k_m.gguf"


@pytest.mark.slow
def test_quantize_seed_command_equals_llama_quantize(q4km, f16, tmp_path):
    from gguf import LlamaFileType

    from llmquant.runtime import reference

    theirs = tmp_path / "llama-q4_k_m.gguf"
    reference.model_quantize(f16, theirs, LlamaFileType.MOSTLY_Q4_K_M)
    with GGUFSource(q4km) as a, GGUFSource(theirs) as b:
        assert a.get("general.file_type") == b.get("general.file_type") == int(LlamaFileType.MOSTLY_Q4_K_M)
        assert sorted(t.name for t in a.tensors) == sorted(t.name for t in b.tensors)
        for t in a.tensors:
            assert t.type == b.info(t.name).type, t.name
            assert np.array_equal(a.raw(t.name), b.raw(t.name)), t.name
        assert {t.type.name for t in a.tensors} >= {"Q4_K", "Q6_K"}


@pytest.mark.slow
def test_quantize_positional_type_threads_and_default_output(f16, work):
    # SRC TYPE THREADS: llama-quantize writes ggml-model-TYPE.gguf beside SRC
    r = llmquant("quantize", "model-f16.gguf", "Q8_0", "2", cwd=work)
    assert r.returncode == 0, r.stderr
    with GGUFSource(work / "ggml-model-Q8_0.gguf") as g:
        assert g.info("blk.0.attn_q.weight").type.name == "Q8_0"


# -- llama-cli -m model.gguf -p "..." -n 512 --temp 0.7 -ngl 99 --------------------------------------------
@pytest.mark.slow
def test_run_seed_command(q4km, work):
    r = llmquant("run", "-m", "model-q4_k_m.gguf", "-p", "Once upon a time", "-n", "32", "--temp", "0.7",
                 "-ngl", "99", cwd=work)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip()) > 0
    n_layers = 3  # 2 blocks + the output layer
    if gpu_build():
        assert not gpu_warnings(r.stderr)
        assert f"{n_layers} layers on" in r.stderr and "on CPU" not in r.stderr.splitlines()[-1]
    else:  # accepted with one warning line, as llama.cpp does on a CPU-only build
        assert len(gpu_warnings(r.stderr)) == 1, r.stderr
        assert f"{n_layers} layers on CPU" in r.stderr
    assert "tok/s" in r.stderr
    j = llmquant("run", "-m", "model-q4_k_m.gguf", "-p", "Once upon a time", "-n", "8", "--temp", "0.7",
                 "-ngl", "99", "-s", "1", "--json", cwd=work)
    assert j.returncode == 0, j.stderr
    off = json.loads(j.stdout)["offload"]
    assert off["n_gpu_layers"] == 99 and off["n_layers"] == n_layers  # read back from llama.cpp's params
    assert off["gpu_layers"] == (n_layers if gpu_build() else 0)


# -- llama-server -m model.gguf --host 0.0.0.0 --port 8080 -ngl 99 -c 8192 ---------------------------------
@pytest.mark.slow
def test_serve_seed_command(q4km, work):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LLMQUANT_HOME": str(work / ".home")}
    env.pop("LLMQUANT_API_KEY", None)
    log = (work / "serve.log").open("w+")
    proc = subprocess.Popen([sys.executable, "-m", "llmquant", "serve", "-m", "model-q4_k_m.gguf", "--host", "0.0.0.0",
                             "--port", str(port), "-ngl", "99", "-c", "8192"],
                            cwd=work, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    try:
        line = ""
        deadline = time.monotonic() + 120
        while "http://" not in line and time.monotonic() < deadline:
            if select.select([proc.stdout], [], [], 1.0)[0]:
                line = proc.stdout.readline()
                if not line:
                    break
        log.seek(0)
        assert "http://" in line, log.read()
        assert f":{port}/v1" in line and "context 8192" in line
        assert ("3 layers on CPU" in line) != gpu_build()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", method="POST",
                                     data=json.dumps({"prompt": "Hello", "max_tokens": 3, "temperature": 0}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            body = json.loads(resp.read())
        assert body["usage"]["completion_tokens"] >= 1
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.seek(0)
        logged = log.read()
        log.close()
    # listening on every interface without a key is allowed, with the warning serve always gives
    assert "without --api-key" in logged
    assert len(gpu_warnings(logged)) == (0 if gpu_build() else 1), logged


@pytest.mark.slow
def test_ladder_takes_ngl_to_eval_and_speed(f16, work):
    r = llmquant("ladder", "-m", "model-f16.gguf", "--rungs", "Q8_0", "--chunks", "1", "-c", "64", "-t", "1",
                 "-ngl", "99", "--out", "ladder-out", "--json", cwd=work)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["offload"]["n_gpu_layers"] == 99 and data["offload"]["n_layers"] == 3
    rung = data["rungs"][0]
    assert rung["eval"]["offload"]["n_gpu_layers"] == 99  # the evaluation's model
    assert rung["speed"]["offload"]["n_gpu_layers"] == 99  # the speed probe's subprocess
    assert len(gpu_warnings(r.stderr)) == (0 if gpu_build() else 1)


# -- -ngl reaches llama.cpp; auto is fit's plan -----------------------------------------------------------
@pytest.mark.parametrize("ngl", [0, 7, 99, -1])
def test_ngl_arrives_in_llama_cpp_model_params(ngl):
    import llama_cpp

    from llmquant.runtime.llama import Model

    with Model(default_model_path(), n_ctx=64, threads=1, n_gpu_layers=ngl) as m:
        params = m._llm._model.params  # what llama_model_load_from_file was given
        assert params.n_gpu_layers == (0x7FFFFFFF if ngl == -1 else ngl)
        off = m.offload
        assert off.requested == params.n_gpu_layers
        assert off.n_layers == llama_cpp.llama_model_n_layer(m._llm._model.model) + 1 == 31
        expect = min(31 if ngl < 0 else ngl, 31) if gpu_build() else 0
        assert (off.gpu_layers, off.cpu_layers) == (expect, 31 - expect)


@pytest.mark.parametrize("machine", ["rtx-4090", "rtx-3060", "macbook-air-m2-8gb"])
def test_auto_is_fits_plan_for_a_catalog_machine(machine):
    from llmquant.cli.options import auto_gpu_layers
    from llmquant.fit.planner import fit_for

    path = str(default_model_path())
    report = fit_for(path, machine=machine, n_ctx=4096)
    mine = next(r for r in report.rungs if r.weights.this_file)
    want = mine.gpu_layers if report.machine.kind == "gpu" else 31  # Metal: every layer and the output
    assert auto_gpu_layers(path, machine=machine, ctx=4096) == want == 31
    # a model larger than the GPU: fit's partial offload, layer for layer
    for preset, gpu in (("qwen2.5-14b", "rtx-3060"), ("llama-3-70b", "rtx-4090")):
        plan = fit_for(preset, machine=gpu, n_ctx=4096)
        f16 = next(r for r in plan.rungs if r.ftype == "F16")
        assert 0 < f16.gpu_layers < plan.spec.n_layer  # only part of it fits in VRAM
        assert auto_gpu_layers(preset, machine=gpu, ctx=4096) == f16.gpu_layers


@pytest.mark.slow
def test_auto_on_this_machine_agrees_with_the_runtime(tmp_path):
    from llmquant.cli.options import auto_gpu_layers
    from llmquant.fit.machines import this_machine, with_gpus
    from llmquant.fit.planner import gpu_layers_that_fit
    from llmquant.fit.catalog import load_spec
    from llmquant.runtime.llama import GpuDevice

    path = default_model_path()
    r = llmquant("bench", "-m", str(path), "-p", "8", "-n", "2", "-r", "1", "-t", "1", "-ngl", "auto", "--json",
                 cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert not gpu_warnings(r.stderr)  # auto asks for nothing a CPU build cannot do
    assert json.loads(r.stdout)["offload"]["n_gpu_layers"] == auto_gpu_layers(path, ctx=64, batch=32)
    # this machine as llama.cpp would describe it with one 8 GiB CUDA GPU: the whole small model
    fake = [GpuDevice("CUDA0", "NVIDIA test GPU", False, 8 << 30, 8 << 30)]
    mach = with_gpus(this_machine(bandwidth=1.0), fake)
    assert (mach.kind, mach.vram, mach.gpus) == ("gpu", 8 << 30, 1)
    assert gpu_layers_that_fit(load_spec(str(path)), mach, n_ctx=4096) == 31


@pytest.mark.slow
def test_bench_and_eval_report_the_layers(tmp_path):
    path = str(default_model_path())
    b = llmquant("bench", path, "-p", "8", "-n", "2", "-r", "1", "-t", "1", "-ngl", "99", cwd=tmp_path)
    assert b.returncode == 0, b.stderr
    header = [c.strip() for c in b.stdout.splitlines()[0].strip("|").split("|")]
    assert header == ["model", "size", "params", "backend", "threads", "ngl", "test", "t/s"]
    assert "31 layers on" in b.stderr
    e = llmquant("eval", "-m", path, "-c", "128", "--chunks", "1", "-t", "1", "-ngl", "99", "--json", cwd=tmp_path)
    assert e.returncode == 0, e.stderr
    assert json.loads(e.stdout)["offload"]["n_gpu_layers"] == 99


# -- spellings --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, names", [
    (["run", "-p", "hi", "-c", "512", "--ctx-size", "1024"], ("-c", "--ctx-size")),
    (["run", "-p", "hi", "--ctx=512", "-c1024"], ("--ctx", "-c")),
    (["serve", "-ngl", "1", "--n-gpu-layers", "2"], ("-ngl", "--n-gpu-layers")),
    (["run", "a.gguf", "-m", "b.gguf", "-p", "hi"], ("MODEL", "--model")),
    (["quantize", "a.gguf", "b.gguf", "Q4_0", "--type", "Q5_0"], ("TYPE", "--type")),
    (["convert", "DIR", "x.gguf", "--outfile", "y.gguf"], ("DST", "--outfile")),
    (["fit", "-b", "256", "--batch-size", "512"], ("-b", "--batch-size")),
])
def test_two_spellings_with_different_values_are_an_error_naming_both(args, names):
    from llmquant.cli import app
    from llmquant.errors import OptionError

    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, OptionError), result.output
    assert all(n in str(result.exception) for n in names), str(result.exception)


def test_help_shows_llama_cpp_aliases():
    from llmquant.cli import app

    out = CliRunner().invoke(app, ["run", "--help"], env={"COLUMNS": "200"}).output
    for name in ("--ctx", "--ctx-size", "-c", "-ngl", "--n-gpu-layers", "-m", "--model", "--min-p",
                 "--repeat-penalty", "--mlock", "--no-mmap", "-fa", "-ctk", "-ctv", "--batch-size"):
        assert name in out, name
    assert "-ngl" in CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200"}).output


def test_bad_ngl_is_one_clear_error():
    from llmquant.cli.options import parse_gpu_layers
    from llmquant.errors import OptionError

    assert [parse_gpu_layers(v) for v in ("0", "99", "all", "auto")] == [0, 99, -1, "auto"]
    for bad in ("-3", "many"):
        with pytest.raises(OptionError, match="n-gpu-layers"):
            parse_gpu_layers(bad)


def test_flash_attn_bare_or_with_a_value():
    import typer.main

    from llmquant.cli import app
    from llmquant.cli.options import _bare_flash_attn, parse_flash_attn

    params = typer.main.get_command(app).commands["run"].params
    assert _bare_flash_attn(params, ["-fa", "-ngl", "99"]) == ["-fa", "on", "-ngl", "99"]
    assert _bare_flash_attn(params, ["-p", "x", "-fa"]) == ["-p", "x", "-fa", "on"]
    assert _bare_flash_attn(params, ["--flash-attn", "off"]) == ["--flash-attn", "off"]
    assert _bare_flash_attn(params, ["-p", "-fa", "-n", "4"]) == ["-p", "-fa", "-n", "4"]  # a prompt "-fa"
    assert [parse_flash_attn(v) for v in ("on", "off", "auto", None)] == [True, False, None, None]
