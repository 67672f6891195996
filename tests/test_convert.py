"""llmquant convert: Hugging Face folder -> GGUF.

The round trip rebuilds the embedded model's Hugging Face folder from its GGUF (tests/hfmodel.py:
llama.cpp's Q/K permutation undone, sharded safetensors, config.json, tokenizer.json rebuilt from
the vocabulary and merges, tokenizer_config.json with the chat template), converts it back and
checks the same tensor values, the metadata that matters, and identical tokenization and greedy
text in llama-cpp-python. Parity with convert_hf_to_gguf.py itself is bench/convert_parity.py.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import LlamaFileType as F

from helpers import default_model_path
from hfmodel import bf16_bits, export_default_model, spm_model_bytes, to_hf_layout, write_safetensors, write_tiny_model
from llmquant.convert import convert_model, convert_type
from llmquant.errors import LlmquantError, ModelFileError, TensorDataError, UnsafeFormatError, UnsupportedModelError
from llmquant.gguf.source import GGUFSource
from llmquant.hf.source import HFSource, permute_qk, supported_architectures, unpermute_qk
from llmquant.hf.vocab import read_sentencepiece
from llmquant.hf.safetensors import parse_safetensors, read_float32
from llmquant.gguf.writer import TEMP_PREFIX

KEYS_THAT_MATTER = (
    "general.architecture", "llama.block_count", "llama.context_length", "llama.embedding_length",
    "llama.feed_forward_length", "llama.attention.head_count", "llama.attention.head_count_kv",
    "llama.rope.freq_base", "llama.attention.layer_norm_rms_epsilon", "llama.vocab_size",
    "llama.rope.dimension_count", "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens",
    "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id",
    "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_space_prefix", "tokenizer.chat_template",
)
TEXTS = [
    "Hello world! The year 2024 had 366 days.",
    "   leading spaces and\ttabs\nnew lines 😀 café naïve",
    "<|im_start|>user\nWhat is 12+30?<|im_end|>\n<|im_start|>assistant\n",
    "def f(x):\n    return x**2  # 3.14159",
]


@pytest.fixture(scope="module")
def smol_tokenizer(tmp_path_factory) -> Path:
    """A folder holding only the embedded model's tokenizer files (for small random models)."""
    from hfmodel import tokenizer_json

    folder = tmp_path_factory.mktemp("tok")
    with GGUFSource(default_model_path()) as src:
        tokens, types = src.get("tokenizer.ggml.tokens"), src.get("tokenizer.ggml.token_type")
        doc = tokenizer_json(tokens, types, src.get("tokenizer.ggml.merges"))
    (folder / "tokenizer.json").write_text(json.dumps(doc, ensure_ascii=False))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>", "tokenizer_class": "GPT2Tokenizer",
         "chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"}))
    return folder


def _no_output(folder: Path, dst: Path) -> None:
    assert not dst.exists()
    assert not list(dst.parent.glob(f"{TEMP_PREFIX}*")), "a partial file was left behind"


# -- units ------------------------------------------------------------------------------------------------
def test_permutation_matches_llama_cpp_and_inverts():
    w = np.arange(8 * 2 * 3, dtype=np.float32).reshape(16, 3)  # 4 heads of 4 rows
    p = permute_qk(w, 4)
    # llama.cpp interleaves the two rotary halves of each head: rows 0,2,1,3 of a 4-row head
    assert p[:4, 0].tolist() == [0.0, 6.0, 3.0, 9.0]
    assert np.array_equal(unpermute_qk(p, 4), w)
    assert np.array_equal(to_hf_layout(p, 4), w)


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
def test_safetensors_reader_exact(tmp_path, dtype):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((8, 6)) * 3).astype(np.float32)
    x[0, :3] = [0.0, -0.0, 1e-30]
    stored = bf16_bits(x) if dtype == "BF16" else x.astype(np.float16 if dtype == "F16" else np.float32)
    write_safetensors(tmp_path / "model.safetensors", {"a": (dtype, stored), "b": ("F32", x[:2])})
    entries = {e.name: e for e in parse_safetensors(tmp_path / "model.safetensors")}
    got = read_float32(entries["a"])
    if dtype == "BF16":
        expected = (stored.astype(np.uint32) << 16).view(np.float32)  # BF16 -> F32 is a 16-bit shift
    else:
        expected = stored.astype(np.float32)
    assert got.dtype == np.float32 and np.array_equal(got.view(np.uint32), expected.view(np.uint32))
    assert np.array_equal(read_float32(entries["a"], permute_heads=2), permute_qk(expected, 2))


