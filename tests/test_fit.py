"""fit: what fits where. Its numbers are checked three ways: against published sizes of known
models (presets built from their config.json values), against the buffers llama.cpp itself reports
for the embedded model, and against the peak RSS of real llama-cpp-python processes (slow tests:
every prediction within +-10% of the measurement)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from gguf import LlamaFileType as F
from helpers import default_model_path
from tinymodel import llama_tensors, write_tiny_llama

from llmquant.fit import planner as fitlib
from llmquant.fit.planner import (
    LOAD_FIXED,
    RUNTIME_BASELINE,
    Context,
    compute_reserved,
    cpu_memory,
    fit,
    fit_for,
    kv_bytes,
    rung_weights,
)
from llmquant.fit.catalog import (
    ModelSpecError,
    load_spec,
    spec_from_gguf,
    spec_from_hf_dir,
    spec_from_preset,
)
from llmquant.fit.machines import (
    GiB,
    SizeError,
    UnknownMachineError,
    find_machine,
    parse_size,
    this_machine,
)

MiB = 1 << 20
CLI = [sys.executable, "-m", "llmquant"]


def run_cli(*args):
    return subprocess.run([*CLI, *map(str, args)], check=False, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "200"})


# -- published numbers ---------------------------------------------------------------------------

def test_llama3_8b_kv_cache_at_8192_is_one_gib():
    # 2 x 32 layers x 8192 tokens x (8 KV heads x 128) x 2 bytes: GQA shrinks it 4x from 4 GiB
    spec = spec_from_preset("llama-3-8b")
    assert kv_bytes(spec, Context(8192)) == 1 << 30
    assert kv_bytes(spec, Context(8192, "q8_0")) == (1 << 30) * 34 // 64  # q8_0: 34 bytes per 32 values
    assert kv_bytes(spec, Context(8192, "q4_0")) == (1 << 30) * 18 // 64


@pytest.mark.parametrize("preset, per_token", [
    ("llama-2-7b", 512 * 1024),  # no GQA: the well-known 0.5 MiB per token
    ("mistral-7b", 128 * 1024),
    ("qwen2.5-7b", 56 * 1024),
    ("llama-3.1-70b", 320 * 1024),
])
def test_kv_cache_per_token_of_known_models(preset, per_token):
    spec = spec_from_preset(preset)
    assert kv_bytes(spec, Context(4096)) == 4096 * per_token


# (preset, rung, published file size in GB = 1e9 bytes, where it is published)
PUBLISHED_SIZES = [
    ("llama-3-8b", "Q4_K_M", 4.92, "bartowski/Meta-Llama-3-8B-Instruct-GGUF"),
    ("llama-3-8b", "Q8_0", 8.54, "bartowski/Meta-Llama-3-8B-Instruct-GGUF"),
    ("llama-3-8b", "Q5_K_M", 5.73, "bartowski/Meta-Llama-3-8B-Instruct-GGUF"),
    ("llama-3-8b", "F16", 16.07, "bartowski/Meta-Llama-3-8B-Instruct-GGUF"),
    ("llama-2-13b", "Q4_K_M", 7.87, "localmodels/Llama-2-13B-ggml (TheBloke's table)"),
    ("llama-2-7b", "Q4_K_M", 4.08, "TheBloke/Llama-2-7B-GGUF"),
    ("llama-2-7b", "Q8_0", 7.16, "TheBloke/Llama-2-7B-GGUF"),
    ("mistral-7b", "Q4_K_M", 4.37, "TheBloke/Mistral-7B-v0.1-GGUF"),
    ("mistral-7b", "Q6_K", 5.94, "TheBloke/Mistral-7B-v0.1-GGUF"),
]


@pytest.mark.parametrize("preset, ftype, gb, where", PUBLISHED_SIZES)
def test_rung_sizes_match_published_files(preset, ftype, gb, where):
    w = rung_weights(spec_from_preset(preset), ftype)
    assert abs(w.file_bytes / 1e9 - gb) <= 0.01 * gb, f"{preset} {ftype}: {w.file_bytes / 1e9:.3f} GB, {where} says {gb}"


@pytest.mark.parametrize("preset, billions", [
    ("llama-3-8b", 8.03), ("llama-3.1-70b", 70.55), ("qwen2.5-7b", 7.62), ("mistral-7b", 7.24),
    ("gemma-2-9b", 9.24), ("qwen2.5-0.5b", 0.494), ("llama-2-7b", 6.74),
])
def test_parameter_counts_of_presets(preset, billions):
    assert round(spec_from_preset(preset).n_params / 1e9, 3 if billions < 1 else 2) == billions


def test_sliding_window_layers_cache_only_the_window():
    # gemma-2: every other layer attends to the last 4096 tokens; llama.cpp sizes those layers'
    # cache min(n_ctx, pad256(n_swa + n_ubatch)) = 4608 cells
    spec = spec_from_preset("gemma-2-9b")
    assert sum(spec.swa_layers) == 21 and spec.swa_layers[0] and not spec.swa_layers[1]
    per_cell_layer = 2 * 8 * 256 * 2
    assert kv_bytes(spec, Context(32768)) == per_cell_layer * (21 * 32768 + 21 * 4608)
    assert kv_bytes(spec, Context(2048)) == per_cell_layer * 42 * 2048  # shorter than the window: no saving
    g3 = spec_from_preset("gemma-3-12b")  # 5 of every 6 layers slide over 1024 tokens
    assert sum(g3.swa_layers) == 40
    assert kv_bytes(g3, Context(32768)) == 2 * 8 * 256 * 2 * (8 * 32768 + 40 * 1536)


# -- model descriptions ----------------------------------------------------------------------------

def test_preset_tensor_table_is_the_real_gguf_table():
    real = spec_from_gguf(default_model_path())
    synth = spec_from_preset("smollm2-135m")
    assert sorted((n, s) for n, s, _ in synth.tensors) == sorted((n, s) for n, s, _ in real.tensors)
    for key in ("n_layer", "n_embd", "n_head", "n_head_kv", "n_ff", "n_vocab", "n_ctx_train", "tied"):
        assert getattr(synth, key) == getattr(real, key), key


def test_rung_plan_is_what_quantize_would_write():
    from llmquant.quantize import quantize_model

    spec = load_spec(None)
    for name in ("Q4_K_M", "Q8_0"):
        w = rung_weights(spec, name)
        dry = quantize_model(default_model_path(), None, F[f"MOSTLY_{name}"], dry_run=True)
        assert w.tensor_bytes == dry.output_bytes
        assert [t[2] for t in w.tensors] == [p.type for p in dry.plans]
        assert abs(w.file_bytes - dry.file_bytes) < 4096  # header: a few provenance fields differ


def _write_hf_folder(folder: Path, *, n_layer=2, n_embd=64, n_head=4, n_head_kv=2, n_ff=128, n_vocab=128,
                     with_data: bool = True) -> None:
    """config.json + one safetensors file (HF names, BF16). Without data the file stops after its
    header: fit must not need the weights."""
    from hfmodel import hf_name

    folder.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLM"], "hidden_size": n_embd, "intermediate_size": n_ff,
              "num_attention_heads": n_head, "num_hidden_layers": n_layer, "num_key_value_heads": n_head_kv,
              "vocab_size": n_vocab, "max_position_embeddings": 256, "tie_word_embeddings": False,
              "torch_dtype": "bfloat16"}
    (folder / "config.json").write_text(json.dumps(config))
    header, offset = {}, 0
    for name, arr in llama_tensors(n_layer, n_embd, n_head, n_head_kv, n_ff, n_vocab):
        size = arr.size * 2
        header[hf_name(name)] = {"dtype": "BF16", "shape": list(arr.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(folder / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        if with_data:
            f.write(bytes(offset))


@pytest.mark.parametrize("with_data", [True, False])
def test_hf_folder_is_sized_from_config_and_headers(tmp_path, with_data):
    _write_hf_folder(tmp_path / "hf", with_data=with_data)
    spec = spec_from_hf_dir(tmp_path / "hf")
    gguf = spec_from_gguf(write_tiny_llama(tmp_path / "tiny.gguf"))
    assert sorted((n, s) for n, s, _ in spec.tensors) == sorted((n, s) for n, s, _ in gguf.tensors)
    assert spec.source_dtype == "BF16" and not spec.tied and spec.notes == []
    report = fit(spec, find_machine("laptop-16gb"), n_ctx=256)
    assert [r.ftype for r in report.rungs] == list(fitlib.LADDER)


def test_hf_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelSpecError, match="no config.json"):
        load_spec(str(tmp_path / "empty"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "hidden_size": 8}))
    with pytest.raises(ModelSpecError, match="not supported"):
        load_spec(str(bad))
    (bad / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 64}))
    with pytest.raises(ModelSpecError, match="num_hidden_layers"):
        load_spec(str(bad))


def test_size_specs_resolve_to_presets():
    assert load_spec("8B").name == "llama-3.1-8b"
    assert load_spec("qwen2.5:7b").name == "qwen2.5-7b"
    assert load_spec("70b").name == "llama-3.1-70b"
    with pytest.raises(ModelSpecError, match="sizes: 1B, 3B, 8B, 70B"):
        load_spec("llama-3:13b")
    with pytest.raises(ModelSpecError, match="did you mean llama-3"):
        load_spec("lama-3:8b")


# -- machines and sizes ----------------------------------------------------------------------------

def test_parse_size():
    assert parse_size("16GB") == parse_size("16 GiB") == parse_size("16g") == parse_size("16") == 16 * GiB
    assert parse_size("512M") == 512 * MiB and parse_size("1.5T") == int(1.5 * 1024 * GiB)
    for bad in ("abc", "-5GB", "16XB", "1e9GB", "0", "10k"):
        with pytest.raises(SizeError):
            parse_size(bad)


def test_machine_lookup():
    assert find_machine("rtx-4090").gpu_bandwidth == 1008
    assert find_machine("4090").name == "rtx-4090"  # not 2x-rtx-4090
    assert find_machine("a100").vram == 80 * GiB
    with pytest.raises(UnknownMachineError) as e:
        find_machine("rtx 4090 ti")
    assert "rtx-4090" in e.value.close
    with pytest.raises(UnknownMachineError) as e:
        find_machine("m2-ultra")
    assert set(e.value.close) == {"mac-studio-m2-ultra-64gb", "mac-studio-m2-ultra-192gb"}


def test_this_machine_reads_ram_and_measures_bandwidth():
    m = this_machine()
    assert m.measured and m.ram > 1 * GiB and 0 < m.available <= m.ram
    assert 0.5 < m.bandwidth < 2000


# -- recommendations (the seeds' rules) --------------------------------------------------------------

def rec(model, machine, **kw):
    return fit(load_spec(model), find_machine(machine), **kw).recommendation


def test_task_sensitivity():
    assert rec("llama-3-8b", "rtx-4090", n_ctx=8192, task="chat").ftype == "Q4_K_M"
    assert rec("llama-3-8b", "rtx-4090", n_ctx=8192, task="code").ftype == "Q8_0"
    r = rec("llama-3-8b", "rtx-3060-12gb", n_ctx=32768, task="math")
    assert r.ftype in ("Q5_K_M", "Q6_K")  # Q8_0's 8 GB + a 4 GiB cache do not fit 12 GB; stays >= Q5_K_M


def test_small_models_stay_at_high_bits():
    r = rec(None, "laptop-8gb", n_ctx=2048)
    assert r.ftype == "Q8_0" and any("small model" in x for x in r.reasons)
    assert rec("qwen2.5-1.5b", "laptop-16gb", n_ctx=4096).ftype == "Q5_K_M"


def test_headroom_for_the_context_decides():
    r = rec("llama-3-8b", "macbook-air-m2-8gb", n_ctx=8192)
    assert r.ftype == "Q3_K_M"  # Q4_K_M's 4.6 GiB + 1 GiB of cache exceed the ~5.3 GiB Metal limit
    assert any("fits with a context of up to 3072" in x for x in r.reasons)
    r = rec("llama-3-8b", "macbook-air-m2-8gb", n_ctx=2048)
    assert r.ftype == "Q3_K_M" and any("would fit but leave only" in x for x in r.reasons)  # too tight
    assert rec("llama-3-8b", "macbook-air-m2-16gb", n_ctx=8192).ftype == "Q4_K_M"


def test_partial_offload_when_vram_is_short():
    r = rec("70b", "rtx-4090", n_ctx=8192)
    assert r.ftype == "Q4_K_M" and 30 < r.gpu_layers < 80 and "--gpu-layers" in r.verdict
    assert rec("70b", "2x-rtx-4090", n_ctx=8192).gpu_layers is None  # 48 GB hold Q4_K_M whole


def test_nothing_fits():
    r = rec("llama-3.1-70b", "macbook-air-m1-8gb", n_ctx=4096)
    assert r.ftype is None and r.verdict.startswith("Nothing fits")


def test_context_beyond_training_warns_and_still_computes():
    report = fit(load_spec(None), find_machine("laptop-16gb"), n_ctx=20000)
    assert any("beyond the 8192 tokens" in w for w in report.warnings)
    assert report.ctx.cells == 20224 and report.rungs[0].memory.kv == kv_bytes(report.spec, Context(20224))


def test_bad_settings():
    spec = load_spec(None)
    for kw, match in (({"n_ctx": 0}, "--ctx"), ({"kv_type": "q5_0"}, "--kv-type"), ({"n_batch": 0}, "--batch"),
                      ({"task": "poetry"}, "task")):
        with pytest.raises(fitlib.FitError, match=match):
            fit(spec, find_machine("laptop-8gb"), **kw)
    with pytest.raises(fitlib.FitError, match="either --machine"):
        fit_for(None, machine="rtx-4090", ram="16G")
    with pytest.raises(fitlib.FitError, match="needs --ram"):
        fit_for(None, vram="8G")


# -- the CLI: JSON schema, human output, bad input -------------------------------------------------------

RUNG_KEYS = {
    "ftype", "this_file", "bits_per_weight", "tensor_bytes", "file_bytes", "weights_bytes", "kv_bytes",
    "compute_bytes", "output_bytes", "overhead_bytes", "total_bytes", "cpu", "placement", "gpu_layers",
    "vram_bytes", "ram_bytes", "need_bytes", "usable_bytes", "fits", "tight", "headroom_bytes",
    "bytes_per_token", "tok_s", "tok_s_full_ctx", "max_ctx",
}


def test_json_output_is_the_documented_schema():
    proc = run_cli("fit", "--ram", "16GB", "--ctx", "2048", "--json")
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)
    assert d["schema"] == "llmquant.fit/1"
    assert set(d) == {"schema", "model", "settings", "machine", "rungs", "recommendation", "warnings", "notes"}
    assert set(d["settings"]) == {"n_ctx", "kv_cells", "kv_type", "n_batch", "n_ubatch", "flash_attn", "task"}
    assert set(d["recommendation"]) == {"ftype", "gpu_layers", "reasons", "verdict"}
    assert {"ram_bytes", "bandwidth_gbs", "usable_bytes", "kind"} <= set(d["machine"])
    for r in d["rungs"]:
        assert set(r) == RUNG_KEYS
        assert set(r["cpu"]) == {"compute_resident_bytes", "compute_reserved_bytes", "repacked_bytes",
                                 "total_bytes", "peak_rss_bytes"}
        assert r["total_bytes"] == r["weights_bytes"] + r["kv_bytes"] + r["compute_bytes"] + r["output_bytes"] + r["overhead_bytes"]
    assert [r["ftype"] for r in d["rungs"]] == ["Q2_K", "Q3_K_M", "Q4_1", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "F16"]
    assert d["rungs"][2]["this_file"] and d["rungs"][2]["kv_bytes"] == 45 * MiB


def test_human_output_is_a_table_and_a_verdict():
    proc = run_cli("fit", "llama-3-8b", "--machine", "rtx-3060-12gb", "--ctx", "8192", "--task", "code")
    assert proc.returncode == 0, proc.stderr
    assert "KV cache" in proc.stdout and "Q4_K_M" in proc.stdout and "1.00 GiB" in proc.stdout
    assert "Use Q8_0 for code on RTX 3060" in proc.stdout
    listing = run_cli("fit", "--machine", "list")
    assert "macbook-air-m1-8gb" in listing.stdout and "a100-80gb" in listing.stdout


@pytest.mark.parametrize("args, needle", [
    (("--machine", "rtx-4090ti"), "did you mean rtx-4090"),
    (("--ram", "sixteen"), "bad size 'sixteen'"),
    (("--ram", "0.001G"), "below 64 MiB"),
    (("--machine", "rtx-4090", "--ram", "16G"), "either --machine or --ram"),
    (("nonexistent.gguf",), "no such file"),
    (("--ctx", "0", "--ram", "8G"), "--ctx 0"),
])
def test_cli_bad_input_is_one_clear_line(args, needle):
    proc = run_cli("fit", *args)
    assert proc.returncode == 1
    err = proc.stderr.strip()
    assert "Traceback" not in err and err.startswith("error:") and needle in err, err


def test_cli_folder_without_config_json(tmp_path):
    proc = run_cli("fit", tmp_path, "--ram", "8G")
    assert proc.returncode == 1 and "no config.json" in proc.stderr


# -- formulas against llama.cpp's own buffers ------------------------------------------------------------

@pytest.mark.parametrize("n_ctx, n_batch, kv", [(512, 512, None), (8192, 512, None), (2048, 128, "q8_0"),
                                                (8192, 256, "q4_0")])
def test_kv_and_compute_match_what_llama_cpp_allocates(n_ctx, n_batch, kv):
    from llmquant.runtime.llama import llama_buffer_sizes

    spec = load_spec(None)
    got = llama_buffer_sizes(default_model_path(), n_ctx=n_ctx, n_batch=n_batch, kv_type=kv)
    ctx = Context(n_ctx, kv or "f16", n_batch, flash_attn=kv is not None)
    assert abs(kv_bytes(spec, ctx) - got["KV"]) <= 0.01 * MiB
    assert abs(rung_weights(spec, "Q4_1").data_bytes - got["model"]) <= 0.01 * MiB
    assert abs(compute_reserved(spec, ctx) / got["compute"] - 1) < 0.07, (compute_reserved(spec, ctx), got)


# -- the prediction against measured peak RSS (slow) ----------------------------------------------------

def _probe(path, n_ctx, *, batch=512, kv=None, prompt=64, gen=8) -> dict:
    cmd = [sys.executable, "-m", "llmquant.measure.memprobe", str(path), "--ctx", str(n_ctx), "--batch", str(batch),
           "--prompt", str(prompt), "--gen", str(gen), "--threads", "1"]
    if kv:
        cmd += ["--kv-type", kv]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def rung_files(tmp_path_factory):
    """The embedded model as shipped (Q4_1) plus two rungs quantized from it: Q8_0 and Q4_K_M (whose
    Q4_K tensors the CPU backend repacks on AVX2/NEON)."""
    from llmquant.quantize import quantize_model

    folder = tmp_path_factory.mktemp("fit-rungs")
    files = {"Q4_1": default_model_path()}
    for name in ("Q8_0", "Q4_K_M"):
        files[name] = folder / f"smollm2-{name}.gguf"
        quantize_model(default_model_path(), files[name], F[f"MOSTLY_{name}"], threads=1)
    return files


def _check(path, n_ctx, *, batch=512, kv=None, prompt=64, gen=8):
    from llmquant.fit.machines import cpu_isa

    got = _probe(path, n_ctx, batch=batch, kv=kv, prompt=prompt, gen=gen)
    spec = spec_from_gguf(path)
    ctx = Context(n_ctx, kv or "f16", batch, flash_attn=kv is not None)
    mem = cpu_memory(spec, rung_weights(spec, spec.file_type), ctx, isa=cpu_isa(),
                     prompt_tokens=got["prompt_tokens"], gen_tokens=gen)
    err = mem.peak_rss / got["peak_rss_bytes"] - 1
    line = (f"{spec.file_type:6} ctx {n_ctx:5} batch {batch:3} kv {kv or 'f16':4} prompt {got['prompt_tokens']:5}: "
            f"predicted {mem.peak_rss / MiB:6.1f} MiB, measured {got['peak_rss_bytes'] / MiB:6.1f} MiB ({err:+.1%}) "
            f"[weights {mem.weights / MiB:.1f} + repacked {mem.repacked / MiB:.1f} + KV {mem.kv / MiB:.1f} + "
            f"compute {mem.compute / MiB:.1f} + overhead {mem.overhead / MiB:.1f}]")
    print(line)
    assert abs(err) <= 0.10, line
    return got


@pytest.mark.slow
@pytest.mark.parametrize("rung", ["Q4_1", "Q8_0", "Q4_K_M"])
@pytest.mark.parametrize("n_ctx", [512, 2048, 8192])
def test_prediction_matches_measured_peak_rss(rung_files, rung, n_ctx):
    _check(rung_files[rung], n_ctx)


@pytest.mark.slow
@pytest.mark.parametrize("n_ctx, batch", [(512, 512), (1024, 128)])
def test_prediction_matches_a_full_context(rung_files, n_ctx, batch):
    # the context filled by the prompt: the compute buffer's worst case (KQ over every cell)
    _check(rung_files["Q4_1"], n_ctx, batch=batch, prompt=-1)


@pytest.mark.slow
@pytest.mark.parametrize("n_ctx, batch, kv", [(2048, 512, "q8_0"), (8192, 128, "q4_0")])
def test_prediction_matches_quantized_kv_cache(rung_files, n_ctx, batch, kv):
    _check(rung_files["Q4_1"], n_ctx, batch=batch, kv=kv)


@pytest.mark.slow
def test_runtime_baseline_is_what_python_and_llama_cpp_import_cost():
    got = json.loads(subprocess.run([sys.executable, "-m", "llmquant.measure.memprobe", "--baseline"],
                                    capture_output=True, text=True, check=True).stdout)
    assert abs(got["peak_rss_bytes"] / RUNTIME_BASELINE - 1) < 0.15, got
    assert LOAD_FIXED < RUNTIME_BASELINE
