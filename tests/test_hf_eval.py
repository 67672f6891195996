"""Hugging Face formats in the measurement loop (runtime/torch.py, eval across formats).

The default model as an HF folder (made by transformers' GGUF loader from the shipped GGUF) is
evaluated by transformers against its own F32 GGUF in llama.cpp: the proof that comparisons across
runtimes are fair. NF4 through bitsandbytes, a compressed-tensors checkpoint through transformers
and through the dequantized llama.cpp fast path, and the bad inputs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llmquant.errors import CheckpointLoadError, EvalError, MissingExtraError, UnsafeFormatError
from llmquant.measure.eval import ModelRef, evaluate, evaluate_many, load_text

CTX = 128


@pytest.mark.slow
def test_hf_folder_matches_its_f32_gguf(hf_smollm, smollm_f32_gguf):
    from llmquant.runtime.llama import Model
    from llmquant.runtime.torch import TorchModel

    cfg = json.loads((hf_smollm / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["architectures"] == ["LlamaForCausalLM"]
    r = evaluate(hf_smollm, base=smollm_f32_gguf, ctx=CTX, chunks=4, threads=2)
    assert (r.runtime, r.model_format, r.base_file_type) == ("transformers", "F32", "F32")
    assert r.n_tokens_scored == 4 * (CTX // 2 - 1)
    assert r.kld_mean < 1e-4, r.kld_mean
    assert r.top1 > 99.5, r.top1
    assert abs(r.ppl / r.base_ppl - 1) < 1e-3
    # both tokenizers give the same ids on the text, so either may be the base
    text, _ = load_text(None)
    with Model(smollm_f32_gguf, n_ctx=64, vocab_only=True) as g, TorchModel(hf_smollm, threads=2) as t:
        assert t.vocab_digest() == g.vocab_digest()
        assert (t.add_bos, t.bos) == (g.add_bos, g.bos)
        assert t.tokenize(text[:20000]) == g.tokenize(text[:20000])


@pytest.mark.slow
def test_nf4_loads_generates_measures_and_reloads(hf_smollm, smollm_f32_gguf, tmp_path):
    from llmquant.runtime.torch import TorchModel

    with TorchModel(hf_smollm, threads=2) as fp32:
        fp32_bytes = fp32.memory_bytes
        n_params = fp32.n_params
    with TorchModel(hf_smollm, load="nf4", threads=2) as m:
        q = m.quantization
        assert (q.method, q.label) == ("bitsandbytes", "NF4")
        assert q.details == {"quant_type": "nf4", "blocksize": 64, "double_quant": True, "compute_dtype": "float32"}
        assert m.n_params == n_params
        assert 0.25 * fp32_bytes < m.memory_bytes < 0.4 * fp32_bytes  # embeddings stay fp32
        text = m.complete("The capital of France is", max_tokens=6)
        assert "Paris" in text, text
        saved = m.save_pretrained(tmp_path / "nf4")
    cfg = json.loads((saved / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "bitsandbytes" and cfg["bnb_4bit_quant_type"] == "nf4"
    assert cfg["bnb_4bit_use_double_quant"] is True
    with TorchModel(saved, threads=2) as re:
        assert re.quantization.label == "NF4" and re.quantization.details["blocksize"] == 64
        assert re.file_bytes < 0.4 * (hf_smollm / "model.safetensors").stat().st_size
        assert re.complete("The capital of France is", max_tokens=6) == text
    live, reloaded = evaluate_many([ModelRef(hf_smollm, load="nf4"), saved], smollm_f32_gguf, ctx=CTX, chunks=2, threads=2)
    assert live.model_format == reloaded.model_format == "NF4"
    assert 0.02 < live.kld_mean < 1.0, live.kld_mean  # a 4-bit loss, far above the runtime noise
    assert abs(reloaded.kld_mean / live.kld_mean - 1) < 0.02
    assert live.notes == [] and live.runtime == "transformers"


@pytest.mark.slow
def test_dequantized_fast_path_equals_torch_path(ct_smollm, smollm_f32_gguf):
    cfg = json.loads((ct_smollm / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] == "pack-quantized"
    torch_path, fast = evaluate_many([ModelRef(ct_smollm), ModelRef(ct_smollm, runtime="llama")], smollm_f32_gguf,
                                     ctx=CTX, chunks=4, threads=2)
    assert torch_path.runtime == "transformers" and fast.runtime == "llama.cpp"
    assert torch_path.model_format == "compressed-tensors W4A16 g64"
    assert "dequantized weights" in fast.notes[0]
    assert torch_path.kld_mean > 0.02, torch_path.kld_mean
    assert abs(fast.kld_mean / torch_path.kld_mean - 1) < 0.02, (fast.kld_mean, torch_path.kld_mean)
    assert abs(fast.ppl / torch_path.ppl - 1) < 0.01
    assert abs(fast.top1 - torch_path.top1) < 2.0


# -- bad input ---------------------------------------------------------------------------------------------

def _tiny_hf(folder: Path, tokenizer_from: Path, **kw) -> Path:
    from hfmodel import write_tiny_model

    return write_tiny_model(folder, tokenizer_from=tokenizer_from, dtype="F32", **kw)


@pytest.mark.slow
def test_different_vocabularies_are_refused(hf_smollm, tmp_path):
    from tinymodel import write_tiny_llama

    tiny = write_tiny_llama(tmp_path / "tiny.gguf")
    hf = _tiny_hf(tmp_path / "hf-tiny", hf_smollm)
    with pytest.raises(EvalError, match=r"tiny.gguf and the base hf-tiny have different vocabularies \(128 vs 49152 tokens\)"):
        evaluate(tiny, base=hf, ctx=32, threads=2)
    # same size, two token ids swapped: the same strings, other ids
    other = tmp_path / "hf-other"
    shutil.copytree(hf, other)
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = (next(t for t, i in vocab.items() if i == k) for k in (49150, 49151))
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(EvalError, match="different vocabularies \\(49152 vs 49152 tokens, different token texts\\)"):
        evaluate(other, base=hf, ctx=32, threads=2)


@pytest.mark.slow
def test_pickled_weights_need_allow_pickle(hf_smollm, tmp_path):
    import torch
    from safetensors.torch import load_file

    from llmquant.runtime.torch import TorchModel

    hf = _tiny_hf(tmp_path / "st", hf_smollm)
    pk = tmp_path / "pk"
    shutil.copytree(hf, pk)
    torch.save(load_file(str(pk / "model.safetensors")), pk / "pytorch_model.bin")
    (pk / "model.safetensors").unlink()
    with pytest.raises(UnsafeFormatError, match=r"pytorch_model.bin: is a PyTorch pickle.*--allow-pickle"):
        evaluate(pk, ctx=32)
    with TorchModel(hf) as a, TorchModel(pk, allow_pickle=True) as b:
        ids = list(range(100, 132))
        assert (a.chunk_logits(ids, 16) == b.chunk_logits(ids, 16)).all()
        assert b.info.pickled


def test_checkpoint_transformers_cannot_load_names_its_format(tmp_path):
    from hfmodel import write_tiny_model

    hf = write_tiny_model(tmp_path / "gptq", vocab_size=256, dtype="F32")
    cfg = json.loads((hf / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 64, "desc_act": False, "sym": True}
    (hf / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointLoadError, match=r"gptq: cannot load this gptq checkpoint on CPU: .*gptqmodel"):
        evaluate(hf, ctx=32)
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [64, 64]}
    (hf / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointLoadError, match=r"cannot load this fp8 checkpoint on CPU"):
        evaluate(hf, ctx=32)


def test_load_nf4_needs_an_hf_folder(tmp_path):
    from hfmodel import write_tiny_model
    from helpers import default_model_path

    hf_smollm = write_tiny_model(tmp_path / "hf", vocab_size=256, dtype="F32")
    with pytest.raises(EvalError, match="quantizes a Hugging Face folder at load time"):
        evaluate(ModelRef(default_model_path(), load="nf4"), ctx=32)
    with pytest.raises(EvalError, match="unknown --load 'int3'"):
        evaluate(ModelRef(hf_smollm, load="int3"), ctx=32)
    with pytest.raises(EvalError, match="cannot be combined with the llama.cpp runtime"):
        evaluate(ModelRef(hf_smollm, load="nf4", runtime="llama"), ctx=32)


def test_missing_hf_extra_is_a_one_line_hint(tmp_path, monkeypatch):
    from hfmodel import write_tiny_model

    hf_smollm = write_tiny_model(tmp_path / "hf", vocab_size=256, dtype="F32")
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
    with pytest.raises(MissingExtraError, match=r"needs the \[hf\] extra: pip install 'llmquant\[hf\]'$"):
        evaluate(hf_smollm, ctx=32)
    # the CLI, in a real subprocess where torch and transformers cannot be imported
    fake = tmp_path / "no-torch"
    for pkg in ("torch", "transformers"):
        (fake / pkg).mkdir(parents=True)
        (fake / pkg / "__init__.py").write_text(f'raise ImportError("No module named {pkg}")\n')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake), os.environ.get("PYTHONPATH", "")]), "COLUMNS": "300"}
    proc = subprocess.run([sys.executable, "-m", "llmquant", "eval", str(hf_smollm), "--ctx", "32"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].endswith("pip install 'llmquant[hf]'"), proc.stderr


# -- the format comparison in the ladder ---------------------------------------------------------------

@pytest.mark.slow
def test_ladder_compares_formats_in_one_table(hf_smollm, tmp_path):
    from llmquant.measure.ladder import run_ladder
    from llmquant.measure.report import columns, markdown, rows, write_all

    out = tmp_path / "ladder"
    r = run_ladder(hf_smollm, rungs=("Q4_0",), out_dir=out, ctx=CTX, chunks=2, threads=2, formats=("gguf", "nf4"))
    assert [(x.name, x.format, x.runtime) for x in r.rungs] == [("Q4_0", "gguf", "llama.cpp"), ("NF4", "nf4", "transformers")]
    q4, nf4 = r.rungs
    # one base, same tokens: the GGUF rungs read the base from llama-perplexity's 16-bit stored
    # log-probabilities (steps of (max - min)/65535, a few 1e-6 of the PPL), the HF rows from exact logits
    assert r.base_type == "F32" and r.source_type == "F32"
    assert q4.eval["base_ppl"] == pytest.approx(nf4.eval["base_ppl"], rel=1e-4)
    assert nf4.eval["n_tokens_scored"] == q4.eval["n_tokens_scored"]
    assert nf4.eval["kld_mean"] > 0.02 and nf4.memory_bytes < nf4.file_bytes * 1.1
    assert 4.0 < nf4.bits_per_weight < 12.0  # 4-bit matrices plus fp32 embeddings
    assert nf4.speed["pp_tps"] > 0 and nf4.speed["tg_tps"] > 0 and nf4.speed["peak_rss"] > nf4.memory_bytes
    assert "transformers" in nf4.engines and "Ollama" in q4.engines
    assert (Path(nf4.path) / "config.json").is_file()
    cols = columns(r)
    assert cols[:4] == ("rung", "format", "size", "in memory") and cols[-1] == "runs in"
    assert all(len(row) == len(cols) for row in rows(r))
    assert any("blocks of 64" in n for n in r.notes)
    paths = write_all(r, out)
    assert "| nf4 (transformers) |" in markdown(r) and Path(paths["png"]).stat().st_size > 10_000


def test_formats_are_checked():
    from llmquant.errors import UnknownTypeError
    from llmquant.measure.formats import default_group_size, parse_formats

    assert parse_formats("gguf, NF4") == ("gguf", "nf4")
    with pytest.raises(UnknownTypeError, match="unknown type 'int3'"):
        parse_formats("gguf,int3")
    with pytest.raises(UnknownTypeError, match="gptq: needs llmquant's GPTQ/AWQ exporter"):
        parse_formats("gptq")
    # SmolLM2: hidden 576 (not a multiple of 128), intermediate 1536
    assert default_group_size([576, 1536])[0] == 64
    assert "576" in default_group_size([576, 1536])[1]
    assert default_group_size([4096, 14336]) == (128, "group size 128: every matrix width is a multiple of 128")