def test_tensor_types_follow_the_converter():
    assert convert_type("blk.0.attn_norm.weight", 1, 64, F.MOSTLY_F16)[0] == T.F32
    assert convert_type("output_norm.weight", 1, 64, F.MOSTLY_Q8_0)[0] == T.F32
    assert convert_type("blk.0.attn_q.bias", 1, 64, F.MOSTLY_F16)[0] == T.F32
    assert convert_type("blk.3.ffn_gate_inp.weight", 2, 64, F.MOSTLY_F16)[0] == T.F32
    assert convert_type("blk.0.attn_q.weight", 2, 64, F.MOSTLY_BF16)[0] == T.BF16
    assert convert_type("blk.0.attn_q.weight", 2, 64, F.MOSTLY_Q8_0)[0] == T.Q8_0
    assert convert_type("blk.0.ffn_down.weight", 2, 48, F.MOSTLY_Q8_0)[0] == T.F16  # 48 % 32: the F16 fallback


def test_sentencepiece_protobuf(tmp_path):
    pieces = [("<unk>", 0.0, 2), ("<s>", 0.0, 3), ("</s>", 0.0, 3), ("<0x0A>", 0.0, 6), ("▁the", -1.5, 1), ("é", -2.25, 1), ("<user>", 0.0, 4)]
    (tmp_path / "tokenizer.model").write_bytes(spm_model_bytes(pieces))
    assert read_sentencepiece(tmp_path / "tokenizer.model") == pieces
    (tmp_path / "tokenizer.model").write_bytes(spm_model_bytes(pieces)[:-3])
    with pytest.raises(ModelFileError, match="corrupt SentencePiece"):
        read_sentencepiece(tmp_path / "tokenizer.model")


