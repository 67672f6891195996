"""Build Hugging Face model folders for the convert tests and bench/convert_parity.py.

``export_default_model`` turns the embedded SmolLM2 GGUF back into what its Hugging Face repository
holds: llama.cpp's Q/K row permutation undone, safetensors (sharded, with the index),
config.json, tokenizer.json rebuilt from the GGUF vocabulary and merges, tokenizer_config.json
with the chat template, generation_config.json and a model card. Written independently of
llmquant's converter (its own name table, permutation and safetensors writer).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from helpers import default_model_path

# GGUF name -> HF name (llama); {i} is the layer
HF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}

SMOLLM_PRE_TOKENIZER = {
    "type": "Sequence",
    "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    ],
}


def hf_name(gguf_name: str) -> str:
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        key = ".".join(["blk", "{i}", *parts[2:]])
        return HF_NAMES[key].format(i=parts[1])
    return HF_NAMES[gguf_name]


def to_hf_layout(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's rotary row order (convert_hf_to_gguf's LlamaModel.permute) for n_head heads."""
    rows = w.shape[0]
    return np.ascontiguousarray(w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (round to nearest even), as torch's .to(torch.bfloat16)."""
    n = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((n + 0x7FFF + ((n >> 16) & 1)) >> 16).astype(np.uint16)


def write_safetensors(path: Path, tensors: dict[str, tuple[str, np.ndarray]], metadata: dict | None = None) -> None:
    """tensors: name -> (dtype, array of that dtype's bits). Streams the data, 8-byte aligned header."""
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, (dtype, arr) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, arr in tensors.values():
            f.write(np.ascontiguousarray(arr).tobytes())


def tokenizer_json(tokens: list[str], types: list[int], merges: list[str]) -> dict:
    added = [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
        for i, (t, ty) in enumerate(zip(tokens, types)) if ty == 3
    ]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": SMOLLM_PRE_TOKENIZER,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": {t: i for i, t in enumerate(tokens)},
            "merges": [m.split(" ") for m in merges],
        },
    }


def export_default_model(folder: Path, *, shards: int = 2, dtype: str = "F32", card: bool = True,
                         source: Path | None = None) -> Path:
    """The embedded model as a Hugging Face folder (F32 weights = its exact F32 rendering); ``source``:
    another GGUF of the same architecture and vocabulary instead (e.g. a bench's de-gridded F32 file)."""
    from llmquant.gguf.source import GGUFSource

    folder.mkdir(parents=True, exist_ok=True)
    with GGUFSource(source or default_model_path()) as src:
        get = src.get
        n_head, n_head_kv = get("llama.attention.head_count"), get("llama.attention.head_count_kv")
        tokens, types = get("tokenizer.ggml.tokens"), get("tokenizer.ggml.token_type")
        names = sorted(src._entries, key=hf_name)
        per_shard = -(-len(names) // shards)
        weight_map = {}
        for s in range(shards):
            part = names[s * per_shard:(s + 1) * per_shard]
            fname = "model.safetensors" if shards == 1 else f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            tensors = {}
            for name in part:
                w = src.read(name)
                if name.endswith("attn_q.weight"):
                    w = to_hf_layout(w, n_head)
                elif name.endswith("attn_k.weight"):
                    w = to_hf_layout(w, n_head_kv)
                tensors[hf_name(name)] = ("BF16", bf16_bits(w)) if dtype == "BF16" else (dtype, w.astype(np.float16 if dtype == "F16" else np.float32))
                weight_map[hf_name(name)] = fname
            write_safetensors(folder / fname, dict(sorted(tensors.items())))
        if shards > 1:
            total = sum((folder / f).stat().st_size for f in set(weight_map.values()))
            (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        config = {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False, "attention_dropout": 0.0,
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "head_dim": get("llama.rope.dimension_count"),
            "hidden_act": "silu", "hidden_size": get("llama.embedding_length"), "initializer_range": 0.041666666666666664,
            "intermediate_size": get("llama.feed_forward_length"), "is_llama_config": True,
            "max_position_embeddings": get("llama.context_length"), "mlp_bias": False,
            "num_attention_heads": n_head, "num_hidden_layers": get("llama.block_count"), "num_key_value_heads": n_head_kv,
            "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_interleaved": False, "rope_scaling": None,
            "rope_theta": 100000, "tie_word_embeddings": True, "torch_dtype": {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[dtype],
            "transformers_version": "4.42.3", "use_cache": True, "vocab_size": len(tokens),
        }
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json(tokens, types, get("tokenizer.ggml.merges")), ensure_ascii=False))
        specials = [t for t, ty in zip(tokens, types) if ty == 3]
        tok_config = {
            "add_prefix_space": False,
            "added_tokens_decoder": {
                str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
                for i, t in enumerate(tokens) if t in specials
            },
            "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
            "bos_token": tokens[get("tokenizer.ggml.bos_token_id")], "chat_template": get("tokenizer.chat_template"),
            "clean_up_tokenization_spaces": False, "eos_token": tokens[get("tokenizer.ggml.eos_token_id")],
            "model_max_length": 8192, "pad_token": tokens[get("tokenizer.ggml.padding_token_id")],
            "tokenizer_class": "GPT2Tokenizer", "unk_token": tokens[get("tokenizer.ggml.unknown_token_id")], "vocab_size": len(tokens),
        }
        (folder / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2, ensure_ascii=False))
    if card:
        (folder / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "transformers_version": "4.42.3"}, indent=2))
        (folder / "README.md").write_text(
            "---\nlibrary_name: transformers\nlicense: apache-2.0\nlanguage:\n- en\n"
            "base_model:\n- HuggingFaceTB/SmolLM2-135M\n---\n\n# SmolLM2-135M-Instruct\n\nRebuilt from the embedded GGUF for tests.\n")
    return folder


