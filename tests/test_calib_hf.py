"""GPTQ / AWQ of Hugging Face folders (calib/hf_quant.py, hf/export/): the exports load with their
ecosystem's own code and dequantize to exactly the weights we propagated with; bad input is refused
with one clear error and leaves no output folder.

compressed-tensors exports are loaded by transformers + compressed-tensors in this venv. GPTQ v1 and
AWQ GEMM exports are loaded by transformers + GPTQModel (its CPU torch kernels) in a separate venv
(``GPTQMODEL_VENV``, default /work/venvs/gptq-gptqmodel: gptqmodel 7.5 pins transformers/torch versions
of its own); those tests skip when that venv is absent.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")

from hfmodel import export_default_model, tokenizer_json, write_tiny_model  # noqa: E402

from helpers import default_model_path  # noqa: E402
from llmquant.calib.hf_quant import quantize_hf  # noqa: E402
from llmquant.errors import CalibrationError, LlmquantError  # noqa: E402
from llmquant.gguf.source import GGUFSource  # noqa: E402

GPTQMODEL_PY = Path(os.environ.get("GPTQMODEL_VENV", "/work/venvs/gptq-gptqmodel")) / "bin" / "python"
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A 2-layer random llama (GQA 4/2 heads) with SmolLM2's tokenizer, chat template and generation config."""
    tok = tmp_path_factory.mktemp("tok")
    with GGUFSource(default_model_path()) as src:
        doc = tokenizer_json(src.get("tokenizer.ggml.tokens"), src.get("tokenizer.ggml.token_type"), src.get("tokenizer.ggml.merges"))
    (tok / "tokenizer.json").write_text(json.dumps(doc, ensure_ascii=False))
    (tok / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "tokenizer_class": "GPT2Tokenizer", "chat_template": TEMPLATE}))
    folder = write_tiny_model(tmp_path_factory.mktemp("m") / "tiny", tokenizer_from=tok, dtype="F32", hidden=64, heads=4, kv_heads=2, ff=128)
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2, "max_new_tokens": 7}))
    return folder


def _quantize(src, dst, **kw):
    ours: dict[str, np.ndarray] = {}
    kw.setdefault("samples", 4)
    kw.setdefault("seq_len", 64)
    res = quantize_hf(src, dst, on_layer=lambda i, d: ours.update(d), **kw)
    return res, ours


def _load_ct(folder: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu")
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))  # transformers decompresses on the first forward
    return model


def _ct_scheme(folder: Path):
    from compressed_tensors.quantization import QuantizationScheme

    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    return QuantizationScheme.model_validate(qc["config_groups"]["group_0"])