def test_tiny_spm_mistral_metadata(tmp_path):
    pieces = [("<unk>", 0.0, 2), ("<s>", 0.0, 3), ("</s>", 0.0, 3)] + [(f"<0x{i:02X}>", 0.0, 6) for i in range(256)]
    pieces += [("▁a", -1.0, 1), ("▁b", -2.0, 1), ("<user>", 0.0, 4)]
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes(spm_model_bytes(pieces))
    (folder / "tokenizer_config.json").write_text(json.dumps({"add_prefix_space": True, "bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}))
    write_tiny_model(folder, arch="MistralForCausalLM", model_type="mistral", vocab_size=len(pieces) + 2, dtype="F16")
    r = convert_model(folder, tmp_path / "m.gguf", "auto")
    assert r.outtype == "F16" and r.tokenizer == "llama"
    with GGUFSource(tmp_path / "m.gguf") as g:
        assert g.get("tokenizer.ggml.tokens")[:3] == ["<unk>", "<s>", "</s>"]
        assert g.get("tokenizer.ggml.tokens")[-2:] == ["[PAD262]", "[PAD263]"]  # padded to config vocab_size
        assert g.get("tokenizer.ggml.token_type")[:4] == [2, 3, 3, 6]
        assert g.get("tokenizer.ggml.token_type")[-3] == 1  # a USER_DEFINED piece reads as NORMAL, as in the converter
        assert g.get("tokenizer.ggml.scores")[259:261] == [-1.0, -2.0]
        assert g.get("tokenizer.ggml.bos_token_id") == 1 and g.get("tokenizer.ggml.add_bos_token") is True
        assert g.get("tokenizer.ggml.add_space_prefix") is True and g.get("tokenizer.ggml.pre") == "default"
        assert "llama.attention.key_length" not in g.fields  # MistralConfig leaves head_dim unset


def test_tiny_qwen2_values_types_and_load(tmp_path, smol_tokenizer):
    folder = write_tiny_model(tmp_path / "q", arch="Qwen2ForCausalLM", model_type="qwen2", bias=True, tokenizer_from=smol_tokenizer, dtype="BF16")
    hf = {e.name: e for e in parse_safetensors(folder / "model.safetensors")}
    for outtype, qtype in (("bf16", T.BF16), ("f32", T.F32), ("q8_0", T.Q8_0)):
        dst = tmp_path / f"q-{outtype}.gguf"
        convert_model(folder, dst, outtype)
        with GGUFSource(dst) as g:
            assert g.arch == "qwen2" and g.get("tokenizer.ggml.pre") == "smollm"
            assert g.info("blk.0.attn_q.weight").type == qtype and g.info("blk.0.attn_q.bias").type == T.F32
            q = g.read("blk.1.attn_q.weight")
            want = read_float32(hf["model.layers.1.self_attn.q_proj.weight"])  # qwen2: no permutation
            if qtype == T.Q8_0:
                assert np.abs(q - want).max() <= np.abs(want).max() / 127
            else:
                assert np.array_equal(q, want)
    from llmquant.runtime.llama import Model

    with Model(tmp_path / "q-bf16.gguf", n_ctx=64, threads=1) as m:
        assert len(m.complete("Hello", max_tokens=4).tokens) == 4


def test_unknown_pre_tokenizer_is_refused(tmp_path, smol_tokenizer):
    folder = write_tiny_model(tmp_path / "m", tokenizer_from=smol_tokenizer)
    doc = json.loads((folder / "tokenizer.json").read_text())
    doc["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": False},
        {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}]}
    (folder / "tokenizer.json").write_text(json.dumps(doc))
    with pytest.raises(UnsupportedModelError, match="pre-tokenizer not recognized"):
        convert_model(folder, tmp_path / "o.gguf", "f16")
    _no_output(folder, tmp_path / "o.gguf")


# -- bad input ----------------------------------------------------------------------------------------------
def test_folder_without_config(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(ModelFileError, match="no config.json"):
        convert_model(tmp_path / "m", tmp_path / "o.gguf")
    _no_output(tmp_path, tmp_path / "o.gguf")


def test_unsupported_architecture_lists_supported(tmp_path, smol_tokenizer):
    folder = write_tiny_model(tmp_path / "m", arch="GPTNeoXForCausalLM", model_type="gpt_neox", tokenizer_from=smol_tokenizer)
    with pytest.raises(UnsupportedModelError) as exc:
        convert_model(folder, tmp_path / "o.gguf")
    assert "'GPTNeoXForCausalLM' is not supported" in str(exc.value)
    for name in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"):
        assert name in str(exc.value) and name in supported_architectures()
    _no_output(folder, tmp_path / "o.gguf")


def test_missing_shard(tmp_path, smol_tokenizer):
    folder = write_tiny_model(tmp_path / "m", tokenizer_from=smol_tokenizer)
    names = [e.name for e in parse_safetensors(folder / "model.safetensors")]
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    weight_map = {n: "model-00001-of-00002.safetensors" for n in names}
    weight_map["model.layers.1.mlp.up_proj.weight"] = "model-00002-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ModelFileError, match=r"missing shard\(s\) model-00002-of-00002.safetensors"):
        convert_model(folder, tmp_path / "o.gguf")
    _no_output(folder, tmp_path / "o.gguf")


@pytest.mark.parametrize("damage, message", [
    (lambda raw: struct.pack("<Q", 1 << 40) + raw[8:], "claims 1099511627776 bytes"),
    (lambda raw: raw[:8] + b"{not json" + raw[17:], "not valid JSON"),
    (lambda raw: raw[: len(raw) // 2], "truncated"),
    (lambda raw: raw.replace(b'"BF16"', b'"Q4_7"', 1), "dtype 'Q4_7'"),
])
def test_corrupt_safetensors_header(tmp_path, smol_tokenizer, damage, message):
    folder = write_tiny_model(tmp_path / "m", tokenizer_from=smol_tokenizer)
    path = folder / "model.safetensors"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ModelFileError, match=message):
        convert_model(folder, tmp_path / "o.gguf")
    _no_output(folder, tmp_path / "o.gguf")


def test_offsets_not_matching_shape(tmp_path):
    raw = json.dumps({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 60]}}).encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(64))
    with pytest.raises(ModelFileError, match=r"needs 64 bytes but data_offsets span 60"):
        parse_safetensors(tmp_path / "model.safetensors")