def spm_model_bytes(pieces: list[tuple[str, float, int]]) -> bytes:
    """A minimal SentencePiece ModelProto holding only ``pieces`` (piece, score, type)."""
    def varint(n: int) -> bytes:
        out = b""
        while True:
            b, n = n & 0x7F, n >> 7
            out += bytes([b | (0x80 if n else 0)])
            if not n:
                return out

    def field(num: int, wire: int, payload: bytes) -> bytes:
        return varint(num << 3 | wire) + payload

    body = b""
    for piece, score, kind in pieces:
        raw = piece.encode()
        msg = field(1, 2, varint(len(raw)) + raw) + field(2, 5, struct.pack("<f", score)) + field(3, 0, varint(kind))
        body += field(1, 2, varint(len(msg)) + msg)
    return body


def write_tiny_model(folder: Path, *, arch: str = "LlamaForCausalLM", model_type: str = "llama", dtype: str = "BF16",
                     hidden: int = 64, heads: int = 4, kv_heads: int = 2, layers: int = 2, ff: int = 96,
                     bias: bool = False, tokenizer_from: Path | None = None, vocab_size: int | None = None,
                     extra_config: dict | None = None, seed: int = 0) -> Path:
    """A small random model of the llama family. The tokenizer files are copied from
    ``tokenizer_from`` (a folder); ``vocab_size`` defaults to that tokenizer's."""
    import shutil

    folder.mkdir(parents=True, exist_ok=True)
    if tokenizer_from is not None:
        for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
            if (tokenizer_from / name).is_file():
                shutil.copy(tokenizer_from / name, folder / name)
    if vocab_size is None:
        vocab_size = len(json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"])
    rng = np.random.default_rng(seed)
    hd = hidden // heads
    shapes = {"model.embed_tokens.weight": (vocab_size, hidden), "model.norm.weight": (hidden,), "lm_head.weight": (vocab_size, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (heads * hd, hidden), p + "self_attn.k_proj.weight": (kv_heads * hd, hidden),
            p + "self_attn.v_proj.weight": (kv_heads * hd, hidden), p + "self_attn.o_proj.weight": (hidden, heads * hd),
            p + "mlp.gate_proj.weight": (ff, hidden), p + "mlp.up_proj.weight": (ff, hidden), p + "mlp.down_proj.weight": (hidden, ff),
        })
        if bias:
            shapes.update({p + "self_attn.q_proj.bias": (heads * hd,), p + "self_attn.k_proj.bias": (kv_heads * hd,),
                           p + "self_attn.v_proj.bias": (kv_heads * hd,)})
    tensors = {}
    for name, shape in sorted(shapes.items()):
        w = (rng.standard_normal(shape) * (0.02 if len(shape) > 1 else 1.0)).astype(np.float32)
        if name.endswith("norm.weight"):
            w = 1.0 + 0.1 * w
        if dtype == "BF16":
            tensors[name] = ("BF16", bf16_bits(w))
        else:
            tensors[name] = (dtype, w.astype(np.float16 if dtype == "F16" else np.float32))
    write_safetensors(folder / "model.safetensors", tensors)
    config = {
        "architectures": [arch], "model_type": model_type, "hidden_size": hidden, "intermediate_size": ff,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "num_hidden_layers": layers,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "vocab_size": vocab_size,
        "tie_word_embeddings": False, "torch_dtype": {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[dtype],
        "bos_token_id": 1, "eos_token_id": 2, **(extra_config or {}),
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


# -- through transformers (tests that need torch: the [hf] extra) ---------------------------------------

def build_default_hf_folder(folder: Path) -> Path:
    """The embedded GGUF as an HF folder made by transformers' own GGUF loader: config and tokenizer
    from the GGUF, ``from_config`` + ``load_state_dict`` of the dequantized tensors, ``save_pretrained``
    (fp32), and config.json without the ``quantization_config: gguf`` key the loader leaves."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    from transformers.utils import logging

    logging.disable_progress_bar()
    gguf = default_model_path()
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)["tensors"]
    result = model.load_state_dict({k: torch.as_tensor(v) for k, v in tensors.items()}, strict=False)
    assert set(result.missing_keys) <= {"lm_head.weight"} and not result.unexpected_keys, result  # tied head
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("quantization_config", None)
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return folder


def write_compressed_tensors(src: Path, dst: Path, *, group_size: int = 64, symmetric: bool = True) -> Path:
    """A W4A16 ``pack-quantized`` checkpoint of ``src`` made with the compressed-tensors package:
    its quantization config applied to every Linear but lm_head, round-to-nearest scales from each
    group's min/max (``calculate_qparams``), ``ModelCompressor`` packing, ``update_config``."""
    import torch
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs, QuantizationConfig, QuantizationScheme, QuantizationStatus, apply_quantization_config,
    )
    from compressed_tensors.quantization.utils import calculate_qparams
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    args = QuantizationArgs(num_bits=4, type="int", symmetric=symmetric, strategy="group", group_size=group_size)
    config = QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)},
                                ignore=["lm_head"], quantization_status=QuantizationStatus.INITIALIZED)
    apply_quantization_config(model, config)
    with torch.no_grad():
        for name, module in model.named_modules():
            if not hasattr(module, "weight_scale"):
                continue
            w = module.weight.reshape(module.weight.shape[0], -1, group_size)
            scale, zp = calculate_qparams(w.amin(dim=-1), w.amax(dim=-1), args)
            module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape))
            module.weight_zero_point.data.copy_(zp.reshape(module.weight_zero_point.shape))
            module.quantization_status = QuantizationStatus.FROZEN
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    model.save_pretrained(dst)
    compressor.update_config(str(dst))
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return dst