@pytest.mark.parametrize("method,kw", [
    ("gptq", dict(act_order="static")), ("gptq", dict(act_order="none", sym=False, bits=8)), ("awq", dict()), ("rtn", dict(bits=2)),
])
def test_compressed_tensors_export_is_what_its_compressor_writes(tiny, tmp_path, method, kw):
    """Every linear's tensors are byte-identical to compressed-tensors' own PackedQuantizationCompressor
    output for our weights, and its decompress() gives our weights back exactly; symmetric exports also
    load through transformers (asymmetric ones do not: see the note in the test)."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor as PQC
    from safetensors.torch import load_file

    dst = tmp_path / "out"
    res, ours = _quantize(tiny, dst, method=method, group_size=32, **kw)
    qc = json.loads((dst / "config.json").read_text())["quantization_config"]
    w = qc["config_groups"]["group_0"]["weights"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized" and qc["ignore"] == ["lm_head"]
    assert (w["num_bits"], w["group_size"], w["symmetric"]) == (res.bits, 32, res.sym)
    assert w.get("actorder") == ("static" if kw.get("act_order") == "static" else None)
    # tokenizer, chat template, generation config travel with it
    assert json.loads((dst / "tokenizer_config.json").read_text())["chat_template"] == TEMPLATE
    assert (dst / "tokenizer.json").read_bytes() == (tiny / "tokenizer.json").read_bytes()
    assert json.loads((dst / "generation_config.json").read_text())["max_new_tokens"] == 7
    scheme = _ct_scheme(dst)
    stored = {}
    for f in dst.glob("*.safetensors"):
        stored.update(load_file(f))
    assert len(ours) == 14 == res.linears
    off = 1 << (res.bits - 1)
    for name, want in ours.items():
        mine = {k[len(name) + 1:]: v for k, v in stored.items() if k.startswith(name + ".")}
        assert set(mine) == {"weight_packed", "weight_scale", "weight_shape"} | (set() if res.sym else {"weight_zero_point"})
        # their compressor on our dequantized weights, scales and (unpacked, signed) zero points
        sd = {"weight": torch.from_numpy(want), "weight_scale": mine["weight_scale"]}
        if not res.sym:
            from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

            zp = unpack_from_int32(mine["weight_zero_point"], res.bits, mine["weight_scale"].shape, packed_dim=0)
            assert -off <= int(zp.min()) and int(zp.max()) < off
            sd["weight_zero_point"] = zp
        theirs = PQC.compress(sd, scheme)
        for k, v in mine.items():
            assert torch.equal(theirs[k], v), f"{name}.{k} differs from compressed-tensors' own compressor"
        back = PQC.decompress(dict(mine), scheme)["weight"].numpy()
        assert np.array_equal(back, want), f"{name}: {np.sum(back != want)} of {back.size} weights differ"
    if not res.sym:
        # transformers 5.24 (with compressed-tensors 0.19 and 0.20.1) allocates weight_zero_point unpacked
        # ([out, groups]) on its meta pass but the compressor writes it packed ([out*b/32, groups]), which
        # vLLM's loader expects: asymmetric pack-quantized folders (ours and llm-compressor's) do not load
        # in transformers 5.24 ("size mismatch ... weight_zero_point").
        return
    model = _load_ct(dst)
    mods = dict(model.named_modules())
    for name, want in ours.items():
        got = mods[name].weight.detach().numpy()
        assert np.array_equal(got, want), f"{name}: {np.sum(got != want)} of {got.size} weights differ, max {np.abs(got - want).max()}"
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[5, 6, 7, 8]])).logits).all()


def test_awq_folds_the_scales_into_the_norms(tiny, tmp_path):
    from llmquant.hf.safetensors import open_checkpoint, read_float32

    dst = tmp_path / "out"
    res, _ = _quantize(tiny, dst, method="awq", group_size=32, sym=True)
    assert res.notes and any("o_proj skipped" in n for n in res.notes)  # GQA: no v -> o scaling
    assert len(res.awq_alphas) == 6 and max(res.awq_alphas) > 0  # 3 mappings x 2 layers
    src = {e.name: e for e in open_checkpoint(tiny).entries}
    out = {e.name: e for e in open_checkpoint(dst).entries}
    name = "model.layers.0.input_layernorm.weight"
    assert not np.allclose(read_float32(out[name]), read_float32(src[name]))
    model = _load_ct(dst)  # and the float function is kept: the export is close to the source
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny, device_map="cpu")
    ids = torch.tensor([list(range(100, 164))])
    with torch.no_grad():
        a, b = model(ids).logits, base(ids).logits
    assert float(((a - b) ** 2).mean()) < 0.1 * float((b ** 2).mean())


def test_torch_factor_is_numpy_s_in_float32():
    """GPTQ's H⁻¹ factor by torch in float32 (hf_quant._torch_factor, the HF path) against the float64
    numpy one (gptq.inverse_factor, the GGUF path): upper triangular, UᵀU·H = I, the same U to float32
    precision; a matrix that is not positive definite raises LinAlgError (so gptq damps it more)."""
    from llmquant.calib.gptq import inverse_factor
    from llmquant.calib.hf_quant import _torch_factor

    rng = np.random.default_rng(3)
    for n in (96, 600):  # below and above the recursion's cut of 256
        X = rng.standard_normal((2 * n, n)) * rng.uniform(0.1, 3, n)
        H = 2 * X.T @ X / len(X) + 0.01 * np.eye(n)
        U, ref = _torch_factor(H), inverse_factor(H)
        assert U.dtype == np.float32 and np.array_equal(U, np.triu(U))
        assert np.allclose(U.astype(np.float64).T @ U @ H, np.eye(n), atol=2e-3)
        assert np.abs(U - ref).max() <= 1e-5 * np.abs(ref).max()
    with pytest.raises(np.linalg.LinAlgError):
        _torch_factor(-np.eye(8))


def test_gram_is_x_transpose_x():
    """hf_quant._gram (torch, the panels on and above the diagonal, mirrored) against numpy's xᵀx."""
    from llmquant.calib.hf_quant import _gram

    rng = np.random.default_rng(4)
    for cols in (1, 7, 64, 577):
        x = rng.standard_normal((300, cols)).astype(np.float32)
        G = _gram(torch.from_numpy(x))
        assert G.dtype == np.float64 and np.array_equal(G, G.T)
        assert np.allclose(G, x.astype(np.float64).T @ x, rtol=1e-5, atol=1e-3)