@pytest.mark.parametrize("change, message", [
    ({"hidden_size": 96}, r"has shape \[\d+, 64\] but config.json implies"),
    ({"num_key_value_heads": 4}, r"k_proj.weight': has shape \[32, 64\] but config.json implies \[64, 64\] \(kv_dim=64"),
    ({"num_hidden_layers": 3}, r"num_hidden_layers is 3 but the weights have no tensors for 1 layer"),
    ({"num_hidden_layers": 1}, r"belongs to layer 1 but config.json num_hidden_layers is 1"),
    ({"vocab_size": 1000}, r"lm_head.weight': has shape \[49152, 64\] but config.json implies \[1000, 64\]"),
])
def test_tensor_shape_not_matching_config(tmp_path, smol_tokenizer, change, message):
    folder = write_tiny_model(tmp_path / "m", tokenizer_from=smol_tokenizer)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(TensorDataError, match=message):
        convert_model(folder, tmp_path / "o.gguf")
    _no_output(folder, tmp_path / "o.gguf")


def test_pickle_checkpoints_are_refused(tmp_path, smol_tokenizer):
    folder = write_tiny_model(tmp_path / "m", tokenizer_from=smol_tokenizer)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")  # never opened
    with pytest.raises(UnsafeFormatError, match="unpickling can run arbitrary code.*--allow-pickle"):
        convert_model(folder, tmp_path / "o.gguf")
    _no_output(folder, tmp_path / "o.gguf")


def test_quantized_checkpoint_is_refused(tmp_path, smol_tokenizer):
    folder = write_tiny_model(tmp_path / "m", tokenizer_from=smol_tokenizer,
                              extra_config={"quantization_config": {"quant_method": "gptq", "bits": 4}})
    with pytest.raises(UnsupportedModelError, match=r"already quantized \(gptq\)"):
        convert_model(folder, tmp_path / "o.gguf")


