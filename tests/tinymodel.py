"""Tiny llama-architecture GGUFs built by the tests themselves (random weights, no download)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter


def llama_tensors(n_layer=2, n_embd=64, n_head=4, n_head_kv=2, n_ff=128, n_vocab=128, tied=False, seed=0):
    """(name, numpy array) in llama.cpp's file order; numpy shapes (rows, row_length)."""
    rng = np.random.default_rng(seed)
    head_dim = n_embd // n_head
    n_embd_kv = head_dim * n_head_kv

    def w(*shape):
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    out = [("token_embd.weight", w(n_vocab, n_embd))]
    for i in range(n_layer):
        out += [
            (f"blk.{i}.attn_norm.weight", np.ones(n_embd, np.float32)),
            (f"blk.{i}.attn_q.weight", w(n_embd, n_embd)),
            (f"blk.{i}.attn_k.weight", w(n_embd_kv, n_embd)),
            (f"blk.{i}.attn_v.weight", w(n_embd_kv, n_embd)),
            (f"blk.{i}.attn_output.weight", w(n_embd, n_embd)),
            (f"blk.{i}.ffn_norm.weight", np.ones(n_embd, np.float32)),
            (f"blk.{i}.ffn_gate.weight", w(n_ff, n_embd)),
            (f"blk.{i}.ffn_up.weight", w(n_ff, n_embd)),
            (f"blk.{i}.ffn_down.weight", w(n_embd, n_ff)),
        ]
    out.append(("output_norm.weight", np.ones(n_embd, np.float32)))
    if not tied:
        out.append(("output.weight", w(n_vocab, n_embd)))
    return out


def write_tiny_llama(
    path: Path,
    *,
    n_layer=2, n_embd=64, n_head=4, n_head_kv=2, n_ff=128, n_vocab=128, tied=False, seed=0,
    store: GGMLQuantizationType = GGMLQuantizationType.F32,
    poison: dict[str, float] | None = None,
) -> Path:
    """Write a loadable-by-llama.cpp tiny llama GGUF. ``store`` quantizes its 2-D tensors with
    llmquant's formats; ``poison`` sets element 0 of the named tensors to a value (e.g. NaN)."""
    from llmquant.formats import get_format

    w = GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama-test")
    w.add_block_count(n_layer)
    w.add_context_length(256)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_dimension_count(n_embd // n_head)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(n_vocab)
    w.add_file_type(0 if store == GGMLQuantizationType.F32 else 7)
    # no tokenizer (llama.cpp's "none" vocabulary): tests feed token ids directly
    w.add_tokenizer_model("none")
    for name, arr in llama_tensors(n_layer, n_embd, n_head, n_head_kv, n_ff, n_vocab, tied, seed):
        if poison and name in poison:
            arr = arr.copy()
            arr.reshape(-1)[0] = poison[name]
        if arr.ndim == 2 and store != GGMLQuantizationType.F32:
            data = get_format(store).quantize(arr)
            w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=store)
        else:
            w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_tiny_llama_with_vocab(path: Path, *, n_layer=2, n_embd=256, n_head=4, n_head_kv=2, n_ff=512, seed=0,
                                tied=True) -> Path:
    """A tiny random llama (F32) with the embedded default model's tokenizer and chat template, so
    that text can be fed to it (calibration, generation)."""
    from gguf import GGUFValueType

    from llmquant.gguf.source import GGUFSource
    from llmquant.gguf.writer import AtomicGGUFWriter
    from llmquant.models import default_model_path

    with GGUFSource(default_model_path()) as src:
        n_vocab = int(src.get("llama.vocab_size") or len(src.get("tokenizer.ggml.tokens")))
        w = AtomicGGUFWriter(path, "llama", force=True)
        for key, f in src.fields.items():
            if key.startswith("tokenizer."):
                w.add_field(f)
    U32, F32 = GGUFValueType.UINT32, GGUFValueType.FLOAT32
    for key, value, vtype in [
        ("general.name", "tiny-llama-vocab-test", GGUFValueType.STRING), ("general.file_type", 0, U32),
        ("llama.block_count", n_layer, U32), ("llama.context_length", 1024, U32),
        ("llama.embedding_length", n_embd, U32), ("llama.feed_forward_length", n_ff, U32),
        ("llama.attention.head_count", n_head, U32), ("llama.attention.head_count_kv", n_head_kv, U32),
        ("llama.rope.dimension_count", n_embd // n_head, U32), ("llama.attention.layer_norm_rms_epsilon", 1e-5, F32),
        ("llama.vocab_size", n_vocab, U32),
    ]:
        w.set(key, value, vtype)
    tensors = llama_tensors(n_layer, n_embd, n_head, n_head_kv, n_ff, n_vocab, tied, seed)
    for name, arr in tensors:
        w.add_tensor_info(name, tuple(reversed(arr.shape)), GGMLQuantizationType.F32)
    w.start()
    for name, arr in tensors:
        w.write_tensor(name, arr)
    w.commit()
    return path