@pytest.mark.slow
def test_gptq_beats_rtn_on_the_layer_outputs(tiny, tmp_path, monkeypatch):
    """End to end on the tiny model: on held-out text (chunks 32-39 of the shipped calibration text,
    after the 32 calibrated on), the GPTQ export's logits are closer to the float model's than RTN's
    — in one pass per layer (true sequential, the default where the batch fits), in two (calibrate
    then propagate, where it does not), and with min/max group ranges (``range_search=0``).
    (With 8 calibration chunks GPTQ's margin depends on which chunks are held out; with 32 it is about 2x.)"""
    from transformers import AutoModelForCausalLM

    from llmquant.calib import hf_quant
    from llmquant.calib.hf_quant import calibration_tokens, default_calibration_text

    base = AutoModelForCausalLM.from_pretrained(tiny, device_map="cpu")
    ids = torch.from_numpy(calibration_tokens(tiny, default_calibration_text()[0], 40, 64)[32:])
    with torch.no_grad():
        ref = base(ids).logits
    errs, notes, weights = {}, {}, {}
    for run, method, kw in (("gptq", "gptq", {}), ("minmax", "gptq", {"range_search": 0}), ("two-pass", "gptq", {}), ("rtn", "rtn", {})):
        if run == "two-pass":
            monkeypatch.setattr(hf_quant, "ONE_PASS_SHARE", 0.0)
        res, weights[run] = _quantize(tiny, tmp_path / run, method=method, group_size=32, bits=3, samples=32, **kw)
        notes[run] = res.notes
        with torch.no_grad():
            errs[run] = float(((_load_ct(tmp_path / run)(ids).logits - ref) ** 2).mean())
    assert max(errs["gptq"], errs["minmax"], errs["two-pass"]) < errs["rtn"], errs
    assert any("do not fit one pass" in n for n in notes["two-pass"]) and not any("one pass" in n for n in notes["gptq"])
    # the first layer's q/k/v read the same input either way; its o_proj reads quantized q/k/v in one pass
    q = "model.layers.0.self_attn.q_proj"
    assert np.mean(weights["gptq"][q] == weights["two-pass"][q]) > 0.99
    o = "model.layers.0.self_attn.o_proj"
    assert np.mean(weights["gptq"][o] == weights["two-pass"][o]) < 0.99