def test_cli_error_is_one_line(tmp_path):
    import subprocess
    import sys

    (tmp_path / "m").mkdir()
    proc = subprocess.run([sys.executable, "-m", "llmquant", "convert", str(tmp_path / "m"), str(tmp_path / "o.gguf")],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert "no config.json" in proc.stderr and "Traceback" not in proc.stderr
    _no_output(tmp_path, tmp_path / "o.gguf")


# -- the round trip on the embedded model ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def round_trip(tmp_path_factory):
    work = tmp_path_factory.mktemp("roundtrip")
    folder = export_default_model(work / "SmolLM2-135M-Instruct", shards=2, dtype="F32")
    dst = work / "converted-f32.gguf"
    result = convert_model(folder, dst, "f32")
    return folder, dst, result


@pytest.mark.slow
def test_round_trip_same_tensors_and_metadata(round_trip):
    folder, dst, result = round_trip
    assert result.outtype == "F32" and result.pre_tokenizer == "smollm"
    with GGUFSource(default_model_path()) as orig, GGUFSource(dst) as conv:
        assert sorted(t.name for t in conv.tensors) == sorted(t.name for t in orig.tensors)
        for t in orig.tensors:
            assert conv.info(t.name).shape == t.shape
            assert np.array_equal(conv.read(t.name), orig.read(t.name)), t.name  # bit-exact values
        for key in KEYS_THAT_MATTER:
            assert conv.fields[key].value == orig.fields[key].value, key
            assert conv.fields[key].type == orig.fields[key].type, key
        # keys a current convert_hf_to_gguf adds that the embedded file predates (equal to the defaults)
        assert conv.get("llama.attention.key_length") == conv.get("llama.attention.value_length") == 64
        assert conv.get("tokenizer.ggml.add_eos_token") is False


@pytest.mark.slow
def test_round_trip_tokenizes_and_generates_identically(round_trip, tmp_path):
    from llmquant.quantize import quantize_model
    from llmquant.runtime.llama import Model

    _, dst, _ = round_trip
    reference = tmp_path / "reference-f32.gguf"  # the embedded model's F32 rendering: the same weights
    quantize_model(default_model_path(), reference, F.ALL_F32, threads=2)
    with Model(reference, n_ctx=256, threads=2) as a, Model(dst, n_ctx=256, threads=2) as b, \
            Model(default_model_path(), n_ctx=64, threads=1) as orig:
        for text in TEXTS:
            for special in (False, True):
                ids = orig.tokenize(text, special=special)
                assert b.tokenize(text, special=special) == ids, text
                assert a.tokenize(text, special=special) == ids
        prompt = b.format_chat([{"role": "user", "content": "What is the capital of France?"}])
        assert prompt == orig.format_chat([{"role": "user", "content": "What is the capital of France?"}])
        for p in (prompt, "The three primary colors are"):
            ga, gb = a.complete(p, max_tokens=24), b.complete(p, max_tokens=24)
            assert gb.tokens == ga.tokens and gb.text == ga.text


@pytest.mark.slow
def test_round_trip_bf16_sharded_auto(tmp_path):
    """A BF16 checkpoint converts to BF16 with --outtype auto, values exactly the stored bits."""
    folder = export_default_model(tmp_path / "SmolLM2-135M-Instruct", shards=1, dtype="BF16", card=False)
    dst = tmp_path / "auto.gguf"
    r = convert_model(folder, dst, "auto")
    assert r.outtype == "BF16"
    hf = {e.name: e for e in parse_safetensors(folder / "model.safetensors")}
    with HFSource(folder) as src, GGUFSource(dst) as g:
        for t in src.tensors[:40]:
            want = t.load()
            got = g.read(t.name)
            assert np.array_equal(got, want), t.name
        assert g.info("blk.0.attn_q.weight").type == T.BF16 and g.info("blk.0.attn_norm.weight").type == T.F32
        raw = hf["model.layers.0.self_attn.k_proj.weight"]
        assert np.array_equal(g.read("blk.0.attn_k.weight"), permute_qk(read_float32(raw), 3))


@pytest.mark.slow
def test_convert_then_quantize_in_one_run(round_trip, tmp_path):
    from llmquant.quantize import quantize_model

    folder, _, _ = round_trip
    one = tmp_path / "one-step-Q4_0.gguf"
    r = convert_model(folder, one, "f32", quantize=F.MOSTLY_Q4_0, threads=2)
    assert r.quantized_to == "Q4_0" and not list(tmp_path.glob(f"{TEMP_PREFIX}*"))
    two = tmp_path / "two-step-Q4_0.gguf"
    quantize_model(round_trip[1], two, F.MOSTLY_Q4_0, threads=2)
    with GGUFSource(one) as a, GGUFSource(two) as b:
        for t in a.tensors:
            assert t.type == b.info(t.name).type and np.array_equal(a.raw(t.name), b.raw(t.name)), t.name


def test_errors_are_llmquant_errors():
    for cls in (ModelFileError, TensorDataError, UnsafeFormatError, UnsupportedModelError):
        assert issubclass(cls, LlmquantError)