def _gptqmodel_dequant(folder: Path, names: list[str]) -> dict:
    """Load ``folder`` with transformers + GPTQModel in its own venv; each linear's dequantized weight
    (GPTQModel's own ``dequantize_weight`` / ``awq_weight_dequantize``, i.e. its unpack code) and a
    forward pass, as float32 arrays."""
    script = f"""
import os, sys, numpy as np, torch
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(folder)!r}, device_map="cpu", dtype=torch.float16)
mods = dict(m.named_modules())
out = {{}}
for n in {names!r}:
    mod = mods[n]
    if hasattr(mod, "dequantize_weight"):  # GPTQ kernels
        w = mod.dequantize_weight()
    else:  # AWQ kernels: before the first forward repacks them for the CPU int4 matmul
        w = mod.awq_weight_dequantize(device="cpu", dtype=torch.float16)
    assert tuple(w.shape) == (mod.in_features, mod.out_features), (n, tuple(w.shape))  # GPTQModel's [in, out]
    out[n] = w.float().T.numpy()
    out["class:" + n] = np.array(type(mod).__name__)
with torch.no_grad():
    out["logits"] = m(torch.tensor([[5, 6, 7, 8]])).logits.float().numpy()
np.savez({str(folder / "_gptqmodel.npz")!r}, **out)
"""
    env = dict(os.environ, GPTQMODEL_CPU_WORKERS="2")
    env.pop("PYTHONPATH", None)
    run = subprocess.run([str(GPTQMODEL_PY), "-c", script], capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    with np.load(folder / "_gptqmodel.npz") as z:
        data = {k: z[k] for k in z.files}
    (folder / "_gptqmodel.npz").unlink()
    return data


@pytest.mark.long
@pytest.mark.slow
@pytest.mark.skipif(not GPTQMODEL_PY.exists(), reason=f"no GPTQModel venv at {GPTQMODEL_PY.parent.parent}")
@pytest.mark.parametrize("fmt,kw", [("gptq", dict(method="gptq", act_order="group")), ("gptq", dict(method="gptq", act_order="static", sym=False)),
                                    ("awq", dict(method="awq"))])
def test_gptq_v1_and_awq_gemm_exports_load_in_gptqmodel_with_our_weights(tiny, tmp_path, fmt, kw):
    dst = tmp_path / "out"
    res, ours = _quantize(tiny, dst, fmt=fmt, group_size=32, **kw)
    qc = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == fmt and qc["bits"] == 4 and qc["group_size"] == 32
    if fmt == "gptq":
        assert qc["desc_act"] == (kw["act_order"] == "group") and (dst / "quantize_config.json").is_file()
    theirs = _gptqmodel_dequant(dst, sorted(ours))
    for name, want in ours.items():
        got = theirs[name]
        # the checkpoint's scales are fp16 (exactly ours); GPTQModel dequantizes in fp16
        want16 = want.astype(np.float16).astype(np.float32)
        assert got.shape == want.shape, (name, got.shape, str(theirs["class:" + name]))
        assert np.array_equal(got, want16), f"{name} ({theirs['class:' + name]}): {np.sum(got != want16)} of {got.size} differ, max {np.abs(got - want16).max()}"
    assert np.isfinite(theirs["logits"]).all()


# -- inspect and fit read the exports ---------------------------------------------------------------------------
@pytest.mark.parametrize("method,fmt,kw", [
    ("gptq", "compressed-tensors", dict(act_order="static")), ("rtn", "compressed-tensors", dict(bits=8, sym=False)),
    ("gptq", "gptq", dict(act_order="group")), ("awq", "awq", dict()),
])
def test_inspect_and_fit_read_the_exports(tiny, tmp_path, method, fmt, kw):
    """Bits, group size, symmetry and act-order as asked; every quantized linear's logical shape and the
    parameter count as the float source holds them (read by the safetensors package); the bytes of the
    packed tensors as safetensors loads them; compressed-tensors' own weight_shape agrees; fit and the
    CLI say the same."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from llmquant.fit.catalog import spec_from_hf_dir
    from llmquant.hf.inspect import inspect_hf

    dst = tmp_path / "out"
    res, ours = _quantize(tiny, dst, method=method, fmt=fmt, group_size=32, **kw)
    source = {}
    for f in tiny.glob("*.safetensors"):
        with safe_open(f, "pt") as h:
            source.update({k: list(h.get_slice(k).get_shape()) for k in h.keys()})
    stored = {}
    for f in dst.glob("*.safetensors"):
        stored.update(load_file(f))
    info = inspect_hf(dst)
    sc = info.scheme
    assert (sc.method, sc.bits, sc.group_size, sc.symmetric) == (
        {"rtn": "compressed-tensors", "gptq": "compressed-tensors"}.get(method, method) if fmt == "compressed-tensors" else fmt,
        res.bits, 32, res.sym)
    assert sc.act_order == ({"static": "static", "group": "group"}.get(kw.get("act_order")) if method == "gptq" else None)
    assert info.n_params == sum(int(np.prod(v)) for v in source.values())
    assert info.quantized_linears == len(ours) == 14
    by_name = {t["name"]: t for t in info.tensors}
    for name in ours:
        assert by_name[f"{name}.weight"]["shape"] == source[f"{name}.weight"], name
        own = [k for k in stored if k.startswith(name + ".") and not k.endswith(".bias")]
        assert by_name[f"{name}.weight"]["bytes"] == sum(stored[k].numel() * stored[k].element_size() for k in own)
        if fmt == "compressed-tensors":
            assert stored[f"{name}.weight_shape"].tolist() == source[f"{name}.weight"]
    packed = sum(by_name[f"{n}.weight"]["bytes"] for n in ours)
    assert info.quantized_bytes == packed
    assert info.tensor_bytes == sum(v.numel() * v.element_size() for v in stored.values())
    # the bits a quantized weight really costs: codes + one scale (+ zero) per group, as stored
    assert res.bits < info.quantized_bits_per_weight < res.bits + 3
    spec = spec_from_hf_dir(dst)
    assert spec.n_params == info.n_params and spec.checkpoint["bits"] == res.bits
    assert not any("safetensors headers hold" in n for n in spec.notes)
    r = subprocess.run([sys.executable, "-m", "llmquant", "inspect", str(dst), "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["scheme"]["label"] == sc.label and d["n_params"] == info.n_params
    assert d["memory"]["as_stored"] == info.tensor_bytes
    r = subprocess.run([sys.executable, "-m", "llmquant", "inspect", str(dst)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "COLUMNS": "160"})
    assert r.returncode == 0 and sc.label in r.stdout and f"{res.bits} / 32" in r.stdout, r.stdout + r.stderr
    r = subprocess.run([sys.executable, "-m", "llmquant", "fit", str(dst), "--engine", "vllm", "--json"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert any(sc.label in n for n in json.loads(r.stdout)["notes"])


def test_inspect_names_a_config_that_does_not_match_the_tensors(tiny, tmp_path):
    import shutil

    from llmquant.errors import ModelFileError
    from llmquant.hf.inspect import inspect_hf

    folder = tmp_path / "liar"
    shutil.copytree(tiny, folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 32}}))
    with pytest.raises(ModelFileError, match=r"config.json says gptq, but no tensor ends in \.qweight"):
        inspect_hf(folder)
    (folder / "config.json").write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "compressed-tensors"}}))
    with pytest.raises(ModelFileError, match=r"config.json: quantization_config for compressed-tensors lacks or mistypes a field"):
        inspect_hf(folder)


# -- bad input ---------------------------------------------------------------------------------------------------
def test_group_size_that_does_not_divide_names_the_layers(tiny, tmp_path):
    with pytest.raises(CalibrationError, match=r"--group-size 48 does not divide.*model\.layers\.0\.mlp\.down_proj \(128\)"):
        quantize_hf(tiny, tmp_path / "o", group_size=48)
    assert not (tmp_path / "o").exists()


def test_default_group_size_says_why(tmp_path, tiny):
    from llmquant.calib.hf_quant import choose_group_size

    assert choose_group_size({"a": 4096, "b": 11008}, None) == (128, "group size 128")
    g, why = choose_group_size({"q": 576, "down": 1536}, None)
    assert g == 64 and "576" in why and "1536" not in why


def test_architecture_without_mappings_lists_the_known_ones(tmp_path, tiny):
    folder = write_tiny_model(tmp_path / "neox", arch="GPTNeoXForCausalLM", model_type="gpt_neox", tokenizer_from=tiny, dtype="F32")
    with pytest.raises(CalibrationError, match=r"model_type 'gpt_neox' has no layer mappings; known: llama, mistral, qwen2, qwen3"):
        quantize_hf(folder, tmp_path / "o", method="awq")


def test_calibration_text_shorter_than_asked(tiny, tmp_path):
    text = tmp_path / "short.txt"
    text.write_text("Only a few words of calibration text. " * 20)
    with pytest.raises(CalibrationError, match=r"short\.txt: \d+ tokens hold \d+ samples of 512 tokens, but 8 were asked for"):
        quantize_hf(tiny, tmp_path / "o", calib=text, samples=8, seq_len=512)
    assert not (tmp_path / "o").exists()


def test_format_limits_and_existing_destination(tiny, tmp_path):
    with pytest.raises(LlmquantError, match="AWQ GEMM format holds only 4-bit asymmetric"):
        quantize_hf(tiny, tmp_path / "o", method="gptq", fmt="awq")
    with pytest.raises(LlmquantError, match="act-order 'group'"):
        quantize_hf(tiny, tmp_path / "o", method="gptq", act_order="group")
    (tmp_path / "exists").mkdir()
    with pytest.raises(LlmquantError, match="exists"):
        quantize_hf(tiny, tmp_path / "exists", method="rtn", group_size=32)


def test_already_quantized_source_is_refused(tiny, tmp_path):
    dst = tmp_path / "q"
    quantize_hf(tiny, dst, method="rtn", group_size=32)
    with pytest.raises(CalibrationError, match="already quantized \\(quant_method 'compressed-tensors'\\)"):
        quantize_hf(dst, tmp_path / "again", method="rtn", group_size=32)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_kill_mid_run_leaves_no_output_folder(tiny, tmp_path, sig):
    dst = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen([sys.executable, "-m", "llmquant", "gptq", str(tiny), str(dst), "-g", "32", "-n", "12", "--seq-len", "512", "--json"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and not list(tmp_path.glob(".out.partial-*/model-00001-*")):
        assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
        time.sleep(0.05)
    assert list(tmp_path.glob(".out.partial-*")), "the run never started writing"
    proc.send_signal(sig)
    proc.wait(60)
    assert not dst.exists()
    if sig == signal.SIGTERM:  # cleaned up on the way out; after SIGKILL the next run removes the leftover
        assert not list(tmp_path.glob(".out.partial-*"))
    else:
        quantize_hf(tiny, dst, method="rtn", group_size=32)
        assert dst.is_dir() and not list(tmp_path.glob(".out.partial-*"))


# -- the default model ---------------------------------------------------------------------------------------
@pytest.mark.long
@pytest.mark.slow
def test_default_model_gptq_generates_coherent_text(tmp_path):
    """SmolLM2-135M as an HF folder -> GPTQ W4A16 g64 (compressed-tensors) -> transformers greedy text."""
    from transformers import AutoTokenizer

    src = export_default_model(tmp_path / "smol", shards=1)
    dst = tmp_path / "smol-gptq"
    res, ours = _quantize(src, dst, method="gptq", samples=4, seq_len=128)
    assert res.group_size == 64 and "576" in res.group_note and res.linears == 210
    tok = AutoTokenizer.from_pretrained(dst)
    model = _load_ct(dst)
    name = "model.layers.29.mlp.down_proj"
    assert np.array_equal(dict(model.named_modules())[name].weight.detach().numpy(), ours[name])
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=16, do_sample=False)
    text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in text, text


LLMCOMPRESSOR_PY = Path(os.environ.get("LLMCOMPRESSOR_VENV", "/work/venvs/gptq-llmcompressor")) / "bin" / "python"


@pytest.mark.long
@pytest.mark.slow
@pytest.mark.skipif(not LLMCOMPRESSOR_PY.exists(), reason=f"no llm-compressor venv at {LLMCOMPRESSOR_PY.parent.parent}")
def test_asymmetric_compressed_tensors_export_loads_in_transformers_5_17(tiny, tmp_path):
    """The asymmetric pack-quantized export that transformers 5.24 refuses (see above) loads in the
    transformers 5.17 + compressed-tensors 0.19 that llm-compressor 0.14 pins, with our weights exactly."""
    dst = tmp_path / "out"
    _, ours = _quantize(tiny, dst, method="awq", group_size=32)
    script = f"""
import numpy as np, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(dst)!r}, device_map="cpu")
with torch.no_grad():
    assert torch.isfinite(m(torch.tensor([[5, 6, 7, 8]])).logits).all()
mods = dict(m.named_modules())
np.savez({str(tmp_path / "w.npz")!r}, **{{n: mods[n].weight.detach().float().numpy() for n in {sorted(ours)!r}}})
"""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    run = subprocess.run([str(LLMCOMPRESSOR_PY), "-c", script], capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    with np.load(tmp_path / "w.npz") as z:
        for name, want in ours.items():
            assert np.array_equal(z[name], want), name
